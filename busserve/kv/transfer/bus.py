"""``bus``: KV over NATS, wherever the cluster reaches. Per-layer chunks sized under the server's max_payload.

Sender: each layer's K and V for the positions being sent are packed into :class:`KVChunk` messages on the
receiver's data subject, then a :class:`KVCommit` request carries the number of chunks; the receiver replies once
it has written that many, so remote_send replies only after every byte has landed.

Receiver: :class:`LandingZones` holds the reserved slots of each parked request that accepts bus writes and
writes arriving chunks into the pool. A zone is closed (under the same lock) before its pages are released or
handed to the scheduler, so a late chunk can never land in pages that now belong to someone else.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from busserve.bus.client import Bus
from busserve.kv.storage import KVStorage, np_dtype
from busserve.kv.transfer.base import KVTransport, KVWriter, TransferError, check_compatible, check_range
from busserve.messages import KVAddress, KVChunk, KVCommit, KVCommitReply

# Room for the chunk's other fields and the NATS headers.
CHUNK_OVERHEAD_BYTES = 4096
# Chunks smaller than a layer let the receiver land one while the next is on the wire.
# (Measured on loopback with a 92 MB context: 256 KiB 0.36, 1 MiB 0.40, 8 MB 0.44 GB/s.)
DEFAULT_CHUNK_BYTES = int(os.environ.get("BUSSERVE_KV_CHUNK_BYTES", str(4 << 20)))
PUBLISH_TIMEOUT_S = 30.0


class BusWriter(KVWriter):
    def __init__(self, addr: KVAddress, src: KVStorage, executor: ThreadPoolExecutor, bus: Bus,
                 loop: asyncio.AbstractEventLoop, commit_timeout_s: float) -> None:
        super().__init__(addr, src, executor)
        self.bus = bus
        self.loop = loop
        self.subject = bus.subjects.kv_data(addr.engine_id)
        self.chunks = 0
        self.commit_timeout_s = commit_timeout_s
        lay = src.layout
        per_token = 2 * lay.num_kv_heads * lay.head_dim * src.data.element_size()
        limit = min(bus.max_payload - CHUNK_OVERHEAD_BYTES, DEFAULT_CHUNK_BYTES)
        self.tokens_per_chunk = max(1, limit // per_token)

    def _send(self, msg: KVChunk | KVCommit) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.bus.publish(self.subject, msg), self.loop)
        fut.result(timeout=PUBLISH_TIMEOUT_S)

    def _write(self, layer: int, src_pages: list[int], begin: int, end: int) -> int:
        check_range(self.addr, begin, end)  # validate before sending anything
        total = 0
        for a in range(begin, end, self.tokens_per_chunk):
            b = min(end, a + self.tokens_per_chunk)
            data = self.src.read_positions(layer, src_pages, a, b).data
            self._send(KVChunk(request_id=self.addr.request_id, layer=layer, begin=a, end=b,
                               data=data))  # type: ignore[arg-type]  # msgspec encodes any buffer as bin
            self.chunks += 1
            total += data.nbytes
        return total

    def _commit(self) -> None:
        commit = KVCommit(request_id=self.addr.request_id, chunks=self.chunks, nbytes=self.bytes_written)
        fut = asyncio.run_coroutine_threadsafe(
            self.bus.request(self.subject, commit, KVCommitReply, timeout_s=self.commit_timeout_s), self.loop
        )
        reply = fut.result(timeout=self.commit_timeout_s + 5)
        if reply.chunks != self.chunks:
            raise TransferError(f"receiver wrote {reply.chunks} of {self.chunks} chunks")


class BusTransport(KVTransport):
    name = "bus"

    def __init__(self, bus: Bus, loop: asyncio.AbstractEventLoop, executor: ThreadPoolExecutor, engine_id: str,
                 commit_timeout_s: float = 30.0) -> None:
        self.bus = bus
        self.engine_id = engine_id
        self.loop = loop
        self._executor = executor
        self.commit_timeout_s = commit_timeout_s

    def receiver_handle(self) -> str:
        return self.bus.subjects.kv_data(self.engine_id)

    def open_writer(self, addr: KVAddress, src: KVStorage) -> KVWriter:
        check_compatible(addr, src)
        return BusWriter(addr, src, self._executor, self.bus, self.loop, self.commit_timeout_s)


class _Zone:
    __slots__ = ("addr", "bytes", "chunks")

    def __init__(self, addr: KVAddress) -> None:
        self.addr = addr
        self.chunks = 0
        self.bytes = 0


class LandingZones:
    """Receiver side of the bus transport: reserved slots that accept chunks, per parked request."""

    def __init__(self, storage: KVStorage) -> None:
        self.storage = storage
        self._zones: dict[str, _Zone] = {}
        self._lock = threading.Lock()

    def open(self, addr: KVAddress) -> None:
        with self._lock:
            self._zones[addr.request_id] = _Zone(addr)

    def close(self, request_id: str) -> None:
        """No more writes for this request (called before its pages move on)."""
        with self._lock:
            self._zones.pop(request_id, None)

    def write(self, chunk: KVChunk) -> None:
        lay = self.storage.layout
        n = chunk.end - chunk.begin
        expected = 2 * n * lay.num_kv_heads * lay.head_dim * self.storage.data.element_size()
        if n <= 0 or len(chunk.data) != expected:
            raise TransferError(f"chunk for {chunk.request_id} layer {chunk.layer} has {len(chunk.data)} bytes, "
                                f"expected {expected}")
        if not 0 <= chunk.layer < lay.num_layers:
            raise TransferError(f"chunk for {chunk.request_id}: no layer {chunk.layer}")
        with self._lock:
            zone = self._zones.get(chunk.request_id)
            if zone is None:
                raise TransferError(f"no slots reserved for {chunk.request_id} on this engine")
            addr = zone.addr
            check_range(addr, chunk.begin, chunk.end)
            both = np.frombuffer(chunk.data, dtype=np_dtype(lay.dtype)).reshape(2, n, lay.num_kv_heads, lay.head_dim)
            self.storage.write_positions(chunk.layer, addr.pages, chunk.begin, chunk.end, both, start=addr.start)
            zone.chunks += 1
            zone.bytes += len(chunk.data)

    def commit(self, commit: KVCommit) -> int:
        with self._lock:
            zone = self._zones.get(commit.request_id)
            if zone is None:
                raise TransferError(f"no slots reserved for {commit.request_id} on this engine")
            return zone.chunks
