"""The engine's own prefill rate, decode-step time and prefill share: the arithmetic, and a real engine measuring them."""

from __future__ import annotations

import math

import pytest

from busserve.engine.model_loader import LoadedModel
from busserve.engine.step_rates import MIN_PROMPT_TOKENS, WINDOW_S, StepRates
from tests.helpers import greedy, running_core


def test_rates_from_steps() -> None:
    r = StepRates()
    r.observe(prompt_tokens=1000, decode_rows=0, seconds=0.5)
    assert r.prefill_tokens_per_s == pytest.approx(2000)
    r.observe(prompt_tokens=0, decode_rows=4, seconds=0.02)
    assert r.decode_step_s == pytest.approx(0.02)
    # Prompt tokens beside decoders: the decode step's share is taken off before the rate is updated.
    r.observe(prompt_tokens=1000, decode_rows=4, seconds=0.52)
    assert r.prefill_tokens_per_s == pytest.approx(2000)
    # Small prefill steps say little about the rate; they leave it alone.
    r.observe(prompt_tokens=MIN_PROMPT_TOKENS - 1, decode_rows=0, seconds=1.0)
    assert r.prefill_tokens_per_s == pytest.approx(2000)
    # A slower engine moves the figure a share per step (ALPHA) toward what it measures now.
    for _ in range(40):
        r.observe(prompt_tokens=1000, decode_rows=0, seconds=1.0)
    assert r.prefill_tokens_per_s == pytest.approx(1000, rel=1e-3)


def test_prefill_share_is_the_recent_share_of_time_spent_on_prompts() -> None:
    r = StepRates(since=0.0)
    assert r.prefill_share(now=0.0) == 0.0
    # Computing prompts 3 s of every 10 s for a long while: the share settles near 0.3...
    for t in range(0, 600, 10):
        r.observe(prompt_tokens=3000, decode_rows=0, seconds=3.0, now=float(t))
    assert 0.25 < r.prefill_share(now=600.0) < 0.4
    # ...and fades once the engine computes none (decode steps alone leave it alone).
    share = r.prefill_share(now=600.0)
    r.observe(prompt_tokens=0, decode_rows=8, seconds=0.05, now=630.0)
    assert r.prefill_share(now=630.0) == pytest.approx(share * math.exp(-30 / WINDOW_S))


def test_an_engine_measures_what_it_does(tiny: LoadedModel) -> None:
    with running_core(tiny, max_batch_tokens=256) as h:
        rid = h.submit(list(range(100, 400)), greedy(max_tokens=12))
        assert len(h.tokens(rid)) == 12
        rates = h.core.rates
    assert rates.prefill_tokens_per_s > 0 and rates.decode_step_s > 0
    # One step of 256 prompt tokens takes far longer than a decode step of one row.
    assert 256 / rates.prefill_tokens_per_s > rates.decode_step_s
