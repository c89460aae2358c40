"""The strategy model (benchmarks/strategy_model.py) against queueing theory and its own bookkeeping."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def model() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "strategy_model.py"
    spec = importlib.util.spec_from_file_location("strategy_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["strategy_model"] = module
    spec.loader.exec_module(module)
    return module


def test_one_engine_with_fixed_prefills_is_an_md1_queue(model: ModuleType) -> None:
    # Every prompt fills one step exactly and is answered with its first token: one server, deterministic service
    # S, Poisson arrivals — M/D/1, whose mean wait is rho·S / (2(1 − rho)).
    cost = model.CostModel(scale=1.0)
    service = cost.step_s([], 1024)
    rate = 0.7 / service

    def one_engine(prompt_len, engines):  # type: ignore[no-untyped-def]
        return engines[0], engines[0], 0

    s = model.simulate(one_engine, rate, 20000, seed=1, cost=cost, workload="fixed:1024/1")
    expected_wait = 0.7 * service / (2 * (1 - 0.7))
    assert s.finished == 20000
    assert s.jct_mean == pytest.approx(service + expected_wait, rel=0.05)


@pytest.mark.parametrize("spec", ["least_loaded", "pd", "balanced_pd:f=0.3", "adaptive",
                                  "adaptive:absorb_decoders=-1"])
def test_every_request_finishes_once_with_its_tokens(model: ModuleType, spec: str) -> None:
    s = model.simulate(model.policy_from(spec), 1.0, 300, seed=0)
    assert s.finished == 300 and len(s.jcts) == 300
    # No request can beat its own prefill plus a decode step per output token after the first (8 at least).
    floor = model.CostModel().step_s([], 256) + 7 * model.CostModel().step_s([256], 0)
    assert min(s.jcts) >= floor * 0.99


def test_one_prefill_engine_queues_more_than_two(model: ModuleType) -> None:
    # PD's price in the model as in the runs: every prompt waits for one engine, so its TTFT tail is longer than
    # data parallel's, where both engines prefill.
    pd = model.simulate(model.policy_from("pd"), 0.9, 2000, seed=0)
    dp = model.simulate(model.policy_from("least_loaded"), 0.9, 2000, seed=0)
    assert pd.ttft_p99 > 1.5 * dp.ttft_p99


def test_unknown_strategy_is_refused(model: ModuleType) -> None:
    with pytest.raises(ValueError, match="prefix_aware"):
        model.policy_from("prefix_aware")
