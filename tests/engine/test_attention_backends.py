"""Decode-attention backends: same numbers from each, the same tokens from the engine through each, and clear
refusals where a backend cannot run. Triton runs under its interpreter (TRITON_INTERPRET=1, root conftest); the
C++ ``cpu`` kernel is built for this machine on first use and its tests skip, saying why, where it cannot be."""

from __future__ import annotations

import pytest
import torch

from busserve import cpu_kernels
from busserve.engine.attention_backends import (
    BackendUnavailable,
    CpuDecode,
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
needs_cpu_kernel = pytest.mark.skipif(cpu_kernels.unavailable_reason() is not None,
                                      reason=str(cpu_kernels.unavailable_reason()))


def _group(lens: list[int], pages_in_order: list[int], page: int = PAGE) -> DecodeGroup:
    max_pages = max(-(-n // page) for n in lens)
    table = torch.zeros(len(lens), max_pages, dtype=torch.long)
    it = iter(pages_in_order)
    for b, n in enumerate(lens):
        for i in range(-(-n // page)):
            table[b, i] = next(it)
    return DecodeGroup(token_index=torch.arange(len(lens)), page_table=table, context_lens=torch.tensor(lens),
                       page_size=page, max_len=max(lens))


def test_flashinfer_page_metadata_is_the_csr_page_table() -> None:
    g = _group([5, 4, 9], [7, 2, 0, 3, 4, 1])
    indptr, indices, last = flashinfer_page_metadata(g.page_table, g.context_lens, PAGE)
    assert indptr.tolist() == [0, 2, 3, 6]
    assert indices.tolist() == [7, 2, 0, 3, 4, 1]
    assert last.tolist() == [1, 4, 1]  # 5 = 4 + 1; 4 fills its page; 9 = 4 + 4 + 1
    assert indptr.dtype == indices.dtype == last.dtype == torch.int32


@pytest.mark.parametrize("backend", [TorchDecode, TritonDecode, pytest.param(CpuDecode, marks=needs_cpu_kernel)],
                         ids=lambda b: b.name)
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


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_cpu_kernel_matches_the_reference(dtype: torch.dtype, head_dim: int) -> None:
    """Lengths around the kernel's 16-position blocks, GQA groups of 3, pages in random order across the pool."""
    page = 16
    gen = torch.Generator().manual_seed(head_dim)
    lens = [1, 15, 16, 17, 100, 1000]
    pages_needed = sum(-(-n // page) for n in lens)
    g = _group(lens, torch.randperm(pages_needed + 40, generator=gen)[:pages_needed].tolist(), page)
    slots = (pages_needed + 40) * page
    k = torch.randn(slots, 2, head_dim, generator=gen).to(dtype)
    v = torch.randn(slots, 2, head_dim, generator=gen).to(dtype)
    q = (torch.randn(len(lens), 6, head_dim, generator=gen) * 2).to(dtype)
    b = CpuDecode()
    b.prepare(g)
    got = b.run(q, k, v, g, None)
    want = paged_decode_reference(q, k, v, g.page_table, g.context_lens, page)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@needs_cpu_kernel
def test_cpu_kernel_rejects_what_it_cannot_run() -> None:
    CpuDecode()  # builds and registers the op
    q = torch.randn(1, 4, 64)
    k = torch.randn(16, 2, 64)
    slots, lens = torch.arange(4), torch.tensor([4])
    with pytest.raises(RuntimeError, match="head_dim must be"):
        torch.ops.busserve.paged_decode(torch.randn(1, 4, 48), torch.randn(16, 2, 48), torch.randn(16, 2, 48),
                                        slots, lens, 4, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        torch.ops.busserve.paged_decode(q, k.double(), k.double(), slots, lens, 4, 1.0)
    with pytest.raises(RuntimeError, match="slots must be int64"):
        torch.ops.busserve.paged_decode(q, k, k, slots.int(), lens, 4, 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.busserve.paged_decode(torch.randn(1, 64, 4).transpose(1, 2), k, k, slots, lens, 4, 1.0)


@pytest.mark.parametrize("other", ["triton", pytest.param("cpu", marks=needs_cpu_kernel)])
def test_engine_gives_the_same_tokens_through_each_backend(tiny: LoadedModel, other: str) -> None:
    prompts = [list(range(100, 100 + n)) for n in (3, 17, 40)]
    outputs = {}
    for name in ("torch", other):
        with running_core(tiny, attention=name, max_batch_tokens=32) as h:
            assert h.core.runner.decode_backend.name == name
            prefill = h.core.runner.prefill_backend
            assert (prefill.name if prefill is not None else None) == ("triton" if name == "triton" else None)
            # Batched, of different lengths; the 40-token prompt is chunked under the 32-token budget, so its second
            # chunk attends over pages written by the first.
            rids = [h.submit(ids, greedy(12)) for ids in prompts]
            outputs[name] = [h.tokens(r) for r in rids]
            # A prefix-cache hit: the prompt's cached pages and its new tail in one paged prefill chunk.
            hit = h.submit(prompts[2] + [7, 8, 9], greedy(6))
            outputs[name].append(h.tokens(hit))
            assert h.wait(hit)[-1].usage.cached_tokens >= 32
    assert outputs[other] == outputs["torch"]
    assert [len(t) for t in outputs["torch"]] == [12, 12, 12, 6]


@needs_cpu_kernel
def test_real_model_gives_the_same_tokens_through_the_cpu_kernel(smol: LoadedModel, chat_ids: list[int]) -> None:
    outputs = {}
    for name in ("torch", "cpu"):
        with running_core(smol, attention=name) as h:
            assert h.core.runner.decode_backend.name == name
            rids = [h.submit(ids, greedy(24)) for ids in (chat_ids, chat_ids[:9], chat_ids * 3)]
            outputs[name] = [h.tokens(r) for r in rids]
    assert outputs["cpu"] == outputs["torch"]


def test_backends_that_cannot_run_here_say_why(monkeypatch: pytest.MonkeyPatch) -> None:
    auto = select_backend("auto", CPU, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32).name
    assert auto == ("cpu" if cpu_kernels.unavailable_reason() is None else "torch")
    # A head size the kernel has no variant for: auto takes the torch path, an explicit "cpu" is refused.
    assert select_backend("auto", CPU, num_heads=4, num_kv_heads=2, head_dim=48, dtype=torch.float32).name == "torch"
    with pytest.raises(BackendUnavailable, match="cpu"):
        select_backend("cpu", CPU, num_heads=4, num_kv_heads=2, head_dim=48, dtype=torch.float32)
    assert "CUDA" in (unavailable_reason("flashinfer", CPU) or "")
    assert "unknown attention backend" in (unavailable_reason("paged9000", CPU) or "")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailable, match="need a GPU"):
        select_backend("triton", CPU, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32)
