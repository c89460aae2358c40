"""The KV transfer interface: one-sided writes into a receiver's reserved slots.

A receiver answers prep_recv with a :class:`KVAddress` (its pages for positions ``[start, end)``, its pool's
layout, and a transport handle). The sender opens a :class:`KVWriter` on that address and writes layer by layer
as each layer's KV is computed; ``finish`` reports once every byte has landed, and only then does remote_send
reply. The receiver takes no part in a write — except on the ``bus`` transport, where its subscription plays the
part of the NIC.

Writes run on the engine's single transfer thread, in order, so the compute thread goes on to the next layer
while the previous one is copied or sent. A writer refuses to write once the reservation's write window is ending,
so a late sender never scribbles over pages the receiver has given back (it keeps those of a dropped receive in
quarantine until the window ends, or until it knows the sender stopped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from busserve.kv.storage import DTYPES, KVLayout, KVStorage, dtype_name, page_spans
from busserve.messages import KVAddress, KVCommit, Transport

if TYPE_CHECKING:
    from busserve.bus.client import Bus

log = logging.getLogger(__name__)

# Stop writing this long before the reservation's write window ends (``KVAddress.expires_at``; clocks of one host,
# or NTP-synced hosts): the receiver may reuse the pages of a dropped receive once the window is over.
LEASE_SAFETY_MARGIN_S = 1.0

DoneCallback = Callable[[Exception | None, int], None]


class TransferError(Exception):
    pass


def check_compatible(addr: KVAddress, src: KVStorage) -> None:
    lay = src.layout
    theirs = (addr.num_layers, addr.num_kv_heads, addr.head_dim, addr.dtype, addr.page_size)
    ours = (lay.num_layers, lay.num_kv_heads, lay.head_dim, dtype_name(lay.dtype), lay.page_size)
    if theirs != ours:
        raise TransferError(
            f"kv_addr of engine {addr.engine_id} has layout (layers, kv_heads, head_dim, dtype, page_size)={theirs},"
            f" this engine's pool is {ours}: not the same model"
        )
    check_address(addr)


def check_address(addr: KVAddress) -> None:
    """The reservation is well-formed: page-aligned start, enough pages for ``[start, end)``, every page inside the
    receiver's pool. A sender checks before writing a byte, so a bad ``kv_addr`` cannot write outside the pool."""
    ps = addr.page_size
    if ps <= 0 or addr.start < 0 or addr.end < addr.start or addr.start % ps:
        raise TransferError(f"kv_addr range [{addr.start}, {addr.end}) with page size {ps} is not a reservation")
    need = -(-(addr.end - addr.start) // ps)
    if len(addr.pages) < need:
        raise TransferError(f"kv_addr holds {len(addr.pages)} pages for [{addr.start}, {addr.end}), needs {need}")
    bad = [p for p in addr.pages if not 0 <= p < addr.pool_pages]
    if bad:
        raise TransferError(f"kv_addr pages {bad[:4]} are outside the receiver's pool of {addr.pool_pages} pages")


def receiver_layout(addr: KVAddress) -> KVLayout:
    """The layout of the receiver's whole pool, as its address describes it (what a one-sided writer maps)."""
    return KVLayout(num_layers=addr.num_layers, num_pages=addr.pool_pages, page_size=addr.page_size,
                    num_kv_heads=addr.num_kv_heads, head_dim=addr.head_dim, dtype=DTYPES[addr.dtype])


def check_range(addr: KVAddress, begin: int, end: int) -> None:
    if begin < addr.start or end > addr.end:
        raise TransferError(f"positions [{begin}, {end}) fall outside the reserved [{addr.start}, {addr.end})")


def spans_to(addr: KVAddress, src_pages: list[int], begin: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(src_page, dst_page, lo, hi)`` block copies moving positions ``[begin, end)`` into the reservation."""
    check_range(addr, begin, end)
    ps = addr.page_size
    for p, lo, hi in page_spans(begin, end, ps):
        yield src_pages[p // ps], addr.pages[(p - addr.start) // ps], lo, hi


def block_copies(spans: Iterator[tuple[int, int, int, int]], page_size: int
                 ) -> list[tuple[int, int, int, int, int]]:
    """Merge page spans into ``(src_page, dst_page, pages, lo, hi)`` blocks: runs of whole pages that are
    consecutive on both sides become one copy (pages come off the free list in order, so runs are common)."""
    out: list[tuple[int, int, int, int, int]] = []
    for s, d, lo, hi in spans:
        if out and lo == 0 and hi == page_size:
            s0, d0, n, plo, phi = out[-1]
            if plo == 0 and phi == page_size and s == s0 + n and d == d0 + n:
                out[-1] = (s0, d0, n + 1, 0, page_size)
                continue
        out.append((s, d, 1, lo, hi))
    return out


class KVWriter(ABC):
    """Writes one request's KV into one receiver. Calls are queued on the transfer thread, in order."""

    def __init__(self, addr: KVAddress, src: KVStorage, executor: ThreadPoolExecutor) -> None:
        self.addr = addr
        self.src = src
        self._executor = executor
        self._futures: list[Future[int]] = []
        self.bytes_written = 0
        self.busy_s = 0.0  # time the transfer thread spent on this writer's writes
        self.layers_written: set[int] = set()
        self._failed: Exception | None = None

    def abort(self, reason: str) -> None:
        """Write nothing more (writes already queued become no-ops; ``finish`` reports the failure)."""
        self._failed = TransferError(reason)

    def _check_lease(self) -> None:
        if self.addr.expires_at and time.time() > self.addr.expires_at - LEASE_SAFETY_MARGIN_S:
            raise TransferError(f"the write window of {self.addr.request_id} on engine {self.addr.engine_id} is over")

    def write(self, layer: int, src_pages: list[int], begin: int, end: int) -> None:
        """Queue the KV of positions ``[begin, end)`` of ``layer``, read from our pages ``src_pages`` (the
        sender's page table: position ``p`` is in ``src_pages[p // page_size]``)."""
        if end <= begin:
            return
        self._futures.append(self._executor.submit(self._guarded_write, layer, src_pages, begin, end))

    def _guarded_write(self, layer: int, src_pages: list[int], begin: int, end: int) -> int:
        if self._failed is not None:
            return 0
        t0 = time.perf_counter()
        try:
            self._check_lease()
            n = self._write(layer, src_pages, begin, end)
        except Exception as exc:
            self._failed = exc
            return 0
        finally:
            self.busy_s += time.perf_counter() - t0
        self.bytes_written += n
        self.layers_written.add(layer)
        return n

    @abstractmethod
    def _write(self, layer: int, src_pages: list[int], begin: int, end: int) -> int:
        """Do the write (on the transfer thread); return bytes written."""

    def _commit(self) -> None:  # noqa: B027 - optional hook
        """After the last write (on the transfer thread): make sure everything has landed."""

    def _writes_over(self, error: Exception | None) -> None:  # noqa: B027 - optional hook
        """After the last write, whether it all went or not (on the transfer thread): this writer writes no more.
        Transports whose writes the receiver cannot see (shm) tell it, so that it can reuse a dropped receive's
        pages at once instead of keeping them in quarantine."""

    def after_queued(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the transfer thread once the writes queued so far are done (a round's marker)."""
        self._executor.submit(fn)

    def finish(self, on_done: DoneCallback) -> None:
        """Call ``on_done(error, bytes)`` on the transfer thread once every queued write has landed (or, after
        ``abort``, once the writes already queued have drained)."""

        def done() -> None:
            err = self._failed
            if err is None:
                t0 = time.perf_counter()
                try:
                    self._commit()
                except Exception as exc:
                    err = exc
                self.busy_s += time.perf_counter() - t0
            try:
                self._writes_over(err)
            finally:
                on_done(err, self.bytes_written)

        self._executor.submit(done)


def tell_writes_over(bus: Bus, loop: asyncio.AbstractEventLoop, addr: KVAddress, nbytes: int,
                     transport: Transport) -> None:
    """From the transfer thread: tell the receiver of a one-sided transport (its code sees no write) that this
    sender writes no more into ``addr`` (a KVCommit, fire and forget), so a dropped receive's pages come back at
    once. If it does not arrive, the receiver waits out the write window: slower, still safe."""
    msg = KVCommit(request_id=addr.request_id, chunks=0, nbytes=nbytes, transport=transport)
    fut = asyncio.run_coroutine_threadsafe(bus.publish(bus.subjects.kv_data(addr.engine_id), msg), loop)
    try:
        fut.result(timeout=5)
    except Exception as exc:
        log.debug("could not tell %s that writes for %s are over: %s", addr.engine_id, addr.request_id, exc)


class KVTransport(ABC):
    name: str

    @abstractmethod
    def receiver_handle(self) -> str:
        """What a sender needs (in ``KVAddress.handle``) to write into this engine."""

    @abstractmethod
    def open_writer(self, addr: KVAddress, src: KVStorage) -> KVWriter:
        """A writer from our pool ``src`` into the receiver described by ``addr``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
