"""A router killed with requests in hand, a nats-server restarted under load, and one client id used on two
routers at once: requests end (or carry on) as the lifecycle promises, and the cluster serves on afterwards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import EmbeddedNats
from busserve.engine.model_loader import LoadedModel
from busserve.errors import BusserveError
from busserve.messages import Error, Final, GenerateRequest, SamplingParams, StreamEvent, TokenChunk
from busserve.testing import ProcessCluster, Wire
from tests.faults.conftest import TINY_ENGINE, prompt, wait_router
from tests.faults.harness import reference
from tests.helpers import assert_greedy_equal, live_view, wait_idle_no_leaks

pytestmark = pytest.mark.slow


@pytest.mark.asyncio
async def test_a_killed_router_leaves_no_request_hanging(logs: Path, smol: LoadedModel) -> None:
    """Requests the router had routed but not started: their clients hear within seconds that the router is gone
    (its heartbeat stops), the parked receives lapse with an Error on the wire, and nothing leaks."""
    with ProcessCluster(log_dir=str(logs)) as c:
        c.start_engine("P", "--dtype", "float32", "--kv-memory", "192MiB", "--max-batch-tokens", "16",
                       "--max-prefill-tokens", "16", "--roles", "prefill", threads=1)
        c.start_engine("D", "--dtype", "float32", "--kv-memory", "192MiB", "--roles", "decode", threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--strategy", "pd", "--lease-s", "4")
        await asyncio.to_thread(c.wait_engines, {"P", "D"})
        bus = await Bus.connect(c.bus_config(), name="t")
        try:
            await live_view(bus, {"P", "D"})
            await wait_router(bus)
            async with Wire(bus) as wire:
                readers = []
                for i in range(4):
                    label = f"r{i}"
                    cm = bus.open_stream(f"{wire.prefix}.{label}")
                    readers.append((cm, await cm.__aenter__()))
                    await wire.send(label, prompt(smol, 500, seed=30 + i), 8)
                await asyncio.sleep(1.0)
                killed_at = time.monotonic()
                c.kill("r0")

                async def client_view(reader) -> tuple[float, StreamEvent]:  # type: ignore[no-untyped-def]
                    last = None
                    async for event in reader.events(first_event_timeout_s=60):
                        last = event
                    return time.monotonic() - killed_at, last

                seen = await asyncio.gather(*(client_view(r) for _, r in readers))
                for cm, _ in readers:
                    await cm.__aexit__(None, None, None)
                await wire.all_ended(timeout_s=30)
            for after, last in seen:
                if isinstance(last, Error):
                    # Whichever comes first: the client sees the router's heartbeat stop, or the receive lapses.
                    assert last.code in ("router_failure", "lease_expired") and after < 8.0, (after, last)
                else:
                    assert isinstance(last, Final), last  # it had started on D before the router died
            wire.check_all()
            assert all(isinstance(s.terminal, (Error, Final)) for s in wire.streams.values())
            assert any(isinstance(s.terminal, Error) and s.terminal.code == "lease_expired"
                       for s in wire.streams.values())
            await wait_idle_no_leaks(bus, {"P", "D"}, timeout_s=60)
        finally:
            await bus.close()


@pytest.fixture
def restartable(tiny_dir: Path, logs: Path, tmp_path: Path) -> Iterator[ProcessCluster]:
    with ProcessCluster(nats=EmbeddedNats(data_dir=tmp_path / "nats"), log_dir=str(logs)) as c:
        for eid in ("A", "B"):
            c.start_engine(eid, "--model", str(tiny_dir), *TINY_ENGINE, threads=1)
        c.start("r0", "router", "--nats", c.url, "--id", "r0", "--tokenizer", str(tiny_dir))
        c.wait_engines({"A", "B"})
        yield c


async def _ask(bus: Bus, p: list[int], n: int) -> tuple[list[int], StreamEvent | None, str]:
    """Through busserve's client: tokens, the terminal event, or what went wrong (a bounded wait either way)."""
    req = GenerateRequest(prompt_token_ids=p, sampling=SamplingParams(max_tokens=n, temperature=0.0,
                                                                      ignore_eos=True))
    tokens: list[int] = []
    last = None
    try:
        async for event in bus.generate(req, first_event_timeout_s=60, idle_timeout_s=30):
            last = event
            if isinstance(event, TokenChunk):
                tokens.extend(event.token_ids)
    except BusserveError as exc:
        return tokens, None, f"{exc.code}: {exc}"
    return tokens, last, ""


@pytest.mark.asyncio
async def test_nats_server_restart_under_load(restartable: ProcessCluster, tiny: LoadedModel) -> None:
    """Every stream either completes — contiguous, the right tokens — or ends with an Error naming what happened;
    none hangs; afterwards the cluster serves again and has leaked nothing."""
    c = restartable
    bus = await Bus.connect(BusConfig(servers=[c.url], max_reconnect_attempts=-1), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        prompts = [prompt(tiny, 20 + i, seed=400 + i) for i in range(8)]
        want = await reference(bus, "A", prompts, 300)
        started = time.monotonic()
        tasks = [asyncio.create_task(_ask(bus, p, 300)) for p in prompts]
        await asyncio.sleep(0.3)
        c.nats.stop()
        await asyncio.sleep(0.5)
        c.nats.start()
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        assert time.monotonic() - started < 120
        completed = 0
        for p, w, (tokens, last, problem) in zip(prompts, want, results, strict=True):
            if isinstance(last, Final):
                assert last.finish_reason == "length"
                assert_greedy_equal(tiny, p, tokens, w)
                completed += 1
            else:
                assert isinstance(last, Error) or problem, (last, problem)
        # The cluster serves again once everyone has reconnected.
        await live_view(bus, {"A", "B"})
        await wait_router(bus)
        tokens, last, problem = await _ask(bus, prompts[0], 16)
        assert isinstance(last, Final), (last, problem)
        assert tokens == want[0][:16]
        await wait_idle_no_leaks(bus, {"A", "B"}, timeout_s=60)
        print(f"{completed}/8 streams completed across the restart")
    finally:
        await bus.close()


@pytest.mark.asyncio
async def test_one_client_id_on_two_routers_at_once(tiny_cluster: ProcessCluster, tiny: LoadedModel,
                                                    tiny_dir: Path) -> None:
    """Routers give engines ids of their own: two requests under one client id, routed by two routers, both run
    to completion (neither aborts the other)."""
    c = tiny_cluster
    c.start("r1", "router", "--nats", c.url, "--id", "r1", "--tokenizer", str(tiny_dir))
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        await wait_router(bus, "r0")
        await wait_router(bus, "r1")
        prompts = [prompt(tiny, 25 + i, seed=500 + i) for i in range(6)]
        want = await reference(bus, "A", prompts, 40)

        async def one(i: int, p: list[int]) -> list[int]:
            req = GenerateRequest(request_id=f"dup-{i // 2}", prompt_token_ids=p,
                                  sampling=SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
            events = [e async for e in bus.generate(req, first_event_timeout_s=60)]
            assert isinstance(events[-1], Final) and events[-1].finish_reason == "length", events[-1]
            assert all(e.request_id == f"dup-{i // 2}" for e in events)
            return [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids]

        pairs = [prompts[i // 2] for i in range(12)]  # each prompt sent twice under the same id
        got = await asyncio.gather(*(one(i, p) for i, p in enumerate(pairs)))
        for i, tokens in enumerate(got):
            assert_greedy_equal(tiny, pairs[i], tokens, want[i // 2])
        await wait_idle_no_leaks(bus, {"A", "B"})
    finally:
        c.kill("r1", sig=15)
        await bus.close()
