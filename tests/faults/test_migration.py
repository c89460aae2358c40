"""Live migration and drain with real processes: an engine told to drain hands its running requests to the other
engine while they decode — the client's stream goes on at the next index, one terminal event, the greedy text of an
undisturbed run — then stops. Faults during it: a client cancel, the target killed, the source killed, and
requests that share a cached prefix (page refcounts)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from busserve.bus.client import Bus
from busserve.engine.model_loader import LoadedModel
from busserve.messages import Cancel, Drain, EngineStatus, Final, RouterStatus, StreamStatus
from busserve.testing import ProcessCluster, Stream, Wire
from tests.faults.conftest import TINY_ENGINE, prompt, wait_router
from tests.faults.harness import engine_pid, reference, shm_segments_of
from tests.helpers import assert_greedy_equal, live_view, wait_idle_no_leaks

pytestmark = pytest.mark.slow

MAX_TOKENS = 240


def owners(stream: Stream) -> list[str]:
    return [e.owner for _, e in stream.events if isinstance(e, StreamStatus) and e.owner_kind == "engine"]


async def router_status(bus: Bus) -> RouterStatus:
    return await wait_router(bus)


async def drain(bus: Bus, engine_id: str, grace_s: float = 60.0) -> EngineStatus:
    return await bus.request(bus.subjects.engine_action(engine_id, "drain"), Drain(grace_s=grace_s), EngineStatus,
                             timeout_s=5)


async def wait_stopped(c: ProcessCluster, name: str, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rc = c.procs[name].poll()
        if rc is not None:
            return rc
        await asyncio.sleep(0.1)
    raise AssertionError(f"{name} did not stop within {timeout_s}s")


def cluster_with(tiny_dir: Path, logs: Path, *engine_args: str) -> ProcessCluster:
    c = ProcessCluster(log_dir=str(logs))
    c.__enter__()
    for eid in ("A", "B"):
        c.start_engine(eid, "--model", str(tiny_dir), *TINY_ENGINE, *engine_args, threads=1)
    c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
    c.wait_engines({"A", "B"})
    return c


@pytest.fixture
def bus_cluster(tiny_dir: Path, logs: Path) -> Iterator[ProcessCluster]:
    """Engines that move KV over the bus only (as engines on two hosts do)."""
    c = cluster_with(tiny_dir, logs, "--transport", "bus")
    try:
        yield c
    finally:
        c.__exit__(None, None, None)


async def start(wire: Wire, prompts: list[list[int]], n: int = MAX_TOKENS, at_least: int = 8) -> list[Stream]:
    streams = [await wire.send(f"s{i}", p, n) for i, p in enumerate(prompts)]
    await wire.wait(lambda: all(len(s.tokens) >= at_least for s in streams), 60, f"{at_least} tokens on every stream")
    return streams


def check_complete(tiny: LoadedModel, wire: Wire, prompts: list[list[int]], want: list[list[int]]) -> None:
    wire.check_all()  # one terminal event each, indices contiguous, nothing after it
    for p, s, w in zip(prompts, wire.streams.values(), want, strict=True):
        final = s.terminal
        assert isinstance(final, Final) and final.finish_reason == "length", (s.label, final)
        assert final.usage is not None and final.usage.completion_tokens == len(w)
        assert final.usage.prompt_tokens == len(p)
        assert_greedy_equal(tiny, p, s.tokens, w)


async def drain_under_streams(c: ProcessCluster, tiny: LoadedModel, n_streams: int, seed: int,
                              by_signal: bool) -> None:
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        prompts = [prompt(tiny, 24 + 3 * i, seed=seed + i) for i in range(n_streams)]
        want = await reference(bus, "A", prompts, MAX_TOKENS)
        # Before the streams start: waiting for a heartbeat after it would let a fast machine finish them first.
        pids = {e: await engine_pid(bus, e) for e in ("A", "B")}
        async with Wire(bus) as wire:
            streams = await start(wire, prompts)
            victim = owners(streams[0])[-1]
            other = "B" if victim == "A" else "A"
            pid = pids[victim]
            on_victim = [s for s in streams if owners(s)[-1] == victim]
            drained_at = time.monotonic()
            if by_signal:
                c.procs[victim].send_signal(signal.SIGTERM)
            else:
                assert (await drain(bus, victim)).state == "draining"
            assert await wait_stopped(c, victim) == 0
            stopped_after = time.monotonic() - drained_at
            await wire.all_ended(timeout_s=90)
        check_complete(tiny, wire, prompts, want)
        for s in on_victim:
            if len(s.tokens) == MAX_TOKENS and s.token_times()[-1] > drained_at:
                assert owners(s)[-1] == other, f"{s.label} did not move"
                times = [t for t in s.token_times() if t > drained_at - 1]
                gap = max(b - a for a, b in itertools.pairwise(times))
                assert gap < 1.5, f"{s.label} stalled {gap:.2f}s: a live move stops a request for one short round"
        # It stopped long before its requests would have finished there: they moved, none was recomputed.
        assert stopped_after < 20, stopped_after
        status = await router_status(bus)
        assert status.failed == 0 and status.resumed == 0, status
        assert status.migrated >= len([s for s in on_victim if owners(s)[-1] == other]) > 0, status
        await wait_idle_no_leaks(bus, {other})
        assert not shm_segments_of(victim, pid)
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_drain_under_16_streams_moves_every_request_live(tiny_cluster: ProcessCluster,
                                                               tiny: LoadedModel) -> None:
    """SIGTERM drains."""
    await drain_under_streams(tiny_cluster, tiny, 16, seed=500, by_signal=True)


@pytest.mark.asyncio
async def test_drain_over_the_bus_transport(bus_cluster: ProcessCluster, tiny: LoadedModel) -> None:
    """The operator's drain message (what `busserve strategy drain` sends)."""
    await drain_under_streams(bus_cluster, tiny, 6, seed=600, by_signal=False)


