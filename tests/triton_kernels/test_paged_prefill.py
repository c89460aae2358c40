"""The Triton paged prefill kernel under TRITON_INTERPRET=1 against its torch reference."""

from __future__ import annotations

import random

import pytest
import torch

from busserve.triton_kernels.paged_prefill import paged_prefill, paged_prefill_reference

PAGE = 16


def _case(chunks: list[tuple[int, int]], heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int
          ) -> tuple[torch.Tensor, ...]:
    """Chunks as (q_len, ctx_len); their rows side by side in one flat step, pages shuffled as under churn."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_pages = sum(-(-ctx // PAGE) for _, ctx in chunks) + 3
    k = torch.randn(num_pages * PAGE, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(num_pages * PAGE, kv_heads, dim, generator=g).to(dtype)
    tokens = sum(n for n, _ in chunks) + 2  # two rows no chunk owns (a decode token's, say)
    q = torch.randn(tokens, heads, dim, generator=g).to(dtype)
    pages = list(range(num_pages))
    rng.shuffle(pages)
    table = torch.zeros(len(chunks), max(-(-ctx // PAGE) for _, ctx in chunks), dtype=torch.int32)
    starts, at = [], 1
    for c, (n, ctx) in enumerate(chunks):
        for i in range(-(-ctx // PAGE)):
            table[c, i] = pages.pop()
        starts.append(at)
        at += n
    return q, k, v, table, starts


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 32), (9, 3, 64), (8, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    # A fresh prompt, a later chunk after cached positions, a one-row chunk, a chunk longer than a block.
    chunks = [(20, 20), (7, 40), (1, 17), (45, 61)]
    q, k, v, table, starts = _case(chunks, heads, kv_heads, dim, dtype, seed=heads + dim)
    q_lens, ctx_lens = [n for n, _ in chunks], [c for _, c in chunks]
    out = torch.zeros_like(q)
    got = paged_prefill(q, k, v, table, torch.tensor(starts), torch.tensor(q_lens), torch.tensor(ctx_lens), PAGE,
                        max(q_lens), out=out, block_m=16, block_n=16)
    want = paged_prefill_reference(q, k, v, table, starts, q_lens, ctx_lens, PAGE)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)
    assert got[0].abs().sum() == 0 and got[-1].abs().sum() == 0  # rows of no chunk untouched


def test_block_sizes_do_not_change_the_result() -> None:
    chunks = [(33, 50), (64, 64)]
    q, k, v, table, starts = _case(chunks, 4, 2, 32, torch.float32, seed=2)
    args = (torch.tensor(starts), torch.tensor([33, 64]), torch.tensor([50, 64]), PAGE, 64)
    a = paged_prefill(q, k, v, table, *args, block_m=16, block_n=16)
    b = paged_prefill(q, k, v, table, *args, block_m=32, block_n=64)
    rows = torch.cat([torch.arange(1, 34), torch.arange(34, 98)])
    torch.testing.assert_close(a[rows], b[rows], atol=1e-5, rtol=1e-5)


def test_matches_the_engines_sdpa_path_for_a_fresh_prompt() -> None:
    """A chunk with no earlier context is plain causal attention over its own K/V (the CPU engine's SDPA)."""
    import torch.nn.functional as F

    q, k, v, table, starts = _case([(24, 24)], 6, 2, 32, torch.float32, seed=4)
    got = paged_prefill(q, k, v, table, torch.tensor(starts), torch.tensor([24]), torch.tensor([24]), PAGE, 24)
    pos = torch.arange(24)
    slots = table[0, pos // PAGE].long() * PAGE + pos % PAGE
    want = F.scaled_dot_product_attention(q[1:25].transpose(0, 1).unsqueeze(0), k[slots].transpose(0, 1).unsqueeze(0),
                                          v[slots].transpose(0, 1).unsqueeze(0), is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got[1:25], want[0].transpose(0, 1), atol=1e-5, rtol=1e-5)
