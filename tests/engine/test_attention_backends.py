"""Decode-attention backends: same numbers from each, the same tokens from the engine through each, and clear
refusals where a backend cannot run. Triton runs under its interpreter (TRITON_INTERPRET=1, root conftest)."""

from __future__ import annotations

import pytest
import torch

from busserve.engine.attention_backends import (
    BackendUnavailable,
    DecodeGroup,
    TorchDecode,
    TritonDecode,
    flashinfer_page_metadata,
    select_backend,
    unavailable_reason,
)
from busserve.engine.model_loader import LoadedModel
from busserve.triton_kernels.paged_attention import paged_decode_reference
from tests.helpers import greedy, running_core

PAGE = 4
CPU = torch.device("cpu")


def _group(lens: list[int], pages_in_order: list[int]) -> DecodeGroup:
    max_pages = max(-(-n // PAGE) for n in lens)
    table = torch.zeros(len(lens), max_pages, dtype=torch.long)
    it = iter(pages_in_order)
    for b, n in enumerate(lens):
        for i in range(-(-n // PAGE)):
            table[b, i] = next(it)
    return DecodeGroup(token_index=torch.arange(len(lens)), page_table=table, context_lens=torch.tensor(lens),
                       page_size=PAGE, max_len=max(lens))


def test_flashinfer_page_metadata_is_the_csr_page_table() -> None:
    g = _group([5, 4, 9], [7, 2, 0, 3, 4, 1])
    indptr, indices, last = flashinfer_page_metadata(g.page_table, g.context_lens, PAGE)
    assert indptr.tolist() == [0, 2, 3, 6]
    assert indices.tolist() == [7, 2, 0, 3, 4, 1]
    assert last.tolist() == [1, 4, 1]  # 5 = 4 + 1; 4 fills its page; 9 = 4 + 4 + 1
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


@pytest.mark.parametrize("backend", [TorchDecode, TritonDecode], ids=lambda b: b.name)
def test_backends_match_the_reference(backend: type) -> None:
    gen = torch.Generator().manual_seed(0)
    lens = [1, 6, 13, 8]
    g = _group(lens, torch.randperm(16, generator=gen).tolist())
    k = torch.randn(16 * PAGE, 2, 16, generator=gen)
    v = torch.randn(16 * PAGE, 2, 16, generator=gen)
    q = torch.randn(len(lens), 6, 16, generator=gen)
    b = backend()
    b.prepare(g)
    got = b.run(q, k, v, g, None)
    want = paged_decode_reference(q, k, v, g.page_table, g.context_lens, PAGE)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_engine_gives_the_same_tokens_through_the_triton_backend(tiny: LoadedModel) -> None:
    prompts = [list(range(100, 100 + n)) for n in (3, 17, 40)]
    outputs = {}
    for name in ("torch", "triton"):
        with running_core(tiny, attention=name, max_batch_tokens=32) as h:
            assert h.core.runner.decode_backend.name == name
            rids = [h.submit(ids, greedy(12)) for ids in prompts]  # batched, of different lengths
            outputs[name] = [h.tokens(r) for r in rids]
    assert outputs["triton"] == outputs["torch"]
    assert all(len(t) == 12 for t in outputs["torch"])


def test_backends_that_cannot_run_here_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_backend("auto", CPU, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32).name == "torch"
    assert "CUDA" in (unavailable_reason("flashinfer", CPU) or "")
    assert "unknown attention backend" in (unavailable_reason("paged9000", CPU) or "")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailable, match="need a GPU"):
        select_backend("triton", CPU, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
