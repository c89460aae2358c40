"""``--deterministic`` end to end: two engines on the real model in bf16, a router, and every built-in strategy
giving exactly the tokens of one engine doing the request alone — over shm and over the bus, cold and with the
prompt cached somewhere, at two prompt lengths, alone and beside other requests."""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Iterator

import pytest

from busserve.bus.client import Bus
from busserve.engine import quantized
from busserve.messages import Final, GenerateRequest, SamplingParams, SetStrategy, StrategyState, TokenChunk
from busserve.testing import ProcessCluster, live_view
from tests.helpers import wait_idle_no_leaks

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(quantized.kernel_unavailable_reason() is not None or not quantized.x16_available(),
                       reason="the deterministic mode needs busserve's AVX512-BF16 kernels"),
]

STRATEGIES = [("least_loaded", {}), ("pd", {}), ("balanced_pd", {"f": 0.5}), ("prefix_aware", {}),
              ("migrate", {"busy": 0, "min_prefix": 16}), ("adaptive", {})]
OVER_BUS = [("pd", {}), ("migrate", {"busy": 0, "min_prefix": 16})]


def _cluster(transport: str) -> Iterator[ProcessCluster]:
    """Two deterministic engines offering only ``transport``, and a router."""
    with ProcessCluster() as c:
        for eid in ("A", "B"):
            c.start_engine(eid, "--deterministic", "--dtype", "bfloat16", "--kv-pages", "512", "--transport",
                           transport, "--max-batch-tokens", "48", threads=1)
        c.start("router", "router", "--nats", c.url, "--id", "r0")
        c.wait_engines({"A", "B"})
        yield c


@pytest.fixture(scope="module")
def shm_cluster() -> Iterator[ProcessCluster]:
    yield from _cluster("shm")


@pytest.fixture(scope="module")
def bus_cluster() -> Iterator[ProcessCluster]:
    yield from _cluster("bus")


async def _tokens(bus: Bus, prompt: list[int], subject: str | None = None, n: int = 16) -> list[int]:
    req = GenerateRequest(prompt_token_ids=prompt, sampling=SamplingParams(max_tokens=n, temperature=0,
                                                                           ignore_eos=True))
    events = [e async for e in bus.generate(req, subject=subject, first_event_timeout_s=120)]
    assert isinstance(events[-1], Final), events[-1]
    return [t for e in events if isinstance(e, TokenChunk) for t in e.token_ids]


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "params"), STRATEGIES, ids=[f"{n}{p}" for n, p in STRATEGIES])
async def test_every_strategy_over_shm_gives_the_bits_of_one_engine_alone(
        shm_cluster: ProcessCluster, name: str, params: dict[str, object]) -> None:
    await _same_bits(shm_cluster, name, params, "shm")


@pytest.mark.asyncio
@pytest.mark.parametrize(("name", "params"), OVER_BUS, ids=[f"{n}{p}" for n, p in OVER_BUS])
async def test_kv_moving_strategies_over_the_bus_give_the_bits_of_one_engine_alone(
        bus_cluster: ProcessCluster, name: str, params: dict[str, object]) -> None:
    await _same_bits(bus_cluster, name, params, "bus")


async def _same_bits(c: ProcessCluster, name: str, params: dict[str, object], transport: str) -> None:
    bus = await Bus.connect(c.bus_config(), name="t")
    try:
        await live_view(bus, {"A", "B"})
        state = await bus.request(bus.subjects.control_strategy(), SetStrategy(name=name, params=params),
                                  StrategyState, timeout_s=10)
        assert state.name == name
        rng = random.Random(zlib.crc32(f"{transport}/{name}".encode()))
        for length in (20, 90):
            prompt = [rng.randrange(100, 40000) for _ in range(length)]
            want = await _tokens(bus, prompt, subject=bus.subjects.engine_action("A", "generate"))
            await wait_idle_no_leaks(bus, {"A", "B"})
            # Cold on the router's pick (A holds the prompt's pages now, B does not), then beside two others.
            assert await _tokens(bus, prompt) == want, (name, length, "alone")
            others = [[rng.randrange(100, 40000) for _ in range(37)] for _ in range(2)]
            got, *_ = await asyncio.gather(_tokens(bus, prompt), *(_tokens(bus, o, n=8) for o in others))
            assert got == want, (name, length, "beside two others")
        await wait_idle_no_leaks(bus, {"A", "B"})
    finally:
        await bus.close()
