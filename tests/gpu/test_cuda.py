"""The GPU path end to end on a CUDA device: the engine's greedy tokens against the CPU reference, the Triton and
flashinfer attention kernels, pack/unpack and the W4A16 kernel against torch, a quantized engine, and PD and
migration between two GPU engine processes token-identical to one engine. Run by scripts/gpu_check.sh."""

from __future__ import annotations

import asyncio
import importlib.util
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from busserve.bus.client import Bus
from busserve.engine.model_loader import LoadedModel, load_model
from busserve.testing import ProcessCluster
from tests.helpers import assert_greedy_equal, greedy, live_view, reference_greedy, running_core, wait_idle_no_leaks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
PAGE = 16


def _prompts(loaded: LoadedModel) -> list[list[int]]:
    tok = loaded.tokenizer
    texts = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a land far away, " * 8]
    return [list(tok(t)["input_ids"]) for t in texts]


def test_engine_on_cuda_gives_the_cpu_reference_greedy_tokens(cuda_tiny: LoadedModel, cpu_reference: LoadedModel
                                                               ) -> None:
    with running_core(cuda_tiny, max_batch_tokens=64) as h:
        assert h.core.runner.device.type == "cuda" and h.core.kv.data.device.type == "cuda"
        rids = [h.submit(ids, greedy(16)) for ids in _prompts(cuda_tiny)]  # batched; the long one chunked
        got = [h.tokens(r) for r in rids]
        hit = h.submit(_prompts(cuda_tiny)[2], greedy(16))  # a prefix-cache hit on the GPU pool
        got_hit = h.tokens(hit)
        assert h.wait(hit)[-1].usage.cached_tokens > 0
    for ids, tokens in zip(_prompts(cuda_tiny), got, strict=True):
        assert_greedy_equal(cpu_reference, ids, tokens, reference_greedy(cpu_reference, ids, 16))
    assert_greedy_equal(cpu_reference, _prompts(cuda_tiny)[2], got_hit, got[2])


def test_the_nvshmem_transport_is_refused_until_its_writer_exists() -> None:
    from busserve.kv.transfer.nvshmem import TransportUnavailable, require_nvshmem

    with pytest.raises(TransportUnavailable, match="nvshmem transport is unavailable"):
        require_nvshmem()


def test_cuda_graphs_on_and_off_give_the_same_tokens(cuda_tiny: LoadedModel) -> None:
    outputs = {}
    for graphs in (False, True):
        with running_core(cuda_tiny, attention="triton", cuda_graphs=graphs, max_running=16) as h:
            captured = h.core.runner.graphs
            assert (captured is not None and len(captured.graphs) == len(captured.buckets)) == graphs
            # Five requests finishing at different steps: decode batches of 5, 4, 3, 2, 1 rows, padded to buckets.
            rids = [h.submit(ids, greedy(n)) for ids, n in zip(_prompts(cuda_tiny) * 2, (9, 14, 6, 12, 10),
                                                               strict=False)]
            outputs[graphs] = [h.tokens(r) for r in rids]
            if graphs:
                assert captured is not None and captured.replays > 0
    assert outputs[True] == outputs[False]


def test_smollm2_on_cuda_gives_the_cpu_reference_greedy_tokens(smol_gguf: Path) -> None:
    """The real default model in bf16 on the GPU against fp32 on the CPU, within the near-tie rule."""
    cpu = load_model(str(smol_gguf), dtype=torch.float32)
    gpu = load_model(str(smol_gguf), dtype=torch.bfloat16, device="cuda")
    tok = cpu.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    prompts = [list(tok(chat, add_special_tokens=False)["input_ids"]), *_prompts(cpu)]
    with running_core(gpu) as h:
        got = [h.tokens(h.submit(ids, greedy(20))) for ids in prompts]
    assert "Paris" in tok.decode(got[0])
    for ids, tokens in zip(prompts, got, strict=True):
        assert_greedy_equal(cpu, ids, tokens, reference_greedy(cpu, ids, 20))


@pytest.mark.parametrize("attention", ["triton", "flashinfer"])
def test_attention_backends_give_the_same_tokens(cuda_tiny: LoadedModel, attention: str) -> None:
    if attention == "flashinfer" and importlib.util.find_spec("flashinfer") is None:
        pytest.skip("flashinfer is not installed")
    outputs = {}
    for name in ("torch", attention):
        with running_core(cuda_tiny, attention=name, max_batch_tokens=64) as h:
            outputs[name] = [h.tokens(h.submit(ids, greedy(12))) for ids in _prompts(cuda_tiny)]
    assert outputs[attention] == outputs["torch"]


