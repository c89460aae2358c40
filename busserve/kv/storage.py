"""The KV pool's tensors: ``[num_layers, 2 (K, V), num_pages, page_size, num_kv_heads, head_dim]``.

Slot ``s`` of a layer is token ``s % page_size`` of page ``s // page_size``; ``layer_kv(l)`` returns flat
``[num_slots, num_kv_heads, head_dim]`` views of K and V that attention indexes by slot. On the CPU the pool can
live in shared memory (a file in /dev/shm mapped with MAP_SHARED) so that another engine on the same host can
write into it directly — the ``shm`` transport. ``attach`` maps such a pool from its handle.

Segments are named ``busserve-kv-<engine>-<pid>-<n>`` and created exclusively with mode 0600 after checking that
/dev/shm has room; an engine that starts removes the segments of engine processes that are gone (a SIGKILLed
engine cannot unlink its own).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "busserve-kv-"
# busserve-kv-<engine>-<pid>-<n>; the older busserve-kv-<engine>-<tid> form is cleaned up too.
_SEGMENT = re.compile(rf"^{re.escape(SHM_PREFIX)}(?P<engine>.+?)-(?P<pid>\d+)-(?P<n>\d+)$")
_OLD_SEGMENT = re.compile(rf"^{re.escape(SHM_PREFIX)}(?P<engine>.+)-(?P<pid>\d+)$")

log = logging.getLogger(__name__)


class SharedMemoryError(OSError):
    """The shared-memory KV pool cannot be created (no room in /dev/shm, a name taken)."""


def shm_segment_name(engine_id: str, pid: int, n: int = 0) -> str:
    return f"{SHM_PREFIX}{engine_id}-{pid}-{n}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_segments(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink the KV segments of engine processes that no longer exist; returns their names."""
    removed = []
    with contextlib.suppress(OSError):
        for path in shm_dir.iterdir():
            m = _SEGMENT.match(path.name) or _OLD_SEGMENT.match(path.name)
            if m is None or _pid_alive(int(m.group("pid"))):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    if removed:
        log.info("removed %d shared KV segment(s) of engines that are gone: %s", len(removed), ", ".join(removed))
    return removed


def _create_segment(path: Path, nbytes: int) -> None:
    """Create ``path`` (must not exist) of ``nbytes``, readable and writable by this user only."""
    st = os.statvfs(path.parent)
    free = st.f_bavail * st.f_frsize
    if nbytes > free:
        raise SharedMemoryError(
            f"the KV pool needs {nbytes / 2**20:.0f} MiB of shared memory, {path.parent} has {free / 2**20:.0f} MiB "
            "free: give a smaller --kv-memory, enlarge /dev/shm (docker: --shm-size), or drop the shm transport")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise SharedMemoryError(f"shared KV segment {path} exists already (another engine with this id and pid?)"
                                ) from exc
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported KV dtype {dtype}")


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.num_pages, self.page_size, self.num_kv_heads, self.head_dim)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    @property
    def nbytes(self) -> int:
        return self.numel * torch.finfo(self.dtype).bits // 8


