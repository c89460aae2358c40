"""The bench harness's own pieces on synthetic timings: metric definitions, percentiles, goodput, arrivals."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from busserve.bench import datasets
from busserve.bench.arrivals import arrival_times
from busserve.bench.metrics import SLO, RequestRecord, percentile, summarize


def _rec(sent: float, first: float, gaps: list[float], kind: str = "x") -> RequestRecord:
    times = [first]
    for g in gaps:
        times.append(times[-1] + g)
    return RequestRecord(kind=kind, prompt_len=10, output_len=len(times), sent_at=sent, first_token_at=first,
                         done_at=times[-1], token_times=times, tokens=len(times))


def test_per_request_definitions_follow_vllm() -> None:
    r = _rec(sent=1.0, first=1.5, gaps=[0.1, 0.2, 0.3])
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.1)
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)  # (E2E - TTFT) / (output tokens - 1)
    assert r.itls == pytest.approx([0.1, 0.2, 0.3])
    assert _rec(0, 1, []).tpot is None  # one token: no TPOT


def test_percentiles_interpolate_like_numpy() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0 and math.isnan(percentile([], 50))


def test_summary_throughput_and_goodput() -> None:
    records = [_rec(0, 0.1, [0.05] * 9), _rec(0, 0.4, [0.05] * 9), _rec(0, 0.2, [0.2] * 9)]
    failed = RequestRecord(kind="x", prompt_len=10, output_len=5, sent_at=0, error="boom")
    s = summarize([*records, failed], duration_s=2.0, slo=SLO(ttft_ms=300, tpot_ms=100))
    assert s["completed"] == 3 and s["failed"] == 1
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 15.0
    assert s["total_token_throughput"] == (30 + 30) / 2.0
    assert s["ttft_s"]["p50"] == pytest.approx(0.2) and s["ttft_s"]["mean"] == pytest.approx(0.7 / 3)
    assert s["itl_s"]["p50"] == pytest.approx(0.05)
    assert s["goodput"] == 0.5  # only the first meets both SLOs


@pytest.mark.parametrize(("rate", "shape"), [(4.0, 1.0), (10.0, 0.25), (2.0, 4.0)])
def test_arrivals_have_the_asked_rate_and_burstiness(rate: float, shape: float) -> None:
    times = arrival_times(20_000, rate, shape, seed=3)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    mean = statistics.fmean(gaps)
    cv = statistics.pstdev(gaps) / mean
    assert mean == pytest.approx(1 / rate, rel=0.03)
    assert cv == pytest.approx(1 / math.sqrt(shape), rel=0.05)  # Poisson: 1; burstier: larger


def test_arrivals_edge_cases() -> None:
    assert arrival_times(3, math.inf) == [0.0, 0.0, 0.0]
    assert arrival_times(0, 1.0) == []
    with pytest.raises(ValueError):
        arrival_times(3, 0.0)
    assert arrival_times(5, 2.0, seed=1) == arrival_times(5, 2.0, seed=1)


def test_datasets_shapes() -> None:
    long = datasets.long_input(200, seed=1)
    chat = datasets.chat(200, seed=1)
    assert statistics.fmean(len(s.prompt_token_ids) for s in long) == pytest.approx(1024, rel=0.05)
    assert statistics.fmean(s.output_len for s in long) == pytest.approx(32, rel=0.1)
    assert statistics.fmean(len(s.prompt_token_ids) for s in chat) < 200
    groups = datasets.prefix_groups(50, groups=3, prefix_len=64, suffix_len="fixed:8", output_len="fixed:4", seed=2)
    assert len({tuple(s.prompt_token_ids[:64]) for s in groups}) == 3
    mixed = datasets.mixed(40, seed=3)
    assert {s.kind for s in mixed} == {"long", "chat"} and sum(s.kind == "long" for s in mixed) == 20
    with pytest.raises(ValueError):
        datasets.length_sampler("zipf:3", __import__("random").Random())


def test_sharegpt_file(tmp_path, tiny) -> None:  # type: ignore[no-untyped-def]
    import json

    path = tmp_path / "sg.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Tell me a story about a cat."},
                                                   {"from": "gpt", "value": "Once upon a time a cat sat."}]},
                                {"conversations": [{"from": "human", "value": "hi"}]}]))
    samples = datasets.sharegpt(path, 10, tiny.tokenizer)
    assert len(samples) == 1 and samples[0].output_len > 4


def test_salted_runs_share_nothing_across_runs_and_keep_prefixes_inside_one() -> None:
    base = datasets.prefix_groups(6, groups=2, prefix_len=32, suffix_len="fixed:8", output_len="fixed:4", seed=1)
    a, b = datasets.salted(base, "run-a"), datasets.salted(base, "run-b")
    assert [len(s.prompt_token_ids) for s in a] == [len(s.prompt_token_ids) + 2 for s in base]
    assert all(x.prompt_token_ids[2:] == s.prompt_token_ids and x.output_len == s.output_len
               for x, s in zip(a, base, strict=True))
    assert a[0].prompt_token_ids[:2] != b[0].prompt_token_ids[:2]  # a different head: no page hash in common
    assert datasets.salted(base, "run-a") == a  # deterministic
    shared = {tuple(s.prompt_token_ids[:34]) for s in a}
    assert len(shared) == 2  # the two shared prefixes are still shared within the run
