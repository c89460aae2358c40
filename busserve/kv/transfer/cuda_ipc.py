"""``cuda_ipc``: GPU engines on one host. The receiver exports its KV pool's device memory as a CUDA IPC handle; the
sender maps it once and copies the reserved slots straight from its pool into the receiver's — a one-sided write
over NVLink/PCIe (or within one GPU) with no receiver code and no host memory on the path, like ``shm`` for CPU
pools. When it is done (all of it, or aborted) the sender waits for its copies and tells the receiver on its data
subject, as ``shm`` does.

The handle travels in ``KVAddress.handle`` as JSON of plain fields (never pickled: an address comes from another
process), is checked field by field, and is opened with PyTorch's own IPC storage (``_new_shared_cuda``, the call
``torch.multiprocessing`` makes). Copies run on the device's default stream from the transfer thread, so they are
ordered after the layer's K/V that the compute thread queued before the send hook fired.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from busserve.bus.client import Bus
from busserve.kv.storage import KVLayout, KVStorage
from busserve.kv.transfer.base import (
    KVTransport,
    KVWriter,
    TransferError,
    check_compatible,
    check_range,
    receiver_layout,
    tell_writes_over,
)
from busserve.messages import KVAddress

HANDLE_VERSION = 1
_BYTES_FIELDS = ("handle", "ref_counter_handle", "event_handle")


def export_handle(pool: KVStorage) -> str:
    """The pool's memory as a CUDA IPC handle, JSON-encoded for ``KVAddress.handle``."""
    storage = pool.data.untyped_storage()
    device, handle, size, offset, ref_handle, ref_offset, event, event_sync = storage._share_cuda_()  # type: ignore[attr-defined,no-untyped-call]
    return json.dumps({
        "v": HANDLE_VERSION, "device": int(device), "size": int(size), "offset": int(offset),
        "ref_counter_offset": int(ref_offset), "event_sync_required": bool(event_sync),
        "handle": _b64(handle), "ref_counter_handle": _b64(ref_handle), "event_handle": _b64(event),
        "storage_offset": int(pool.data.storage_offset()), "nbytes": pool.layout.nbytes,
    })


def parse_handle(text: str, layout: KVLayout) -> dict[str, Any]:
    """A handle's fields, checked: every field of the right type, and memory enough for ``layout``."""
    try:
        h = json.loads(text)
    except ValueError as exc:
        raise TransferError(f"cuda_ipc handle is not JSON: {exc}") from exc
    if not isinstance(h, dict) or h.get("v") != HANDLE_VERSION:
        raise TransferError(f"cuda_ipc handle of an unknown version (this engine reads version {HANDLE_VERSION})")
    ints = ("device", "size", "offset", "ref_counter_offset", "storage_offset", "nbytes")
    for key in ints:
        if not isinstance(h.get(key), int) or isinstance(h.get(key), bool) or h[key] < 0:
            raise TransferError(f"cuda_ipc handle field {key!r} must be a non-negative integer")
    if not isinstance(h.get("event_sync_required"), bool):
        raise TransferError("cuda_ipc handle field 'event_sync_required' must be true or false")
    for key in _BYTES_FIELDS:
        try:
            h[key] = base64.b64decode(h.get(key, ""), validate=True)
        except (TypeError, ValueError) as exc:
            raise TransferError(f"cuda_ipc handle field {key!r} is not base64") from exc
    if h["nbytes"] != layout.nbytes:
        raise TransferError(f"cuda_ipc pool holds {h['nbytes']} bytes, the address's layout needs {layout.nbytes}")
    elem = torch.finfo(layout.dtype).bits // 8
    if h["storage_offset"] * elem + layout.nbytes > h["size"]:
        raise TransferError("cuda_ipc handle's memory is smaller than the pool it describes")
    return h


def _b64(b: bytes) -> str:
    return base64.b64encode(bytes(b)).decode()


