"""``shm``: same host, CPU. The receiver's KV pool lives in /dev/shm; the sender maps it and copies straight into
the reserved slots — a one-sided write with no receiver code on the path. When it is done writing (all of it, or
aborted) the sender says so on the receiver's data subject (a KVCommit with ``transport`` shm, fire and forget): the
receiver cannot see the writes, and a receive dropped meanwhile keeps its pages in quarantine until then."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from busserve.bus.client import Bus
from busserve.kv.storage import SHM_DIR, KVStorage
from busserve.kv.transfer.base import (
    KVTransport,
    KVWriter,
    TransferError,
    block_copies,
    check_compatible,
    receiver_layout,
    spans_to,
    tell_writes_over,
)
from busserve.messages import KVAddress

log = logging.getLogger(__name__)


class ShmWriter(KVWriter):
    def __init__(self, addr: KVAddress, src: KVStorage, transport: ShmTransport, executor: ThreadPoolExecutor
                 ) -> None:
        super().__init__(addr, src, executor)
        self._transport = transport
        self.dst: KVStorage | None = None

    def _write(self, layer: int, src_pages: list[int], begin: int, end: int) -> int:
        if self.dst is None:
            self.dst = self._transport.attach(self.addr)  # here, on the transfer thread: mapping can take a while
        sk, sv = self.src.layer_kv_np(layer)
        dk, dv = self.dst.layer_kv_np(layer)
        for s, d, n, lo, hi in block_copies(spans_to(self.addr, src_pages, begin, end), self.addr.page_size):
            dk[d : d + n, lo:hi] = sk[s : s + n, lo:hi]
            dv[d : d + n, lo:hi] = sv[s : s + n, lo:hi]
        return 2 * (end - begin) * sk[0, 0].nbytes

    def _writes_over(self, error: Exception | None) -> None:
        bus, loop = self._transport.bus, self._transport.loop
        if bus is not None and loop is not None:
            tell_writes_over(bus, loop, self.addr, self.bytes_written, "shm")


class ShmTransport(KVTransport):
    name = "shm"

    def __init__(self, local: KVStorage, executor: ThreadPoolExecutor, bus: Bus | None = None,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        if local.shm_name is None:
            raise ValueError("the shm transport needs a KV pool in shared memory")
        self.local = local
        self._executor = executor
        self.bus = bus  # to tell receivers when writes are over (optional: tests map pools without a bus)
        self.loop = loop
        self._mapped: dict[str, KVStorage] = {}
        self._lock = threading.Lock()

    def receiver_handle(self) -> str:
        assert self.local.shm_name is not None
        return self.local.shm_name

    def attach(self, addr: KVAddress) -> KVStorage:
        """Map the receiver's pool (once per receiver), filling its page tables up front."""
        with self._lock:
            pool = self._mapped.get(addr.handle)
            if pool is None:
                if not addr.handle:
                    raise TransferError(f"kv_addr of engine {addr.engine_id} has no shared-memory handle")
                layout = receiver_layout(addr)
                try:
                    pool = KVStorage.attach(addr.handle, layout)
                except (FileNotFoundError, ValueError) as exc:
                    raise TransferError(f"cannot map the KV pool of engine {addr.engine_id}: {exc}") from exc
                self._mapped[addr.handle] = pool
            return pool

    def open_writer(self, addr: KVAddress, src: KVStorage) -> KVWriter:
        check_compatible(addr, src)
        if not addr.handle or not (SHM_DIR / addr.handle).exists():
            raise TransferError(f"engine {addr.engine_id}'s KV pool {addr.handle!r} is not on this host; use the "
                                "bus transport between hosts")
        return ShmWriter(addr, src, self, self._executor)

