"""The Triton paged decode-attention kernel under TRITON_INTERPRET=1 against its torch reference."""

from __future__ import annotations

import random

import pytest
import torch

from busserve.triton_kernels.paged_attention import paged_decode, paged_decode_reference

PAGE = 16


def _case(batch: int, heads: int, kv_heads: int, dim: int, lens: list[int], dtype: torch.dtype, seed: int):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    num_pages = sum(-(-n // PAGE) for n in lens) + 4
    k = torch.randn(num_pages * PAGE, kv_heads, dim, generator=g).to(dtype)
    v = torch.randn(num_pages * PAGE, kv_heads, dim, generator=g).to(dtype)
    q = torch.randn(batch, heads, dim, generator=g).to(dtype)
    pages = list(range(num_pages))
    rng.shuffle(pages)  # pages in random order, as the allocator hands them out under churn
    max_pages = max(-(-n // PAGE) for n in lens)
    table = torch.zeros(batch, max_pages, dtype=torch.int32)
    for b, n in enumerate(lens):
        for i in range(-(-n // PAGE)):
            table[b, i] = pages.pop()
    return q, k, v, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(4, 4, 32), (9, 3, 64), (8, 2, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(heads: int, kv_heads: int, dim: int, dtype: torch.dtype) -> None:
    lens = [1, 15, 16, 17, 70]  # one token, partial page, exact page, one past, several pages
    q, k, v, table, n = _case(len(lens), heads, kv_heads, dim, lens, dtype, seed=heads * dim)
    got = paged_decode(q, k, v, table, n, PAGE, block_n=16)
    want = paged_decode_reference(q, k, v, table, n, PAGE)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def test_block_size_does_not_change_the_result() -> None:
    q, k, v, table, n = _case(3, 4, 2, 32, [33, 64, 5], torch.float32, seed=1)
    a = paged_decode(q, k, v, table, n, PAGE, block_n=8)
    b = paged_decode(q, k, v, table, n, PAGE, block_n=64)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_matches_the_engines_own_attention() -> None:
    """Same numbers as the torch path the CPU engine runs (batched SDPA over gathered, padded context)."""
    import torch.nn.functional as F

    q, k, v, table, n = _case(2, 6, 2, 32, [20, 40], torch.float32, seed=3)
    max_len = 40
    pos = torch.arange(max_len)
    slots = table[:, pos // PAGE].long() * PAGE + pos % PAGE
    mask = (pos[None, :] < n[:, None]).view(2, 1, 1, max_len)
    kd = k[slots.reshape(-1)].view(2, max_len, 2, 32).permute(0, 2, 1, 3)
    vd = v[slots.reshape(-1)].view(2, max_len, 2, 32).permute(0, 2, 1, 3)
    qd = q.view(2, 2, 3, 32)  # [B, kv_heads, group, dim]
    sdpa = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask).reshape(2, 6, 32)
    torch.testing.assert_close(paged_decode(q, k, v, table, n, PAGE), sdpa, atol=1e-5, rtol=1e-5)


def test_bad_shapes_are_refused() -> None:
    q, k, v, table, n = _case(1, 4, 3, 32, [5], torch.float32, seed=0)
    with pytest.raises(ValueError, match="share"):
        paged_decode(q, k, v, table, n, PAGE)
    q, k, v, table, n = _case(1, 4, 2, 32, [5], torch.float32, seed=0)
    with pytest.raises(ValueError, match="at least one"):
        paged_decode(q, k, v, table, torch.tensor([0], dtype=torch.int32), PAGE)
