"""``nvshmem``: GPU to GPU, one-sided puts into a symmetric KV pool (nvshmem4py).

Shape of the transport (the same interface as ``shm`` and ``bus``):
  * every engine allocates its KV pool on the NVSHMEM symmetric heap, so a peer's pages are addressable by
    (PE, offset); the NVSHMEM unique id is exchanged over the bus so engines bootstrap without MPI;
  * the sender packs each layer's rows with the Triton kernel (``triton_kernels.kv_pages.pack_kv``), issues a
    non-blocking put per layer on a side stream as soon as that layer is computed, and fences with ``quiet``
    before remote_send replies — so everything has landed when the reply leaves.

What exists today is the bootstrap (``nvshmem_bootstrap.py``) and this availability check; the writer does not.
So an engine asked for ``--transport nvshmem`` refuses to start, naming why — the transport is never silently
absent. GPU engines move KV over ``bus`` meanwhile (a device pool staged through pinned host memory).
"""

from __future__ import annotations

import importlib.util

from busserve.kv.transfer.base import TransferError


class TransportUnavailable(TransferError):
    pass


def unavailable_reason() -> str | None:
    """Why nvshmem cannot run here, or None if it can."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "torch is missing"
    if not torch.cuda.is_available():
        return "no CUDA device: nvshmem moves KV between GPUs (use shm or bus on CPU engines)"
    if importlib.util.find_spec("nvshmem") is None:
        return "nvshmem4py is not installed (pip install 'busserve[gpu]')"
    return None


NOT_BUILT = ("its KV writer is not built yet (only the unique-id bootstrap is); GPU engines move KV over "
             "--transport bus, staged through pinned host memory")


def require_nvshmem() -> None:
    """Refuse an engine that asks for the transport: why it cannot run here, or that it is not built."""
    raise TransportUnavailable(f"the nvshmem transport is unavailable: {unavailable_reason() or NOT_BUILT}")
