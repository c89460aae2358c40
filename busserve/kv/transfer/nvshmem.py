"""``nvshmem``: GPU to GPU, one-sided puts into a symmetric KV pool (nvshmem4py).

Shape of the transport (the same interface as ``shm`` and ``bus``):
  * every engine allocates its KV pool on the NVSHMEM symmetric heap, so a peer's pages are addressable by
    (PE, offset); the NVSHMEM unique id is exchanged over the bus so engines bootstrap without MPI;
  * the sender packs each layer's rows with the Triton kernel (``triton_kernels.kv_pages.pack_kv``), issues a
    non-blocking put per layer on a side stream as soon as that layer is computed, and fences with ``quiet``
    before remote_send replies — so everything has landed when the reply leaves.

This module decides availability and refuses clearly where the transport cannot run (no CUDA device, nvshmem4py
missing). The GPU writer lives with the GPU engine path.
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


def require_nvshmem() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise TransportUnavailable(f"the nvshmem transport is unavailable: {reason}")
