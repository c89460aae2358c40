"""The least-loaded pick, alone and with several routers: exact with one router, power-of-d choices with several
(so that routers deciding on the same stale heartbeats do not all pile onto one engine), and the routers a view
counts from their heartbeats. Views are real ClusterViews fed by hand, as from the bus."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter

import pytest

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.messages import EngineStatus
from busserve.router.cluster import ClusterView, least_loaded
from busserve.router.dispatcher import Router, RouterConfig


def _view(loads: list[int]) -> ClusterView:
    view = ClusterView(bus=None)  # type: ignore[arg-type]  # fed by hand
    for i, running in enumerate(loads):
        view.on_status(EngineStatus(engine_id=f"e{i:02d}", model="m", roles=["prefill", "decode"], running=running,
                                    waiting=0, parked=0, free_pages=100, total_pages=100, page_size=16,
                                    max_model_len=4096, transports=["bus"], host="h", pid=1, seq=1,
                                    interval_s=3600.0))
    return view


def test_one_router_takes_the_exact_least_loaded_engine() -> None:
    view = _view([3, 1, 2, 1, 5])
    engines = view.engines()
    assert least_loaded(engines).id == "e01"  # ties on load and free KV: the lower id
    assert least_loaded(engines, exclude=[engines[1]]).id == "e03"
    assert {least_loaded(engines, routers=1, rng=random.Random(s)).id for s in range(50)} == {"e01"}


def test_several_routers_sample_so_they_do_not_all_pick_one_engine() -> None:
    """64 engines, one of them idle, the rest equally busy: eight routers seeing this same heartbeat would all send
    their next request to the idle one. With power-of-d choices each weighs 8 engines at random, so the idle one is
    picked about an eighth of the time and the picks spread over the cluster."""
    view = _view([0] + [1] * 63)
    engines = view.engines()
    rng = random.Random(7)
    picks = Counter(least_loaded(engines, routers=8, rng=rng).id for _ in range(800))  # type: ignore[union-attr]
    assert 60 <= picks["e00"] <= 150, picks["e00"]  # binomial(800, 1/8): mean 100, sd 9.4
    assert len(picks) > 40
    # Never worse than the sample's best: with one engine left, it is that one; with two, the lighter.
    assert least_loaded(engines[:1], routers=8).id == "e00"  # type: ignore[union-attr]
    assert {least_loaded(engines[:2], routers=8, rng=rng).id for _ in range(20)} == {"e00"}  # type: ignore[union-attr]


def test_a_view_counts_the_routers_it_hears_and_forgets_silent_ones() -> None:
    view = ClusterView(bus=None)  # type: ignore[arg-type]
    assert view.routers() == 1
    view.on_router("r1", interval_s=0.05)
    view.on_router("r2", interval_s=3600.0)
    assert view.routers() == 3
    time.sleep(0.4)  # r1 missed three heartbeats (of at least 0.1 s)
    assert view.routers() == 2


@pytest.mark.asyncio
async def test_routers_on_one_bus_count_each_other(bus_config: BusConfig) -> None:
    """Two routers started on a real nats-server hear each other's heartbeats: each view counts two routers (and
    so samples), and one alone again after the other stops."""
    buses = [await Bus.connect(bus_config, name=f"r{i}") for i in range(2)]
    routers = [Router(b, None, RouterConfig(router_id=f"count-r{i}", heartbeat_s=0.1)) for i, b in enumerate(buses)]
    try:
        for r in routers:
            await r.start()
        deadline = time.monotonic() + 10
        while not all(r.view.routers() == 2 for r in routers):
            assert time.monotonic() < deadline, [r.view.routers() for r in routers]
            await asyncio.sleep(0.05)
        await routers[1].stop()
        await buses[1].close()
        deadline = time.monotonic() + 10
        while routers[0].view.routers() != 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        for r, b in zip(routers, buses, strict=True):
            with contextlib.suppress(Exception):
                await r.stop()
            await b.close()
