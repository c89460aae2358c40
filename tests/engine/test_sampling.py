"""Sampler, detokenizer and stop conditions — unit level and through the engine on the tiny model."""

from __future__ import annotations

import pytest
import torch

from busserve.engine.detokenizer import Detokenizer
from busserve.engine.model_loader import LoadedModel
from busserve.engine.sampler import SamplingState, sample
from busserve.messages import Final, SamplingParams, TokenChunk
from tests.helpers import greedy, running_core


def _state(**kw: float | int | None) -> SamplingState:
    return SamplingState.from_params(SamplingParams(**kw))  # type: ignore[arg-type]


def test_greedy_rows_take_the_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    assert sample(logits, [_state(temperature=0.0), _state(temperature=0.0)]) == [1, 0]


def test_top_k_one_is_greedy_even_when_hot() -> None:
    logits = torch.randn(4, 100)
    states = [_state(temperature=5.0, top_k=1, seed=i) for i in range(4)]
    assert sample(logits, states) == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    seen = {sample(logits, [_state(temperature=1.0, top_p=0.7, seed=s)])[0] for s in range(200)}
    assert seen == {0, 1}


def test_min_p_drops_the_tail() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.4, 0.09, 0.01]]))
    seen = {sample(logits, [_state(temperature=1.0, min_p=0.2, seed=s)])[0] for s in range(200)}
    assert seen == {0, 1}


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    logits = torch.randn(3, 50)
    alone = [sample(logits[1:2], [s])[0] for s in [_state(temperature=1.0, seed=7)] for _ in range(1)]
    a = _state(temperature=1.0, seed=7)
    batched = sample(logits, [_state(temperature=1.0), a, _state(temperature=0.7, seed=1)])
    assert batched[1] == alone[0]


def test_temperature_spreads_choices() -> None:
    logits = torch.zeros(1, 10)
    picks = {sample(logits, [_state(temperature=1.0)])[0] for _ in range(100)}
    assert len(picks) > 5


def test_detokenizer_streams_whole_characters(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    text = "Héllo wörld! 你好，世界。 Paris."
    d = Detokenizer(tok)
    assert "".join(d.push(t) for t in tok(text)["input_ids"]) + d.flush() == text


@pytest.mark.parametrize(("text", "stop", "want"), [
    ("The answer is 42. The end.", ["."], "The answer is 42"),
    ("alpha beta gamma delta", ["gamma", "beta"], "alpha "),
    ("no stop here", ["zzz"], "no stop here"),
    ("split stop string", ["p st"], "split sto"),  # the stop spans a token boundary
])
def test_stop_strings_are_never_leaked(tiny: LoadedModel, text: str, stop: list[str], want: str) -> None:
    d = Detokenizer(tiny.tokenizer, stop)
    emitted = []
    for t in tiny.tokenizer(text)["input_ids"]:
        emitted.append(d.push(t))
        for s in stop:
            assert s not in "".join(emitted)
        if d.stopped_by:
            break
    out = "".join(emitted) + d.flush()
    assert out == want
    assert (d.stopped_by is not None) == (want != text)


def test_engine_stop_conditions(tiny: LoadedModel) -> None:
    ids = tiny.tokenizer("hello there")["input_ids"]
    with running_core(tiny) as h:
        free = h.tokens(h.submit(ids, greedy(12)))
        assert len(free) == 12
        # stop token id: the 5th greedy token ends the request (and is its last token)
        rid = h.submit(ids, greedy(12, stop_token_ids=[free[4]]))
        events = h.wait(rid)
        final = events[-1]
        assert isinstance(final, Final) and final.finish_reason == "stop" and final.stop_reason == free[4]
        assert h.tokens(rid) == free[: free.index(free[4]) + 1]
        # max_tokens
        rid = h.submit(ids, greedy(3))
        assert h.wait(rid)[-1].finish_reason == "length" and len(h.tokens(rid)) == 3
        # EOS ends a request unless ignore_eos
        eos = next(iter(tiny.eos_token_ids))
        rid = h.submit(ids, SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[]))
        toks = h.tokens(rid)
        assert eos not in toks[:-1]
        # seeded sampling is reproducible
        hot = SamplingParams(max_tokens=10, temperature=1.0, seed=123)
        a = h.tokens(h.submit(ids, hot))
        b = h.tokens(h.submit(ids, hot))
        c = h.tokens(h.submit(ids, SamplingParams(max_tokens=10, temperature=1.0, seed=124)))
        assert a == b and a != c
        usage = h.wait(rid)[-1].usage
        assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(toks)


def test_stop_string_through_the_engine(tiny: LoadedModel) -> None:
    ids = tiny.tokenizer("hello there")["input_ids"]
    with running_core(tiny) as h:
        rid = h.submit(ids, greedy(16))
        full = h.text(rid)
        stop = full[5:8]
        assert stop and stop in full
        rid = h.submit(ids, greedy(16, stop=[stop]))
        events = h.wait(rid)
        text = "".join(e.text for e in events if isinstance(e, TokenChunk))
        assert text == full[: full.index(stop)]
        assert events[-1].finish_reason == "stop" and events[-1].stop_reason == stop


@pytest.mark.parametrize(("text", "stop", "want"), [
    ("The answer is 42. The end.", ["."], "The answer is 42."),
    ("alpha beta gamma delta", ["gamma", "beta"], "alpha beta"),
    ("split stop string", ["p st"], "split stop st"),
])
def test_include_stop_keeps_the_stop_string_and_nothing_after(tiny: LoadedModel, text: str, stop: list[str],
                                                              want: str) -> None:
    d = Detokenizer(tiny.tokenizer, stop, include_stop=True)
    out = ""
    for t in tiny.tokenizer(text)["input_ids"]:
        out += d.push(t)
        if d.stopped_by:
            break
    assert out + d.flush() == want


def test_special_tokens_kept_when_asked(tiny: LoadedModel) -> None:
    tok = tiny.tokenizer
    ids = tok("Hi")["input_ids"] + [tok.eos_token_id]
    kept = Detokenizer(tok, skip_special_tokens=False)
    skipped = Detokenizer(tok)
    assert "".join(kept.push(t) for t in ids) + kept.flush() == "Hi" + tok.eos_token
    assert "".join(skipped.push(t) for t in ids) + skipped.flush() == "Hi"