class KVStorage:
    def __init__(self, layout: KVLayout, *, device: str | torch.device = "cpu", shm_name: str | None = None) -> None:
        self.layout = layout
        self.shm_name = shm_name
        self._shm_path: Path | None = None
        self._mm: mmap.mmap | None = None
        if shm_name is not None:
            if torch.device(device).type != "cpu":
                raise ValueError("a shared-memory KV pool lives in host memory")
            path = SHM_DIR / shm_name
            remove_stale_segments(path.parent)
            _create_segment(path, layout.nbytes)
            self._shm_path = path
            self._mm, flat = _map(path, layout, populate=False)
            # tmpfs allocates a page on its first write, and on this kind of VM that costs ~40 us per 4 KiB: a
            # transfer into never-touched pages ran at a quarter of its warm speed. Allocate the whole pool up
            # front, in the background (the contents are not touched, so serving can start at once).
            prefault_in_background(self._mm, name=f"prefault-{shm_name}")
            self.data = flat.view(layout.shape)
        else:
            self.data = torch.zeros(layout.shape, dtype=layout.dtype, device=device)
        ps = layout.page_size
        slots = layout.num_pages * ps
        # Flat per-layer views, built once: attention and transfers index them by slot.
        self._k = [self.data[i, 0].view(slots, layout.num_kv_heads, layout.head_dim) for i in range(layout.num_layers)]
        self._v = [self.data[i, 1].view(slots, layout.num_kv_heads, layout.head_dim) for i in range(layout.num_layers)]
        self._np: list[tuple[np.ndarray, np.ndarray]] | None = None
        # Transfers copy a host pool through numpy views of it, and stage a device pool's positions through host
        # memory (read_positions / write_positions).
        self.staged = self.data.device.type != "cpu"

    @classmethod
    def attach(cls, shm_name: str, layout: KVLayout) -> KVStorage:
        """Map another engine's shared-memory pool (the ``shm`` transport's sender side)."""
        path = SHM_DIR / shm_name
        if not path.exists():
            raise FileNotFoundError(f"no shared KV pool {shm_name!r} on this host")
        if path.stat().st_size != layout.nbytes:
            raise ValueError(f"shared KV pool {shm_name!r} is {path.stat().st_size} bytes, expected {layout.nbytes}")
        self = cls.__new__(cls)
        self.layout = layout
        self.shm_name = shm_name
        self._shm_path = None  # not ours to unlink
        self._mm, flat = _map(path, layout)
        self.data = flat.view(layout.shape)
        slots = layout.num_pages * layout.page_size
        self._k = [self.data[i, 0].view(slots, layout.num_kv_heads, layout.head_dim) for i in range(layout.num_layers)]
        self._v = [self.data[i, 1].view(slots, layout.num_kv_heads, layout.head_dim) for i in range(layout.num_layers)]
        self._np = None
        self.staged = False
        return self

    @classmethod
    def over(cls, data: torch.Tensor, layout: KVLayout) -> KVStorage:
        """Another engine's pool, opened as ``data`` (the ``cuda_ipc`` transport's sender side); not ours to free."""
        if tuple(data.shape) != tuple(layout.shape) or data.dtype != layout.dtype:
            raise ValueError(f"a pool of layout {layout.shape} {layout.dtype} cannot be {tuple(data.shape)} "
                             f"{data.dtype}")
        self = cls.__new__(cls)
        self.layout, self.shm_name, self._shm_path, self._mm = layout, None, None, None
        self.data = data
        slots = layout.num_pages * layout.page_size
        self._k = [data[i, 0].view(slots, layout.num_kv_heads, layout.head_dim) for i in range(layout.num_layers)]
        self._v = [data[i, 1].view(slots, layout.num_kv_heads, layout.head_dim) for i in range(layout.num_layers)]
        self._np = None
        self.staged = data.device.type != "cpu"
        return self

    def layer_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._k[layer], self._v[layer]

    def layer_kv_np(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """K and V of a layer as numpy ``[num_pages, page_size, heads, dim]`` arrays over the same memory, for
        copies made off the compute thread: numpy never starts an OpenMP team, so transfer threads cannot slow
        the compute thread's kernels (see bus/background.py)."""
        if self._np is None:
            lay = self.layout
            shape = (lay.num_pages, lay.page_size, lay.num_kv_heads, lay.head_dim)
            self._np = [(as_numpy(k).reshape(shape), as_numpy(v).reshape(shape))
                        for k, v in zip(self._k, self._v, strict=True)]
        return self._np[layer]

    def read_positions(self, layer: int, pages: list[int], begin: int, end: int, start: int = 0) -> np.ndarray:
        """K then V of positions ``[begin, end)`` of a sequence whose page table ``pages`` starts at position
        ``start``, as one host array ``[2, n, heads, dim]`` (16-bit floats as raw 16-bit words).

        A host pool copies page span by page span from its numpy views. A device pool gathers the slots into one
        contiguous device buffer (busserve's Triton pack kernel on CUDA, ``index_select`` elsewhere) and copies it
        into pinned host memory once; it runs on the device's current stream, after the layer's K/V were written.
        """
        lay = self.layout
        if not self.staged:
            k, v = self.layer_kv_np(layer)
            ps = lay.page_size
            buf = np.empty((2, end - begin, lay.num_kv_heads, lay.head_dim), dtype=k.dtype)
            for p, lo, hi in page_spans(begin, end, ps):
                r, page = p - begin, pages[(p - start) // ps]
                buf[0, r : r + hi - lo] = k[page, lo:hi]
                buf[1, r : r + hi - lo] = v[page, lo:hi]
            return buf
        dev = self.data.device
        slots = self._slots_on_device(pages, begin, end, start)
        k_cache, v_cache = self.layer_kv(layer)
        if dev.type == "cuda":
            from busserve.triton_kernels.kv_pages import pack_kv

            packed = pack_kv(k_cache, v_cache, slots)
        else:
            packed = torch.stack([k_cache.index_select(0, slots), v_cache.index_select(0, slots)])
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=dev.type == "cuda")
        host.copy_(packed)  # waits for the device (a copy into host memory always does)
        return as_numpy(host)

    def write_positions(self, layer: int, pages: list[int], begin: int, end: int, data: np.ndarray,
                        start: int = 0) -> None:
        """Write ``data`` (``[2, n, heads, dim]`` as :meth:`read_positions` returns it) at positions
        ``[begin, end)`` of a sequence whose page table ``pages`` starts at position ``start``."""
        lay = self.layout
        if not self.staged:
            k, v = self.layer_kv_np(layer)
            ps = lay.page_size
            for p, lo, hi in page_spans(begin, end, ps):
                page, r = pages[(p - start) // ps], p - begin
                k[page, lo:hi] = data[0, r : r + hi - lo]
                v[page, lo:hi] = data[1, r : r + hi - lo]
            return
        dev = self.data.device
        if not (data.flags.writeable and data.flags.c_contiguous):
            data = np.array(data)  # a received chunk is a read-only view of the message; torch wants its own
        host = torch.from_numpy(data)
        if lay.dtype in (torch.bfloat16, torch.float16):
            host = host.view(lay.dtype)
        if dev.type == "cuda":
            host = host.pin_memory()
        buf = host.to(dev, non_blocking=True)
        slots = self._slots_on_device(pages, begin, end, start)
        k_cache, v_cache = self.layer_kv(layer)
        if dev.type == "cuda":
            from busserve.triton_kernels.kv_pages import unpack_kv

            unpack_kv(buf, k_cache, v_cache, slots)
            torch.cuda.current_stream(dev).synchronize()  # landed before the commit is answered
        else:
            k_cache.index_copy_(0, slots, buf[0])
            v_cache.index_copy_(0, slots, buf[1])

    def _slots_on_device(self, pages: list[int], begin: int, end: int, start: int) -> torch.Tensor:
        rel = np.arange(begin - start, end - start, dtype=np.int64)
        ps = self.layout.page_size
        slots = np.asarray(pages, dtype=np.int64)[rel // ps] * ps + rel % ps
        return torch.from_numpy(slots).to(self.data.device)

    def close(self) -> None:
        """Unlink the shared-memory file if this pool created it (mapped pages stay valid until released)."""
        if self._shm_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._shm_path)
            self._shm_path = None


MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in writable without touching their contents


def prefault_in_background(mm: mmap.mmap, name: str, chunk: int = 64 << 20) -> threading.Thread | None:
    """Allocate every page of a shared mapping on a background thread (no-op where madvise cannot do it)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    except (OSError, TypeError, ValueError):
        return None
    size = len(mm)

    def run() -> None:
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            if libc.madvise(ctypes.c_void_p(base + off), ctypes.c_size_t(n), MADV_POPULATE_WRITE) != 0:
                return  # old kernel: pages are then allocated on first use instead

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def _map(path: Path, layout: KVLayout, populate: bool = True) -> tuple[mmap.mmap, torch.Tensor]:
    """Map a pool file shared. ``populate`` fills the page tables up front (MAP_POPULATE), so that a sender's
    first write into another engine's pool does not fault page by page."""
    fd = os.open(path, os.O_RDWR)
    try:
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
        mm = mmap.mmap(fd, layout.nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    return mm, torch.frombuffer(mm, dtype=layout.dtype, count=layout.numel)


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor; 16-bit floats are viewed as raw 16-bit words (copies do not care)."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy()
    return t.numpy()


def np_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.int16) if dtype in (torch.bfloat16, torch.float16) else np.dtype(str(dtype).split(".")[-1])


def page_spans(begin: int, end: int, page_size: int) -> Iterator[tuple[int, int, int]]:
    """Positions ``[begin, end)`` cut at page boundaries, as ``(first_position, lo, hi)`` with ``[lo, hi)`` the
    offsets inside the page. A transfer copies span by span: both pools put position ``p`` at offset
    ``p % page_size`` (reservations start on a page boundary), so each span is one block copy — a page's worth
    of rows instead of one row per token."""
    p = begin
    while p < end:
        lo = p % page_size
        hi = min(page_size, lo + end - p)
        yield p, lo, hi
        p += hi - lo


def slots_for(pages: list[int] | torch.Tensor, positions: torch.Tensor, page_size: int, start: int = 0) -> torch.Tensor:
    """Slot of each position, for a page table whose first page holds position ``start`` (page-aligned)."""
    table = pages if isinstance(pages, torch.Tensor) else torch.tensor(pages, dtype=torch.long)
    rel = positions - start
    return table[rel // page_size] * page_size + rel % page_size