def _open(h: dict[str, Any], layout: KVLayout) -> torch.Tensor:
    torch.cuda._lazy_init()  # type: ignore[no-untyped-call]  # as torch.multiprocessing does before opening
    storage = torch.UntypedStorage._new_shared_cuda(  # type: ignore[attr-defined]
        h["device"], h["handle"], h["size"], h["offset"], h["ref_counter_handle"], h["ref_counter_offset"],
        h["event_handle"], h["event_sync_required"])
    flat = torch.empty(0, dtype=layout.dtype, device=f"cuda:{h['device']}")
    flat.set_(storage, h["storage_offset"], (layout.numel,))  # type: ignore[call-overload]
    return flat.view(layout.shape)


class CudaIpcWriter(KVWriter):
    def __init__(self, addr: KVAddress, src: KVStorage, transport: CudaIpcTransport, executor: ThreadPoolExecutor
                 ) -> None:
        super().__init__(addr, src, executor)
        self._transport = transport
        self.dst: KVStorage | None = None

    def _write(self, layer: int, src_pages: list[int], begin: int, end: int) -> int:
        check_range(self.addr, begin, end)
        if self.dst is None:
            self.dst = self._transport.attach(self.addr)
        ps = self.addr.page_size
        pos = np.arange(begin, end, dtype=np.int64)
        src_slots = np.asarray(src_pages, dtype=np.int64)[pos // ps] * ps + pos % ps
        rel = pos - self.addr.start
        dst_slots = np.asarray(self.addr.pages, dtype=np.int64)[rel // ps] * ps + rel % ps
        dev = self.src.data.device
        s = torch.from_numpy(src_slots).to(dev, non_blocking=True)
        d = torch.from_numpy(dst_slots).to(self.dst.data.device, non_blocking=True)
        sk, sv = self.src.layer_kv(layer)
        dk, dv = self.dst.layer_kv(layer)
        dk.index_copy_(0, d, sk.index_select(0, s).to(dk.device))
        dv.index_copy_(0, d, sv.index_select(0, s).to(dv.device))
        return 2 * (end - begin) * sk[0].numel() * sk.element_size()

    def _landed(self) -> None:
        """Wait for every copy: on our device, and on the receiver's when its pool is on another GPU."""
        torch.cuda.synchronize(self.src.data.device)
        if self.dst is not None and self.dst.data.device != self.src.data.device:
            torch.cuda.synchronize(self.dst.data.device)

    def _commit(self) -> None:
        self._landed()  # every copy has landed before remote_send replies

    def _writes_over(self, error: Exception | None) -> None:
        if error is not None:
            self._landed()  # nothing of ours still in flight into their pages
        tell_writes_over(self._transport.bus, self._transport.loop, self.addr, self.bytes_written, "cuda_ipc")


class CudaIpcTransport(KVTransport):
    name = "cuda_ipc"

    def __init__(self, local: KVStorage, executor: ThreadPoolExecutor, bus: Bus, loop: asyncio.AbstractEventLoop
                 ) -> None:
        if local.data.device.type != "cuda":
            raise ValueError("the cuda_ipc transport moves KV between CUDA pools")
        self.local = local
        self._executor = executor
        self.bus = bus
        self.loop = loop
        self._handle = export_handle(local)
        self._mapped: dict[str, KVStorage] = {}
        self._lock = threading.Lock()

    def receiver_handle(self) -> str:
        return self._handle

    def attach(self, addr: KVAddress) -> KVStorage:
        """Open the receiver's pool (once per receiver)."""
        with self._lock:
            pool = self._mapped.get(addr.handle)
            if pool is None:
                layout = receiver_layout(addr)
                h = parse_handle(addr.handle, layout)
                try:
                    data = _open(h, layout)
                except RuntimeError as exc:
                    raise TransferError(f"cannot open the KV pool of engine {addr.engine_id} over CUDA IPC: {exc}"
                                        ) from exc
                pool = KVStorage.over(data, layout)
                self._mapped[addr.handle] = pool
            return pool

    def open_writer(self, addr: KVAddress, src: KVStorage) -> KVWriter:
        check_compatible(addr, src)
        layout = receiver_layout(addr)
        parse_handle(addr.handle, layout)  # refuse a bad handle before anything is queued
        return CudaIpcWriter(addr, src, self, self._executor)

    def close(self) -> None:
        with self._lock:
            self._mapped.clear()
