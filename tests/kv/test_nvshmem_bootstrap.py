"""NVSHMEM's unique id exchanged over a real nats-server, and the transport refusing to run without a GPU.

The id is opaque bytes to the exchange, so random bytes are the real input here; nvshmem init itself needs GPUs.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.errors import MalformedMessage
from busserve.kv.transfer.nvshmem import TransportUnavailable, require_nvshmem, unavailable_reason
from busserve.kv.transfer.nvshmem_bootstrap import BootstrapError, bootstrap_unique_id, fetch_unique_id
from busserve.messages import NvshmemIdRequest


@pytest.mark.asyncio
async def test_every_rank_gets_rank_zeros_id_even_when_rank_zero_starts_last(bus_config: BusConfig) -> None:
    uid = os.urandom(128)
    buses = [await Bus.connect(bus_config, name=f"rank{r}") for r in range(3)]
    try:
        late = [asyncio.create_task(bootstrap_unique_id(buses[r], "g1", r, 3, make_id=bytes, timeout_s=10))
                for r in (1, 2)]
        await asyncio.sleep(0.5)  # ranks 1 and 2 are already asking; nobody answers yet
        got0, host = await bootstrap_unique_id(buses[0], "g1", 0, 3, make_id=lambda: uid, timeout_s=10)
        assert host is not None
        results = await asyncio.gather(*late)
        assert got0 == uid and all(got == uid and h is None for got, h in results)
        await asyncio.wait_for(host.all_served.wait(), 5)
        assert host.served == {1, 2}
        await host.close()
    finally:
        for b in buses:
            await b.close()


@pytest.mark.asyncio
async def test_a_rank_with_another_world_size_is_refused(bus: Bus, bus_config: BusConfig) -> None:
    _, host = await bootstrap_unique_id(bus, "g2", 0, 2, make_id=lambda: b"id", timeout_s=5)
    assert host is not None
    other = await Bus.connect(bus_config, name="rank1")
    try:
        with pytest.raises(BootstrapError, match="expects 4 ranks"):
            await fetch_unique_id(other, "g2", 1, 4, timeout_s=5)
        # Malformed bytes on the subject get an error reply; the host keeps serving.
        reply = await other.nc.request(bus.subjects.nvshmem_bootstrap("g2"), b"\xff\x00garbage", timeout=5)
        assert b"malformed" in reply.data or b"invalid" in reply.data
        assert await fetch_unique_id(other, "g2", 1, 2, timeout_s=5) == b"id"
    finally:
        await host.close()
        await other.close()


@pytest.mark.asyncio
async def test_no_rank_zero_is_a_bounded_wait(bus: Bus) -> None:
    start = time.monotonic()
    with pytest.raises(BootstrapError, match="did not answer within 1s"):
        await fetch_unique_id(bus, "nobody-home", 1, 2, timeout_s=1)
    assert time.monotonic() - start < 3


@pytest.mark.asyncio
async def test_bad_ranks_are_refused(bus: Bus) -> None:
    with pytest.raises(BootstrapError, match="outside a group of 2"):
        await bootstrap_unique_id(bus, "g3", 2, 2, make_id=bytes)
    with pytest.raises(MalformedMessage) as info:  # rank 0 never asks: it makes the id
        codec.decode(b'{"type":"nvshmem_id_request","group":"g3","rank":0,"world_size":2}', NvshmemIdRequest)
    assert info.value.error.field is not None and "rank" in info.value.error.field


def test_transport_refuses_to_run_without_a_gpu() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert "no CUDA device" in (unavailable_reason() or "")
    with pytest.raises(TransportUnavailable, match="nvshmem transport is unavailable"):
        require_nvshmem()
