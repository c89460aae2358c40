"""Paged prefill attention in Triton: the query chunks of a step, each over its whole context read from the pages.

Every chunk's K/V — the tokens of the chunk itself and whatever came before it (earlier chunks, the prefix cache,
another engine's transfer) — is already in the pool when attention runs (``engine/attention.py`` writes the step's
K/V first), so one kernel serves fresh prompts, later chunks and cache hits alike, with no gathered copy and no
dense mask. Query row i of a chunk of ``q_len`` rows over ``ctx_len`` positions sits at position
``ctx_len - q_len + i`` and sees positions ``0 ..= ctx_len - q_len + i`` (causal, aligned to the end).

A program owns ``BLOCK_M`` query rows of one chunk and one query head (GQA: query head h reads KV head
h // (heads / kv_heads)); it walks the chunk's page table ``BLOCK_N`` positions at a time up to its last row's
position, with an online softmax in fp32 (FlashAttention's schedule). Layout as elsewhere in busserve: each layer's
K (or V) is a flat ``[num_slots, num_kv_heads, head_dim]`` view, slot = page * page_size + offset.

Tested on the CPU under ``TRITON_INTERPRET=1`` against ``paged_prefill_reference``.
"""

# No ``from __future__ import annotations`` here: Triton before 3.2 reads ``tl.constexpr`` only from real (not
# string) annotations.

import math
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_prefill(q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, q_start_ptr, q_len_ptr, ctx_len_ptr, scale, max_pages,
                   NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
                   DOT_FP32: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    mb = tl.program_id(2)
    q_len = tl.load(q_len_ptr + c)
    if mb * BLOCK_M < q_len:
        q_start = tl.load(q_start_ptr + c)
        ctx_len = tl.load(ctx_len_ptr + c)
        kvh = h // (NUM_HEADS // NUM_KV)
        d = tl.arange(0, HEAD_DIM)
        rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < q_len
        q_pos = ctx_len - q_len + rows
        tok = (q_start + rows).to(tl.int64)
        q = tl.load(q_ptr + (tok[:, None] * NUM_HEADS + h) * HEAD_DIM + d[None, :], mask=row_ok[:, None], other=0.0)
        if DOT_FP32:
            q = q.to(tl.float32)
        m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        last = tl.minimum(ctx_len, ctx_len - q_len + (mb + 1) * BLOCK_M)  # positions this block's rows can see
        for start in range(0, last, BLOCK_N):
            pos = start + tl.arange(0, BLOCK_N)
            pos_ok = pos < last
            page = tl.load(table_ptr + c * max_pages + pos // PAGE, mask=pos_ok, other=0).to(tl.int64)
            kv_row = ((page * PAGE + pos % PAGE) * NUM_KV + kvh) * HEAD_DIM
            k = tl.load(k_ptr + kv_row[:, None] + d[None, :], mask=pos_ok[:, None], other=0.0)
            v = tl.load(v_ptr + kv_row[:, None] + d[None, :], mask=pos_ok[:, None], other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
            if IEEE:  # noqa: SIM108 - an fp32 model: fp32 products, not TF32 (a constexpr branch, for Triton)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            seen = (pos[None, :] <= q_pos[:, None]) & pos_ok[None, :]
            s = tl.where(seen, s, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # padded rows see nothing: keep them finite
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + (tok[:, None] * NUM_HEADS + h) * HEAD_DIM + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                  q_starts: torch.Tensor, q_lens: torch.Tensor, ctx_lens: torch.Tensor, page_size: int,
                  max_q_len: int, scale: float | None = None, out: torch.Tensor | None = None,
                  block_m: int = 32, block_n: int = 32) -> torch.Tensor:
    """Causal attention of the step's prefill chunks over their paged contexts.

    ``q``: [tokens, heads, head_dim] (the flat step); chunk c is rows ``q_starts[c] : q_starts[c] + q_lens[c]``
    over its first ``ctx_lens[c]`` positions, held in ``page_table[c]``. Writes those rows of ``out`` (allocated
    like q when None) and returns it; rows of no chunk are left as they were.
    """
    _, heads, head_dim = q.shape
    num_kv = k_cache.shape[1]
    if heads % num_kv:
        raise ValueError(f"{heads} query heads cannot share {num_kv} KV heads")
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError("head_dim must be a power of two of at least 16 for this kernel")
    q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    chunks = q_lens.numel()
    if chunks == 0 or max_q_len == 0:
        return out
    table = page_table.contiguous()
    dot_fp32 = q.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"  # see quant_matmul.py
    grid = (chunks, heads, triton.cdiv(max_q_len, block_m))
    _paged_prefill[grid](
        q, k_cache, v_cache, out, table, q_starts.contiguous(), q_lens.contiguous(), ctx_lens.contiguous(),
        scale or 1.0 / math.sqrt(head_dim), table.shape[1], NUM_HEADS=heads, NUM_KV=num_kv, HEAD_DIM=head_dim,
        PAGE=page_size, DOT_FP32=dot_fp32, IEEE=q.dtype == torch.float32, BLOCK_M=block_m,
        BLOCK_N=block_n,
    )
    return out


def paged_prefill_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                            q_starts: list[int], q_lens: list[int], ctx_lens: list[int], page_size: int,
                            scale: float | None = None) -> torch.Tensor:
    """The same contract in plain torch (fp32 SDPA per chunk over its gathered context); rows of no chunk are 0."""
    import torch.nn.functional as F

    out = torch.zeros(q.shape, dtype=torch.float32)
    heads, kv_heads = q.shape[1], k_cache.shape[1]
    for c, (a, n, ctx) in enumerate(zip(q_starts, q_lens, ctx_lens, strict=True)):
        pos = torch.arange(ctx)
        slots = page_table[c, pos // page_size].long() * page_size + pos % page_size
        k = k_cache[slots].float().transpose(0, 1)  # [kv_heads, ctx, D]
        v = v_cache[slots].float().transpose(0, 1)
        qc = q[a : a + n].float().transpose(0, 1)  # [heads, n, D]
        mask = pos[None, :] <= (torch.arange(n) + ctx - n)[:, None]
        o = F.scaled_dot_product_attention(qc, k.repeat_interleave(heads // kv_heads, 0),
                                           v.repeat_interleave(heads // kv_heads, 0), attn_mask=mask, scale=scale)
        out[a : a + n] = o.transpose(0, 1)
    return out
