"""The cluster simulation (benchmarks/cluster_sim.py): its bookkeeping, and its routers against queueing theory.
The calibration is given here, not measured, so these tests are fast and exact."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    _load("strategy_model")
    return _load("cluster_sim")


def _calibration(sim: ModuleType, **overrides: float) -> object:
    values = {"route_base_us": 100.0, "route_per_engine_us": 2.0, "status_us": 20.0, "kv_batch_us": 15.0,
              "kv_page_us": 1.0, "nats_one_way_ms": 0.1, "nats_msgs_per_s": 50_000.0, "nats_bytes_per_s": 1e9}
    return sim.Calibration(**{**values, **overrides})


@pytest.mark.parametrize("strategy", ["least_loaded", "pd"])
def test_every_request_finishes_once_and_the_bus_counts_what_was_sent(sim: ModuleType, strategy: str) -> None:
    r, cluster = sim.run(strategy, rate=4.0, requests=300, seed=3, engines=8, routers=3, cal=_calibration(sim),
                         cost=sim.CostModel(), kv_gb_s=0.8, heartbeat_s=0.5, workload="fixed:200/10",
                         prefill_engines=6)
    assert r.finished == 300
    # Each request's first token comes from its prefill, the other 9 from decode steps: one token event each.
    assert cluster.bus.msgs["token events"] == 300 * 9
    assert cluster.bus.msgs["final events"] == 300
    assert cluster.bus.msgs["sub-requests"] == 300 * (6 if strategy == "pd" else 2)
    # Every router's own count of what it sent out is back to zero.
    assert all(n == 0 for router in cluster.routers for n in router.mine.values())
    # KV batches reach every router: one batch per step that completed a page, delivered three times.
    assert cluster.bus.msgs["KV events (to every router)"] % 3 == 0 and cluster.bus.msgs["KV events (to every router)"]


def test_one_router_is_a_single_server_queue(sim: ModuleType) -> None:
    """Decisions of fixed cost S at rate λ on one router: its busy share is λ·S (plus the heartbeats it reads),
    and with ρ = 0.5 a request waits S + ρS/(2(1 − ρ)) on average (M/D/1)."""
    rate = 40.0
    engines = 16
    service_s = 0.5 / rate
    cal = _calibration(sim, route_base_us=service_s * 1e6 - 2.0 * engines, status_us=0.0, kv_batch_us=0.0,
                       kv_page_us=0.0, nats_msgs_per_s=1e12)
    r, cluster = sim.run("least_loaded", rate=rate, requests=6000, seed=1, engines=engines, routers=1, cal=cal,
                         cost=sim.CostModel(), kv_gb_s=0.8, heartbeat_s=1.0, workload="fixed:32/2",
                         prefill_engines=0)
    waits = cluster.routers[0].waits
    assert r.router_busy_max == pytest.approx(0.5, rel=0.08)
    assert sum(waits) / len(waits) == pytest.approx(service_s + 0.5 * service_s / (2 * 0.5), rel=0.08)