def test_sampling_on_cuda_is_seeded_per_request(cuda_tiny: LoadedModel) -> None:
    from busserve.messages import SamplingParams

    sp = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, top_p=0.9, seed=3, ignore_eos=True)
    with running_core(cuda_tiny) as h:
        ids = _prompts(cuda_tiny)[0]
        a = h.tokens(h.submit(ids, sp))
        b = h.tokens(h.submit(ids, sp))
    assert a == b and len(a) == 10


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_kernels_match_torch_on_cuda(dtype: torch.dtype) -> None:
    from busserve.triton_kernels.kv_pages import pack_kv, pack_kv_reference, unpack_kv, unpack_kv_reference
    from busserve.triton_kernels.paged_attention import paged_decode, paged_decode_reference
    from busserve.triton_kernels.paged_prefill import paged_prefill, paged_prefill_reference

    g = torch.Generator(device=CUDA).manual_seed(0)
    k = torch.randn(64 * PAGE, 8, 128, generator=g, device=CUDA).to(dtype)
    v = torch.randn(64 * PAGE, 8, 128, generator=g, device=CUDA).to(dtype)
    pages = random.Random(0).sample(range(64), 40)
    table = torch.tensor([pages[:20], pages[20:]], dtype=torch.int32, device=CUDA)
    lens = torch.tensor([300, 129], dtype=torch.int32, device=CUDA)
    q = torch.randn(2, 32, 128, generator=g, device=CUDA).to(dtype)
    torch.testing.assert_close(paged_decode(q, k, v, table, lens, PAGE).float().cpu(),
                               paged_decode_reference(q.cpu(), k.cpu(), v.cpu(), table.cpu(), lens.cpu(), PAGE).float(),
                               atol=2e-2, rtol=2e-2)
    qp = torch.randn(120, 32, 128, generator=g, device=CUDA).to(dtype)
    starts, qlens, ctxs = [0, 100], [100, 20], [300, 129]
    got = paged_prefill(qp, k, v, table, torch.tensor(starts, device=CUDA), torch.tensor(qlens, device=CUDA),
                        torch.tensor(ctxs, device=CUDA), PAGE, 100)
    want = paged_prefill_reference(qp.cpu(), k.cpu(), v.cpu(), table.cpu(), starts, qlens, ctxs, PAGE)
    torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)
    slots = torch.randperm(64 * PAGE, device=CUDA)[:500]
    packed = pack_kv(k, v, slots)
    assert torch.equal(packed, pack_kv_reference(k, v, slots))
    k2, v2, k3, v3 = (torch.zeros_like(k) for _ in range(4))
    unpack_kv(packed, k2, v2, slots)
    unpack_kv_reference(packed, k3, v3, slots)
    assert torch.equal(k2, k3) and torch.equal(v2, v3)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("rows", [1, 16, 100])
def test_quantized_matmul_matches_torch_on_cuda(bits: int, rows: int) -> None:
    from busserve.engine import quantized
    from busserve.triton_kernels.quant_matmul import quant_matmul

    w = torch.randn(4096, 4096) * 0.02
    qw = quantized.quantize_int4(w, "t") if bits == 4 else quantized.quantize_int8(w, "t")
    x = torch.randn(rows, 4096, dtype=torch.bfloat16)
    want = x.float() @ qw.dequantize().T
    mins = None if qw.mins is None else qw.mins.to(CUDA)
    got = quant_matmul(x.to(CUDA), bits, qw.qweight.to(CUDA), qw.scales.to(CUDA), mins, qw.group)
    torch.testing.assert_close(got.float().cpu(), want, atol=0.15, rtol=2e-2)


def test_int4_engine_on_cuda_matches_the_cpu_int4_engine(gpu_tiny_dir: Path) -> None:
    outputs = {}
    for device in ("cpu", "cuda"):
        loaded = load_model(str(gpu_tiny_dir), dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                            device=device, quantization="int4")
        with running_core(loaded) as h:
            outputs[device] = [h.tokens(h.submit(ids, greedy(12))) for ids in _prompts(loaded)]
    assert outputs["cuda"] == outputs["cpu"]


@pytest.fixture(scope="module")
def gpu_pair(gpu_tiny_dir: Path) -> Iterator[ProcessCluster]:
    with ProcessCluster() as cluster:
        for eid in ("GA", "GB"):
            cluster.start_engine(eid, "--model", str(gpu_tiny_dir), "--device", "cuda", "--dtype", "bfloat16",
                                 "--kv-pages", "1024", "--transport", "cuda_ipc", "--transport", "bus")
        cluster.wait_engines({"GA", "GB"})
        yield cluster


@pytest.mark.asyncio
@pytest.mark.parametrize("transport", ["cuda_ipc", "bus"])
@pytest.mark.parametrize("name", ["pd", "balanced_pd_0.5", "migrate"])
async def test_two_gpu_engines_compose_into_the_one_engine_tokens(gpu_pair: ProcessCluster, cuda_tiny: LoadedModel,
                                                                  cpu_reference: LoadedModel, name: str,
                                                                  transport: str) -> None:
    from tests.kv.test_transfer_e2e import PATTERNS, one_engine, prompt_of, run_pattern

    bus = await Bus.connect(gpu_pair.bus_config(), name="gpu-test")
    try:
        view = await live_view(bus, {"GA", "GB"})
        prompt = prompt_of(cuda_tiny, 300, seed=len(name) * 7 + len(transport))
        want = await one_engine(bus, "GA", prompt)  # GA now holds the prompt in its cache (the migration source)
        await asyncio.sleep(0.3)  # KV events reach the view
        assert {"cuda_ipc", "bus"} <= set(view.get("GB").status.transports)
        got, sent = await run_pattern(bus, PATTERNS[name], view.get("GA"), view.get("GB"), prompt, transport)
        assert sent is not None and sent.bytes_sent > 0
        # GPU bf16 on both sides: the composition may only differ from one engine at a near-tie.
        assert_greedy_equal(cpu_reference, prompt, got, want)
        await wait_idle_no_leaks(bus, {"GA", "GB"})
    finally:
        await bus.close()
