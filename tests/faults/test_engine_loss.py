"""An engine lost mid-stream (SIGKILL), frozen past the heartbeat limit (SIGSTOP … SIGCONT), or stopped
(SIGTERM): every request still ends with exactly one terminal event, its tokens contiguous, its greedy text the
uninterrupted text, and nothing is left behind — pages, or the dead engine's shared-memory segment."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from busserve.bus.client import Bus
from busserve.engine.model_loader import LoadedModel
from busserve.messages import Final, StreamStatus
from busserve.testing import ProcessCluster, Stream, Wire
from tests.faults.conftest import TINY_ENGINE, prompt, wait_router
from tests.faults.harness import engine_pid, reference, shm_segments_of
from tests.helpers import assert_greedy_equal, live_view, wait_idle_no_leaks

pytestmark = pytest.mark.slow

N_STREAMS = 16
MAX_TOKENS = 300


def owner(stream: Stream) -> str | None:
    """The engine that holds the request now (its last StreamStatus)."""
    engines = [e.owner for _, e in stream.events if isinstance(e, StreamStatus) and e.owner_kind == "engine"]
    return engines[-1] if engines else None


async def start_streams(bus: Bus, wire: Wire, prompts: list[list[int]], n: int) -> list[Stream]:
    streams = [await wire.send(f"s{i}", p, n) for i, p in enumerate(prompts)]
    await wire.wait(lambda: all(len(s.tokens) >= 8 for s in streams), 60, "8 tokens on every stream")
    return streams


def assert_streams_complete(tiny: LoadedModel, wire: Wire, prompts: list[list[int]], want: list[list[int]]) -> None:
    wire.check_all()
    for i, (s, w) in enumerate(zip(wire.streams.values(), want, strict=True)):
        final = s.terminal
        assert isinstance(final, Final) and final.finish_reason == "length", (s.label, final)
        assert final.usage is not None and final.usage.completion_tokens == MAX_TOKENS
        assert final.usage.prompt_tokens == len(prompts[i])
        assert_greedy_equal(tiny, prompts[i], s.tokens, w)


@pytest.mark.asyncio
async def test_sigkill_of_the_decode_engine_under_16_streams(tiny_cluster: ProcessCluster, tiny: LoadedModel,
                                                             tiny_dir: Path) -> None:
    c = tiny_cluster
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        prompts = [prompt(tiny, 24 + i, seed=100 + i) for i in range(N_STREAMS)]
        want = await reference(bus, "A", prompts, MAX_TOKENS)
        async with Wire(bus) as wire:
            streams = await start_streams(bus, wire, prompts, MAX_TOKENS)
            victim = owner(streams[0])
            assert victim in ("A", "B")
            survivor = "B" if victim == "A" else "A"
            dead_pid = await engine_pid(bus, victim)
            hit = [s for s in streams if owner(s) == victim and len(s.tokens) < MAX_TOKENS]
            assert hit, "every stream on the victim finished before it could be killed"
            killed_at = time.monotonic()
            c.kill(victim)
            await wire.all_ended(timeout_s=90)
        assert_streams_complete(tiny, wire, prompts, want)
        # Recovery: the next token of every stream the kill interrupted came from the survivor within seconds.
        for s in hit:
            after = [t for t in s.token_times() if t > killed_at]
            if after:
                assert after[0] - killed_at < 8.0, f"{s.label} waited {after[0] - killed_at:.1f}s"
                assert owner(s) == survivor
        await wait_idle_no_leaks(bus, {survivor})
        # The dead engine's shared-memory pool goes as soon as an engine starts on this host.
        assert shm_segments_of(victim, dead_pid), "the killed engine should have left its segment"
        c.start_engine(victim, "--model", str(tiny_dir), *TINY_ENGINE, threads=1)
        await asyncio.to_thread(c.wait_engines, {victim})
        assert not shm_segments_of(victim, dead_pid)
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_sigstop_past_the_heartbeat_limit_then_sigcont(tiny_cluster: ProcessCluster, tiny: LoadedModel,
                                                             logs: Path) -> None:
    """The frozen engine's requests resume elsewhere; woken up, it publishes nothing more on their streams (it
    fences itself) and goes on serving new requests."""
    c = tiny_cluster
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        prompts = [prompt(tiny, 30 + i, seed=200 + i) for i in range(8)]
        want = await reference(bus, "A", prompts, MAX_TOKENS)
        async with Wire(bus) as wire:
            streams = await start_streams(bus, wire, prompts, MAX_TOKENS)
            victim = owner(streams[0])
            assert victim in ("A", "B")
            proc = c.procs[victim]
            proc.send_signal(signal.SIGSTOP)
            try:
                await wire.all_ended(timeout_s=90, linger_s=0)
            finally:
                proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(4.0)  # it wakes, finishes its step, and must publish nothing on those streams
        assert_streams_complete(tiny, wire, prompts, want)
        log = (logs / f"{victim}.log").read_text(errors="replace")
        assert "fencing itself" in log, log[-3000:]
        # ... and it serves again.
        again = await reference(bus, victim, prompts[:1], 8)
        assert again[0] == want[0][:8]
        await wait_idle_no_leaks(bus, {"A", "B"})
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_sigint_hands_requests_back_at_once(tiny_cluster: ProcessCluster, tiny: LoadedModel) -> None:
    """An engine stopped at once (SIGINT; SIGTERM drains instead, tests/faults/test_migration.py) says so in its last
    heartbeat; the router resumes its requests without waiting out the heartbeat limit."""
    c = tiny_cluster
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        prompts = [prompt(tiny, 20 + i, seed=300 + i) for i in range(6)]
        want = await reference(bus, "A", prompts, MAX_TOKENS)
        async with Wire(bus) as wire:
            streams = await start_streams(bus, wire, prompts, MAX_TOKENS)
            victim = owner(streams[0])
            assert victim in ("A", "B")
            hit = [s for s in streams if owner(s) == victim]
            pid = await engine_pid(bus, victim)
            stopped_at = time.monotonic()
            c.procs[victim].send_signal(signal.SIGINT)  # not c.kill: its wait would hold up this event loop
            await wire.all_ended(timeout_s=60)
        assert_streams_complete(tiny, wire, prompts, want)
        for s in hit:
            after = [t for t in s.token_times() if t > stopped_at]
            if after:
                assert after[0] - stopped_at < 2.5, f"{s.label} waited {after[0] - stopped_at:.1f}s"
        assert not shm_segments_of(victim, pid), "a stopped engine removes its own shared-memory pool"
    finally:
        await bus.close()
