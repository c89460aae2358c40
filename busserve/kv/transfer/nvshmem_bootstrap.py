"""Bootstrapping an NVSHMEM group over the bus instead of MPI.

NVSHMEM's unique-id initialisation needs every process of a group to call ``init`` with the same opaque id, made
by rank 0. Engines already share a bus, so rank 0 answers requests for the id on
``<root>.nvshmem.<group>.id`` and the other ranks ask until it does (rank 0 may start last):

    uid = await bootstrap_unique_id(bus, "pd-pair-1", rank, world_size, make_id=lambda: bytes(nvshmem_uid))

The id is opaque bytes here; turning nvshmem4py's UniqueId into bytes and back belongs to the GPU transport.
A rank that names a different world size than rank 0 is refused (the group would hang in ``init``), and every
wait is bounded by ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nats.aio.msg import Msg

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.errors import BusserveError, MalformedMessage, NoResponders, RemoteError, RequestTimeout
from busserve.messages import Error, NvshmemId, NvshmemIdRequest


class BootstrapError(BusserveError):
    code = "transfer_failed"


class UniqueIdHost:
    """Rank 0's side: answer requests for the group's id until every other rank has it (or until closed)."""

    def __init__(self, bus: Bus, group: str, world_size: int, unique_id: bytes) -> None:
        self.bus, self.group, self.world_size, self.unique_id = bus, group, world_size, unique_id
        self.served: set[int] = set()
        self.all_served = asyncio.Event()
        self._sub = None

    async def start(self) -> None:
        self._sub = await self.bus.subscribe(self.bus.subjects.nvshmem_bootstrap(self.group), self._on_request)

    async def close(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_request(self, msg: Msg) -> None:
        try:
            req = codec.decode(msg.data, NvshmemIdRequest, msg.headers)
        except MalformedMessage as exc:
            await self.bus.respond(msg, exc.error)
            return
        problem = None
        if req.group != self.group:
            problem = ("group", f"asked for group {req.group!r} on group {self.group!r}'s subject")
        elif req.world_size != self.world_size:
            problem = ("world_size", f"rank {req.rank} expects {req.world_size} ranks; group {self.group!r} has "
                                     f"{self.world_size}")
        elif req.rank >= self.world_size:
            problem = ("rank", f"rank {req.rank} is outside group {self.group!r} of {self.world_size}")
        if problem is not None:
            await self.bus.respond(msg, Error(code="invalid_request", message=problem[1], field=problem[0]))
            return
        await self.bus.respond(msg, NvshmemId(group=self.group, world_size=self.world_size,
                                              unique_id=self.unique_id))
        self.served.add(req.rank)
        if len(self.served) == self.world_size - 1:
            self.all_served.set()


async def fetch_unique_id(bus: Bus, group: str, rank: int, world_size: int, *, timeout_s: float = 60.0,
                          retry_s: float = 0.2) -> bytes:
    """A rank other than 0: ask rank 0 for the id, retrying while it is not up yet."""
    deadline = time.monotonic() + timeout_s
    subject = bus.subjects.nvshmem_bootstrap(group)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BootstrapError(f"rank 0 of nvshmem group {group!r} did not answer within {timeout_s:g}s")
        try:
            reply = await bus.request(subject, NvshmemIdRequest(group=group, rank=rank, world_size=world_size),
                                      NvshmemId, timeout_s=min(left, 5.0))
            return reply.unique_id
        except RemoteError as exc:
            raise BootstrapError(f"nvshmem group {group!r} refused rank {rank}: {exc.error.message}") from exc
        except (NoResponders, RequestTimeout):
            await asyncio.sleep(min(retry_s, max(0.0, deadline - time.monotonic())))


async def bootstrap_unique_id(bus: Bus, group: str, rank: int, world_size: int, make_id: Callable[[], bytes], *,
                              timeout_s: float = 60.0) -> tuple[bytes, UniqueIdHost | None]:
    """The group's unique id for this rank. Rank 0 makes it and returns the (started) host that keeps serving it
    until the caller closes it; the others fetch it."""
    if not 0 <= rank < world_size:
        raise BootstrapError(f"rank {rank} is outside a group of {world_size}")
    if rank == 0:
        host = UniqueIdHost(bus, group, world_size, make_id())
        await host.start()
        return host.unique_id, host
    return await fetch_unique_id(bus, group, rank, world_size, timeout_s=timeout_s), None
