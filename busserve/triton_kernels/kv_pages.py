"""Triton kernels that move KV between the paged pool and contiguous buffers — the GPU path of KV transfer.

A layer's K (or V) cache is viewed flat as ``[num_slots, row]`` with ``row = num_kv_heads * head_dim`` elements;
slot ``s`` is token ``s % page_size`` of page ``s // page_size``.

* ``pack_kv``   — gather the rows of ``slots`` from a layer's K and V into one ``[2, n, row]`` send buffer;
* ``unpack_kv`` — scatter a received ``[2, n, row]`` buffer into a layer's K and V at ``slots``;
* ``append_kv`` — write the new K and V of a step (``[tokens, row]``) at ``slot_mapping`` (``-1``: skip).

One program copies one row (``BLOCK`` covers the row) of K or V, selected by the second grid axis. Each kernel
has a torch reference (``*_reference``) with the same contract; the tests run the kernels under
``TRITON_INTERPRET=1`` on the CPU against those references. The CPU engine itself uses numpy/torch copies.
"""

# No ``from __future__ import annotations`` here: Triton before 3.2 reads ``tl.constexpr`` only from real (not
# string) annotations.

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows(k_ptr, v_ptr, slots_ptr, out_ptr, n, ROW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    which = tl.program_id(1)  # 0: K, 1: V
    slot = tl.load(slots_ptr + i).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    src = tl.where(which == 0, k_ptr, v_ptr)
    row = tl.load(src + slot * ROW + offs, mask=mask)
    tl.store(out_ptr + (which * n + i).to(tl.int64) * ROW + offs, row, mask=mask)


@triton.jit
def _scatter_rows(buf_ptr, k_ptr, v_ptr, slots_ptr, n, ROW: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    which = tl.program_id(1)
    slot = tl.load(slots_ptr + i).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        row = tl.load(buf_ptr + (which * n + i).to(tl.int64) * ROW + offs, mask=mask)
        dst = tl.where(which == 0, k_ptr, v_ptr)
        tl.store(dst + slot * ROW + offs, row, mask=mask)


def _check(k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError("K and V caches must have the same shape and dtype")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("KV caches must be contiguous")
    return k_cache[0].numel()


def pack_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``slots`` of a layer's K and V (each ``[num_slots, heads, dim]``) as one ``[2, n, heads, dim]`` buffer."""
    row = _check(k_cache, v_cache)
    n = slots.numel()
    if out is None:
        out = torch.empty((2, n, *k_cache.shape[1:]), dtype=k_cache.dtype, device=k_cache.device)
    if n:
        _gather_rows[(n, 2)](k_cache, v_cache, slots, out, n, ROW=row, BLOCK=triton.next_power_of_2(row))
    return out


def unpack_kv(buf: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Scatter a ``[2, n, heads, dim]`` buffer into a layer's K and V at ``slots`` (slot ``-1``: skipped)."""
    row = _check(k_cache, v_cache)
    n = slots.numel()
    if buf.shape[:2] != (2, n) or not buf.is_contiguous():
        raise ValueError(f"buffer must be a contiguous [2, {n}, ...] tensor, got {tuple(buf.shape)}")
    if n:
        _scatter_rows[(n, 2)](buf, k_cache, v_cache, slots, n, ROW=row, BLOCK=triton.next_power_of_2(row))


def append_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              slot_mapping: torch.Tensor) -> None:
    """Write a step's new K and V (``[tokens, heads, dim]`` each) at ``slot_mapping`` (``-1``: padding)."""
    unpack_kv(torch.stack([k, v]).contiguous(), k_cache, v_cache, slot_mapping)


# ------------------------------------------------------------------ torch references (same contracts)


def pack_kv_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return torch.stack([k_cache.index_select(0, slots), v_cache.index_select(0, slots)])


def unpack_kv_reference(buf: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> None:
    keep = slots >= 0
    k_cache.index_copy_(0, slots[keep], buf[0][keep])
    v_cache.index_copy_(0, slots[keep], buf[1][keep])


def append_kv_reference(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    unpack_kv_reference(torch.stack([k, v]), k_cache, v_cache, slot_mapping)
