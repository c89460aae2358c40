"""Faults around a KV transfer, on the real model: the prefill engine dies mid-remote_send (the receiver prefills the
request itself, within seconds), and client cancels race shm transfers (no page leaks, no other request's KV
touched)."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from busserve.bus.client import Bus
from busserve.engine.model_loader import LoadedModel
from busserve.messages import Cancel, Final, SetStrategy, StrategyState
from busserve.testing import ProcessCluster, Wire
from tests.faults.conftest import prompt, wait_router
from tests.faults.harness import reference
from tests.helpers import assert_greedy_equal, live_view, wait_idle_no_leaks

pytestmark = pytest.mark.slow


@pytest.fixture
def pd_cluster(logs: Path) -> Iterator[ProcessCluster]:
    """SmolLM2 (fp32): P prefills (16 tokens a step, so a long prompt takes seconds), D decodes; router r0, pd."""
    with ProcessCluster(log_dir=str(logs)) as c:
        c.start_engine("P", "--dtype", "float32", "--kv-memory", "192MiB", "--max-batch-tokens", "16",
                       "--max-prefill-tokens", "16", "--roles", "prefill", threads=1)
        c.start_engine("D", "--dtype", "float32", "--kv-memory", "192MiB", "--roles", "decode", threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--strategy", "pd")
        c.wait_engines({"P", "D"})
        yield c


async def _use_pd(bus: Bus) -> None:
    state = await bus.request(bus.subjects.control_strategy(), SetStrategy(name="pd"), StrategyState, timeout_s=10)
    assert state.name == "pd"


@pytest.mark.asyncio
async def test_prefill_engine_killed_mid_remote_send(pd_cluster: ProcessCluster, smol: LoadedModel) -> None:
    c = pd_cluster
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"P", "D"})
        await wait_router(bus)
        await _use_pd(bus)
        p = prompt(smol, 700, seed=7)  # ~44 steps of 16 tokens on P: seconds of work
        want = (await reference(bus, "D", [p], 8))[0]
        async with Wire(bus) as wire:
            stream = await wire.send("victim", p, 8)
            await asyncio.sleep(1.5)
            assert not stream.tokens, "the prefill finished before the prefill engine could be killed"
            killed_at = time.monotonic()
            c.kill("P")
            await wire.all_ended(timeout_s=60)
        wire.check_all()
        final = stream.terminal
        assert isinstance(final, Final) and final.engine_id == "D", final
        assert_greedy_equal(smol, p, stream.tokens, want)
        first = stream.token_times()[0] - killed_at
        assert first < 10.0, f"the first token came {first:.1f}s after the prefill engine died"
        # D reserved pages P was writing into: they come back once D sees P's process gone (no quarantine left).
        await wait_idle_no_leaks(bus, {"D"})
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_cancels_racing_shm_transfers_leak_nothing_and_touch_no_other_kv(pd_cluster: ProcessCluster,
                                                                                smol: LoadedModel) -> None:
    c = pd_cluster
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"P", "D"})
        await wait_router(bus)
        await _use_pd(bus)
        keep = prompt(smol, 90, seed=11)
        want = (await reference(bus, "D", [keep], 24))[0]
        rng = random.Random(5)
        async with Wire(bus) as wire:
            kept = await wire.send("kept", keep, 24)
            for i in range(6):
                await wire.send(f"gone{i}", prompt(smol, 200 + 40 * i, seed=50 + i), 64)
                await asyncio.sleep(rng.random() * 0.6)
                await bus.publish(bus.subjects.cancel(), Cancel(request_id=f"gone{i}", reason="racing"))
            await wire.all_ended(timeout_s=90)
        wire.check_all()
        for label, s in wire.streams.items():
            final = s.terminal
            if label.startswith("gone"):
                assert isinstance(final, Final) and final.finish_reason in ("cancelled", "length"), final
        assert isinstance(kept.terminal, Final) and kept.terminal.finish_reason == "length"
        assert_greedy_equal(smol, keep, kept.tokens, want)
        await wait_idle_no_leaks(bus, {"P", "D"})
    finally:
        await bus.close()