@pytest.mark.asyncio
async def test_cancels_racing_migrations(tiny_cluster: ProcessCluster, tiny: LoadedModel) -> None:
    """Half the streams are cancelled while their engine drains: each ends once — Final(cancelled), or 'length'
    if it had finished — and neither engine keeps a page."""
    c = tiny_cluster
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        prompts = [prompt(tiny, 20 + i, seed=700 + i) for i in range(8)]
        async with Wire(bus) as wire:
            streams = await start(wire, prompts)
            victim = owners(streams[0])[-1]
            other = "B" if victim == "A" else "A"
            await drain(bus, victim)
            for i, s in enumerate(streams):
                if i % 2 == 0:
                    await bus.publish(bus.subjects.cancel(), Cancel(request_id=s.label, reason="race"))
                    await asyncio.sleep(0.003 * i)
            await wire.all_ended(timeout_s=90)
        wire.check_all()
        for i, s in enumerate(streams):
            final = s.terminal
            assert isinstance(final, Final), (s.label, final)
            assert final.finish_reason == ("cancelled" if i % 2 == 0 else "length") or \
                (final.finish_reason == "length" and len(s.tokens) == MAX_TOKENS), (s.label, final)
        assert await wait_stopped(c, victim) == 0
        await wait_idle_no_leaks(bus, {other})
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_target_killed_while_requests_move_to_it(tiny_cluster: ProcessCluster, tiny: LoadedModel) -> None:
    """The draining engine's requests stay with it (or come back) when their target dies mid-move; the target's own
    requests resume on the draining engine — the only one left — and every stream completes. The target is stopped
    (SIGSTOP) before the drain, so that the moves are under way, unanswered, when it is killed: with a live target
    the tiny model's moves finish in milliseconds and the drained engine is gone before anything can die."""
    c = tiny_cluster
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        prompts = [prompt(tiny, 24 + i, seed=800 + i) for i in range(8)]
        # Long enough that the draining engine's own requests (decoding on while their moves wait) outlive the
        # kill: with 240 tokens a fast machine finished them within the second and the drained engine was gone.
        n = 1200
        want = await reference(bus, "A", prompts, n)
        async with Wire(bus) as wire:
            streams = await start(wire, prompts, n)
            victim = owners(streams[0])[-1]
            target = "B" if victim == "A" else "A"
            c.procs[target].send_signal(signal.SIGSTOP)
            await drain(bus, victim)
            await asyncio.sleep(0.5)  # moves to the target begin and wait on it
            c.kill(target)
            await wire.all_ended(timeout_s=120)
        check_complete(tiny, wire, prompts, want)
        assert await wait_stopped(c, victim) == 0
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_source_killed_during_its_drain(tiny_cluster: ProcessCluster, tiny: LoadedModel) -> None:
    """Requests not yet moved when the draining engine dies are resumed on the other by recompute."""
    c = tiny_cluster
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        prompts = [prompt(tiny, 24 + i, seed=900 + i) for i in range(12)]
        want = await reference(bus, "A", prompts, MAX_TOKENS)
        async with Wire(bus) as wire:
            streams = await start(wire, prompts)
            victim = owners(streams[0])[-1]
            other = "B" if victim == "A" else "A"
            await drain(bus, victim)
            await wire.wait(lambda: any(owners(s)[-1] == other and victim in owners(s) for s in streams), 30,
                            "a first request moved")
            c.kill(victim)
            await wire.all_ended(timeout_s=120)
        check_complete(tiny, wire, prompts, want)
        await wait_idle_no_leaks(bus, {other})
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_migrating_requests_that_share_a_cached_prefix(tiny_cluster: ProcessCluster,
                                                             tiny: LoadedModel) -> None:
    """Requests sharing prefix pages on the source move one by one; the target reuses the prefix it caches after
    the first; page refcounts stay right on both sides (nothing leaked, nothing freed twice)."""
    c = tiny_cluster
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        shared = prompt(tiny, 96, seed=1000)
        prompts = [shared + prompt(tiny, 8 + i, seed=1001 + i) for i in range(6)]
        want = await reference(bus, "A", prompts, MAX_TOKENS)
        async with Wire(bus) as wire:
            streams = await start(wire, prompts)
            victim = owners(streams[0])[-1]
            other = "B" if victim == "A" else "A"
            await drain(bus, victim)
            assert await wait_stopped(c, victim) == 0
            await wire.all_ended(timeout_s=90)
        check_complete(tiny, wire, prompts, want)
        await wait_idle_no_leaks(bus, {other})
        status = await router_status(bus)
        assert status.failed == 0 and status.resumed == 0, status
    finally:
        await bus.close()
