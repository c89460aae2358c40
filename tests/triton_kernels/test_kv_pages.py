"""The KV page kernels under TRITON_INTERPRET=1 against their torch references: random page orders, partial pages,
several layers and dtypes."""

from __future__ import annotations

import random

import pytest
import torch

from busserve.triton_kernels import kv_pages

PAGE, HEADS, DIM, PAGES = 16, 3, 64, 24


def _layers(n_layers: int, dtype: torch.dtype, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (PAGES * PAGE, HEADS, DIM)
    return [(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
            for _ in range(n_layers)]


def _slots(rng: random.Random, n_tokens: int) -> torch.Tensor:
    """Slots of ``n_tokens`` positions over a random page order; the last page is partial."""
    pages = rng.sample(range(PAGES), -(-n_tokens // PAGE))
    pos = torch.arange(n_tokens)
    return torch.tensor(pages)[pos // PAGE] * PAGE + pos % PAGE


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_tokens", [1, 5, 16, 37, 100])
def test_pack_matches_reference(dtype: torch.dtype, n_tokens: int) -> None:
    rng = random.Random(n_tokens)
    for k, v in _layers(3, dtype, seed=n_tokens):
        slots = _slots(rng, n_tokens)
        got = kv_pages.pack_kv(k, v, slots)
        assert got.shape == (2, n_tokens, HEADS, DIM) and got.dtype == dtype
        assert torch.equal(got, kv_pages.pack_kv_reference(k, v, slots))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n_tokens", [1, 17, 64, 99])
def test_unpack_matches_reference_and_touches_nothing_else(dtype: torch.dtype, n_tokens: int) -> None:
    rng = random.Random(100 + n_tokens)
    for k, v in _layers(2, dtype, seed=n_tokens):
        slots = _slots(rng, n_tokens)
        buf = torch.randn(2, n_tokens, HEADS, DIM).to(dtype)
        k_ref, v_ref = k.clone(), v.clone()
        kv_pages.unpack_kv(buf, k, v, slots)
        kv_pages.unpack_kv_reference(buf, k_ref, v_ref, slots)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)


def test_pack_then_unpack_moves_a_prompt_between_pools() -> None:
    """A receiver's pool gets the sender's KV at different (random) pages — what a transfer does."""
    rng = random.Random(7)
    src = _layers(4, torch.float32, seed=1)
    dst = _layers(4, torch.float32, seed=2)
    n = 45
    s_slots, d_slots = _slots(rng, n), _slots(rng, n)
    for (sk, sv), (dk, dv) in zip(src, dst, strict=True):
        kv_pages.unpack_kv(kv_pages.pack_kv(sk, sv, s_slots), dk, dv, d_slots)
        assert torch.equal(dk[d_slots], sk[s_slots]) and torch.equal(dv[d_slots], sv[s_slots])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_append_matches_reference_with_padding(dtype: torch.dtype) -> None:
    rng = random.Random(3)
    k_cache, v_cache = _layers(1, dtype, seed=3)[0]
    tokens = 23
    mapping = _slots(rng, tokens)
    mapping[[4, 11]] = -1  # padded rows are skipped
    k_new = torch.randn(tokens, HEADS, DIM).to(dtype)
    v_new = torch.randn(tokens, HEADS, DIM).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_pages.append_kv(k_new, v_new, k_cache, v_cache, mapping)
    kv_pages.append_kv_reference(k_new, v_new, k_ref, v_ref, mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


def test_bad_shapes_are_refused() -> None:
    k, v = _layers(1, torch.float32, seed=0)[0]
    with pytest.raises(ValueError):
        kv_pages.pack_kv(k, v[:, :2], torch.tensor([0]))
    with pytest.raises(ValueError):
        kv_pages.unpack_kv(torch.zeros(2, 3, HEADS, DIM), k, v, torch.tensor([0, 1]))
