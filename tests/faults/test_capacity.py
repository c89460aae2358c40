"""Capacity is checked, then queued, never spun: a prompt that can never fit is refused at once with the numbers, a
context the pool cannot hold is refused at start-up, and long prompts arriving faster than they are served wait
(PD falls back to the receiver when it cannot reserve) — no failures below the queue bound."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from busserve.bus.client import Bus
from busserve.engine.model_loader import LoadedModel
from busserve.messages import Error, Final, GenerateRequest, SamplingParams, SetStrategy, StrategyState
from busserve.testing import ProcessCluster, Wire
from tests.faults.conftest import prompt, wait_router
from tests.helpers import live_view, wait_idle_no_leaks

pytestmark = pytest.mark.slow


@pytest.mark.asyncio
async def test_a_prompt_that_can_never_fit_is_refused_at_once(tiny_dir: Path, tiny: LoadedModel, logs: Path) -> None:
    with ProcessCluster(log_dir=str(logs)) as c:
        # 64 pages of 16 tokens: 1,024 tokens, where the model's context is 2,048.
        c.start_engine("S", "--model", str(tiny_dir), "--dtype", "float32", "--kv-pages", "64", threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        statuses = await asyncio.to_thread(c.wait_engines, {"S"})
        assert statuses["S"].max_model_len == 1024  # the context shrinks to what the pool holds for one request
        bus = await Bus.connect(c.bus_config(), name="t")
        try:
            await wait_router(bus)
            for subject in (None, bus.subjects.engine_action("S", "generate")):  # through the router, and direct
                t0 = time.monotonic()
                req = GenerateRequest(prompt_token_ids=prompt(tiny, 2000, seed=1), sampling=SamplingParams(
                    max_tokens=4))
                events = [e async for e in bus.generate(req, subject=subject, first_event_timeout_s=30)]
                assert time.monotonic() - t0 < 3.0
                assert len(events) == 1 and isinstance(events[0], Error), events
                err = events[0]
                assert err.code == "prompt_too_long" and err.field == "prompt", err
                assert "2000" in err.message and "1024" in err.message, err.message
            # ... and the engine serves what fits.
            req = GenerateRequest(prompt_token_ids=prompt(tiny, 900, seed=2), sampling=SamplingParams(
                max_tokens=4, ignore_eos=True))
            events = [e async for e in bus.generate(req, first_event_timeout_s=30)]
            assert isinstance(events[-1], Final)
        finally:
            await bus.close()


def test_start_up_refuses_a_context_the_pool_cannot_hold(tiny_dir: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "busserve.cli", "engine", "--model", str(tiny_dir), "--dtype",
                          "float32", "--kv-pages", "64", "--max-model-len", "2048", "--nats", "nats://127.0.0.1:1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--max-model-len 2048 does not fit the KV pool" in out.stdout and "1024 tokens" in out.stdout


@pytest.mark.asyncio
@pytest.mark.parametrize("strategy", ["pd", "adaptive"])
async def test_long_prompts_faster_than_served_all_complete(tiny_dir: Path, tiny: LoadedModel, logs: Path,
                                                            strategy: str) -> None:
    """24 prompts of 700 tokens at once on two engines whose pools hold ~3 reservations each: PD cannot reserve
    for most of them, waits or falls back, and every one completes."""
    with ProcessCluster(log_dir=str(logs)) as c:
        for eid in ("A", "B"):
            c.start_engine(eid, "--model", str(tiny_dir), "--dtype", "float32", "--kv-pages", "160",
                           "--max-batch-tokens", "64", threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        await asyncio.to_thread(c.wait_engines, {"A", "B"})
        bus = await Bus.connect(c.bus_config(), name="t")
        try:
            await live_view(bus, {"A", "B"})
            await wait_router(bus)
            state = await bus.request(bus.subjects.control_strategy(), SetStrategy(name=strategy), StrategyState,
                                      timeout_s=10)
            assert state.name == strategy
            async with Wire(bus) as wire:
                for i in range(24):
                    await wire.send(f"o{i}", prompt(tiny, 700, seed=600 + i), 16)
                await wire.all_ended(timeout_s=180)
            wire.check_all()
            failed = {label: s.terminal for label, s in wire.streams.items() if not isinstance(s.terminal, Final)}
            assert not failed, failed
            await wait_idle_no_leaks(bus, {"A", "B"})
        finally:
            await bus.close()

