"""Penalties, logit_bias and min_tokens (busserve/engine/logits_processing.py): the formulas against a direct
computation, then their effect on a real engine core (tiny random-weight Llama)."""

from __future__ import annotations

import pytest
import torch

from busserve.engine.logits_processing import LogitsSettings, Row, process
from busserve.engine.model_loader import LoadedModel
from busserve.messages import Final, InvalidField, SamplingParams, TokenChunk
from tests.helpers import greedy, reference_model, running_core


def test_formulas_match_their_definitions() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    ids = [3, 7, 7, 9, 3, 3, 11]  # prompt 3, 7, 7; output 9, 3, 3, 11
    s = LogitsSettings(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=1.3,
                       logit_bias=((2, 5.0), (4, -100.0)), min_tokens=6, end_token_ids=(0, 49))
    got = process(logits, [Row(LogitsSettings(), ids, 3), Row(s, ids, 3), Row(LogitsSettings(), [], 0)])
    assert torch.equal(got[0], logits[0]) and torch.equal(got[2], logits[2])  # rows without settings untouched
    want = logits[1].clone()
    for t in set(ids):  # repetition: prompt and output
        want[t] = want[t] / 1.3 if want[t] > 0 else want[t] * 1.3
    for t, n in {9: 1, 3: 2, 11: 1}.items():  # presence and frequency: output only
        want[t] -= 0.25 * n + 0.5
    want[2] += 5.0
    want[4] -= 100.0
    want[0] = want[49] = float("-inf")  # 4 outputs < min_tokens 6
    assert torch.allclose(got[1], want)
    assert process(logits, [Row(LogitsSettings(), ids, 3)] * 3) is logits  # nothing to do: no copy


def test_bad_values_name_their_field() -> None:
    with pytest.raises(InvalidField, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(InvalidField, match="presence_penalty"):
        SamplingParams(presence_penalty=float("nan"))


@torch.inference_mode()
def _reference(tiny: LoadedModel, prompt: list[int], n: int, settings: LogitsSettings
               ) -> tuple[list[int], list[float]]:
    """The model's own forward, the same processing, argmax: what the engine must produce."""
    model = reference_model(tiny)
    ids = list(prompt)
    margins = []
    for _ in range(n):
        logits = process(model(input_ids=torch.tensor([ids])).logits[:, -1].float(), [Row(settings, ids, len(prompt))])
        top = logits[0].topk(2).values
        margins.append(float(top[0] - top[1]))
        ids.append(int(logits.argmax(-1)))
    return ids[len(prompt):], margins


def test_effects_on_a_real_engine(tiny: LoadedModel) -> None:
    prompt = list(range(100, 140))
    with running_core(tiny) as h:
        plain = h.tokens(h.submit(prompt, greedy(12)))
        assert h.tokens(h.submit(prompt, greedy(12, logit_bias={777: 100.0}))) == [777] * 12
        assert h.tokens(h.submit(prompt, greedy(12, logit_bias={plain[0]: -100.0})))[0] != plain[0]
        # A bias that wins every step, and a frequency penalty that takes it back after a few.
        biased = h.tokens(h.submit(prompt, greedy(12, logit_bias={777: 6.0})))
        assert biased == [777] * 12
        tempered = h.tokens(h.submit(prompt, greedy(12, logit_bias={777: 6.0}, frequency_penalty=2.0)))
        assert 1 <= tempered.count(777) < 12, tempered
        # Exactly the reference, token for token, for each penalty over a prompt that repeats the model's own output.
        repeated = prompt[:8] + plain[:6] + plain[:6]
        for kw in ({"repetition_penalty": 1.8}, {"presence_penalty": 1.5}, {"frequency_penalty": 0.7},
                   {"repetition_penalty": 0.6, "logit_bias": {plain[1]: 2.0}}):
            got = h.tokens(h.submit(repeated, greedy(10, **kw)))
            want, margins = _reference(tiny, repeated, 10, LogitsSettings(
                presence_penalty=kw.get("presence_penalty", 0.0), frequency_penalty=kw.get("frequency_penalty", 0.0),
                repetition_penalty=kw.get("repetition_penalty", 1.0),
                logit_bias=tuple(sorted(kw.get("logit_bias", {}).items()))))
            if got != want:  # fine only where the two attentions' rounding meets a near-tie
                first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
                assert margins[first] < 1e-3, (kw, got, want)
        # stop_token_ids on the first greedy token ends at once; min_tokens holds the end back.
        stop = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[plain[0]])
        assert h.tokens(h.submit(prompt, stop)) == [plain[0]]
        held = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[plain[0]],
                              min_tokens=5)
        rid = h.submit(prompt, held)
        out = h.tokens(rid)
        assert isinstance(h.wait(rid)[-1], Final)
        assert len(out) >= 5 and plain[0] not in out[:5]


@torch.inference_mode()
def test_logprobs_are_the_models_own_log_softmax(tiny: LoadedModel) -> None:
    prompt = list(range(200, 230))
    with running_core(tiny) as h:
        rid = h.submit(prompt, greedy(8, logprobs=3, repetition_penalty=1.5))
        chunks = [e for e in h.wait(rid) if isinstance(e, TokenChunk)]
        plain = [e for e in h.wait(h.submit(prompt, greedy(8))) if isinstance(e, TokenChunk)]
    assert all(c.logprobs is None for c in plain)  # asked for nothing, given nothing
    model = reference_model(tiny)
    ids = list(prompt)
    for c in chunks:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids) == 1
        lp = c.logprobs[0]
        want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].float(), -1)
        assert lp.token_id == c.token_ids[0]
        assert abs(lp.logprob - float(want[lp.token_id])) < 1e-4  # the model's own, before the penalty
        assert [t.token_id for t in lp.top] == want.topk(3).indices.tolist()
        assert all(abs(t.logprob - float(want[t.token_id])) < 1e-4 for t in lp.top)
        ids.append(c.token_ids[0])
