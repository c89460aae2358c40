"""``mooncake``: KV between hosts through Mooncake's Transfer Engine (the transfer layer of Kimi's serving system,
``mooncake-transfer-engine-non-cuda`` on PyPI), over TCP here, RDMA where a NIC offers it.

One-sided, like ``shm``: every engine registers its whole KV pool with its Transfer Engine once, and publishes
where it listens and where its pool starts (``KVAddress.handle`` = ``host:port@0x<base>``). A sender turns each
layer's block copies into one batch of writes straight into the receiver's reserved slots — the pool layout
(``layer, kv, page, slot, head, dim``, contiguous) gives every destination address from the reservation alone — and
the receiver's code is not on the path. As with ``shm`` the receiver cannot see the writes, so the sender says when
it writes no more (a KVCommit with ``transport`` mooncake on the receiver's data subject), and a receive dropped
meanwhile keeps its pages in quarantine until then. Peers find each other without a metadata server
(``P2PHANDSHAKE``).

The wheel links rdma-core's ``libibverbs`` and ``libnl`` even for TCP. Where the system lacks them, ``make setup``
unpacks Debian's packages into the virtualenv and :func:`load_engine_class` loads them from there.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from busserve.bus.client import Bus
from busserve.kv.storage import KVStorage
from busserve.kv.transfer.base import (
    KVTransport,
    KVWriter,
    TransferError,
    block_copies,
    check_compatible,
    spans_to,
    tell_writes_over,
)
from busserve.messages import KVAddress

log = logging.getLogger(__name__)

# Where ``make setup`` puts rdma-core's and libnl's libraries when the system has none (scripts/setup.sh).
DEPS_DIR = Path(os.environ.get("BUSSERVE_MOONCAKE_DEPS", str(Path(sys.prefix) / "lib" / "busserve-mooncake-deps")))
_SYSTEM_LIBS = ("libnl-3.so.200", "libnl-route-3.so.200", "libibverbs.so.1")
_loaded: Any = None
_load_error = ""


def load_engine_class() -> Any:
    """Mooncake's ``TransferEngine`` class, or None (``unavailable()`` says why)."""
    global _loaded, _load_error
    if _loaded is not None or _load_error:
        return _loaded
    try:
        from mooncake.engine import TransferEngine  # type: ignore[import-not-found]
    except ImportError as first:
        try:
            for lib in _SYSTEM_LIBS:  # loaded by path first, their sonames then resolve for the wheel's library
                found = next(iter(sorted(DEPS_DIR.rglob(lib))), None)
                if found is None:
                    raise ImportError(f"{lib} is neither on the system nor in {DEPS_DIR}") from first
                ctypes.CDLL(str(found), mode=ctypes.RTLD_GLOBAL)
            from mooncake.engine import TransferEngine
        except (ImportError, OSError) as exc:
            _load_error = f"mooncake transfer engine not loadable: {exc} (first: {first})"
            return None
    _loaded = TransferEngine
    return _loaded


def unavailable() -> str | None:
    return None if load_engine_class() is not None else _load_error


def reachable_address(nats_urls: list[str]) -> str:
    """The local address peers reach us at: the one our packets to the NATS server leave from."""
    for url in nats_urls:
        host = url.split("://")[-1].rsplit("@", 1)[-1].rsplit(":", 1)[0].strip("[]")
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((host, 9))  # no packet is sent for a UDP connect
                addr: str = s.getsockname()[0]
                return addr
        except OSError:
            continue
    return "127.0.0.1"


def _parse_handle(handle: str) -> tuple[str, int]:
    try:
        target, base = handle.rsplit("@", 1)
        return target, int(base, 16)
    except ValueError as exc:
        raise TransferError(f"mooncake handle {handle!r} is not host:port@0xbase") from exc


class MooncakeWriter(KVWriter):
    def __init__(self, addr: KVAddress, src: KVStorage, transport: MooncakeTransport,
                 executor: ThreadPoolExecutor) -> None:
        super().__init__(addr, src, executor)
        self._transport = transport
        self.target, self.remote_base = _parse_handle(addr.handle)
        self._row = addr.num_kv_heads * addr.head_dim * src.data.element_size()  # bytes of one slot
        self._page = addr.page_size * self._row

    def _remote(self, layer: int, kv: int, page: int, slot: int) -> int:
        a = self.addr
        return self.remote_base + ((layer * 2 + kv) * a.pool_pages + page) * self._page + slot * self._row

    def _write(self, layer: int, src_pages: list[int], begin: int, end: int) -> int:
        local = self.src.data.data_ptr()
        lay = self.src.layout
        srcs, dsts, lens = [], [], []
        for s, d, n, lo, hi in block_copies(spans_to(self.addr, src_pages, begin, end), self.addr.page_size):
            length = (n - 1) * self._page + (hi - lo) * self._row
            for kv in (0, 1):
                srcs.append(local + ((layer * 2 + kv) * lay.num_pages + s) * self._page + lo * self._row)
                dsts.append(self._remote(layer, kv, d, lo))
                lens.append(length)
        if not srcs:
            return 0
        self._transport.first_contact(self.target, self.addr.engine_id)
        rc = self._transport.engine.batch_transfer_sync_write(self.target, srcs, dsts, lens)
        if rc != 0:
            raise TransferError(f"mooncake write to {self.addr.engine_id} at {self.target} failed ({rc})")
        return sum(lens)

    def _writes_over(self, error: Exception | None) -> None:
        tell_writes_over(self._transport.bus, self._transport.loop, self.addr, self.bytes_written, "mooncake")


class MooncakeTransport(KVTransport):
    name = "mooncake"

    def __init__(self, local: KVStorage, executor: ThreadPoolExecutor, bus: Bus, loop: asyncio.AbstractEventLoop,
                 host: str, protocol: str = "tcp") -> None:
        engine_class = load_engine_class()
        if engine_class is None:
            raise RuntimeError(_load_error)
        if local.data.device.type != "cpu":
            raise RuntimeError("the mooncake transport here moves CPU pools (GPU pools: the nvshmem transport)")
        self.local, self.bus, self.loop, self._executor = local, bus, loop, executor
        self.engine = engine_class()
        if self.engine.initialize(host, "P2PHANDSHAKE", protocol, "") != 0:
            raise RuntimeError(f"mooncake transfer engine did not start on {host} ({protocol})")
        self._lock = threading.Lock()
        nbytes = local.data.numel() * local.data.element_size()
        if self.engine.register_memory(local.data.data_ptr(), nbytes) != 0:
            raise RuntimeError(f"mooncake could not register the KV pool ({nbytes} bytes)")
        self.host = host
        self.port = int(self.engine.get_rpc_port())

        self._peers: set[str] = set()

    def first_contact(self, target: str, engine_id: str) -> None:
        with self._lock:
            if target in self._peers:
                return
            self._peers.add(target)
        log.info("mooncake: writing KV into %s at %s (%s)", engine_id, target, self.host)

    def receiver_handle(self) -> str:
        return f"{self.host}:{self.port}@{self.local.data.data_ptr():#x}"

    def open_writer(self, addr: KVAddress, src: KVStorage) -> KVWriter:
        check_compatible(addr, src)
        _parse_handle(addr.handle)
        return MooncakeWriter(addr, src, self, self._executor)
