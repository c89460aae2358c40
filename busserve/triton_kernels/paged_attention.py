"""Paged decode attention in Triton: one new query token per sequence, over K/V scattered across pages.

The GPU engine's own attention path (beside flashinfer): for each (sequence, query head) a program walks the
sequence's page table in blocks of ``BLOCK_N`` positions, gathers K and V rows of its KV head (GQA: query head h
reads KV head h // group) straight from the pool, and keeps a running max / sum / weighted V (online softmax), so
no padded context is ever materialized. Layout as elsewhere in busserve: each layer's K (or V) is a flat
``[num_slots, num_kv_heads, head_dim]`` view, slot = page * page_size + offset.

Tested on the CPU under ``TRITON_INTERPRET=1`` against ``paged_decode_reference``.
"""

# No ``from __future__ import annotations`` here: Triton before 3.2 reads ``tl.constexpr`` only from real (not
# string) annotations.

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, scale, max_pages,
                  NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // (NUM_HEADS // NUM_KV)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (b * NUM_HEADS + h) * HEAD_DIM + d).to(tl.float32)
    n_ctx = tl.load(lens_ptr + b)
    m = -float("inf")
    s = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for start in range(0, n_ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        valid = pos < n_ctx
        page = tl.load(table_ptr + b * max_pages + pos // PAGE, mask=valid, other=0).to(tl.int64)
        row = ((page * PAGE + pos % PAGE) * NUM_KV + kvh) * HEAD_DIM
        k = tl.load(k_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1) * scale
        scores = tl.where(valid, scores, -float("inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + row[:, None] + d[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        s = s * alpha + tl.sum(p, axis=0)
        m = m_new
    tl.store(out_ptr + (b * NUM_HEADS + h) * HEAD_DIM + d, (acc / s).to(out_ptr.dtype.element_ty))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                 context_lens: torch.Tensor, page_size: int, scale: float | None = None,
                 block_n: int = 32) -> torch.Tensor:
    """Attention of ``q`` ([batch, heads, head_dim]) over each sequence's first ``context_lens[b]`` positions.

    ``page_table``: [batch, max_pages] page ids (padding beyond the context is never read); caches are flat
    ``[num_slots, num_kv_heads, head_dim]``. Returns [batch, heads, head_dim] in q's dtype.
    """
    batch, heads, head_dim = q.shape
    num_kv = k_cache.shape[1]
    if heads % num_kv:
        raise ValueError(f"{heads} query heads cannot share {num_kv} KV heads")
    if head_dim & (head_dim - 1):
        raise ValueError("head_dim must be a power of two for this kernel")
    if context_lens.device.type == "cpu" and (context_lens < 1).any():  # on a GPU the check would wait for it
        raise ValueError("every sequence needs at least one context position")
    q, table = q.contiguous(), page_table.contiguous()
    out = torch.empty_like(q)
    _paged_decode[(batch, heads)](
        q, k_cache, v_cache, table, context_lens.contiguous(), out, scale or 1.0 / math.sqrt(head_dim),
        table.shape[1], NUM_HEADS=heads, NUM_KV=num_kv, HEAD_DIM=head_dim, PAGE=page_size, BLOCK_N=block_n,
    )
    return out


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                           context_lens: torch.Tensor, page_size: int, scale: float | None = None) -> torch.Tensor:
    """The same contract in plain torch: gather each sequence's context, softmax in fp32."""
    batch, heads, head_dim = q.shape
    group = heads // k_cache.shape[1]
    scale = scale or 1.0 / math.sqrt(head_dim)
    out = torch.empty_like(q)
    for b in range(batch):
        n = int(context_lens[b])
        pos = torch.arange(n)
        slots = page_table[b, pos // page_size].long() * page_size + pos % page_size
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [n, heads, dim]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].float(), k) * scale, dim=-1)
        out[b] = torch.einsum("hn,nhd->hd", w, v).to(q.dtype)
    return out
