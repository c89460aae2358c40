"""Quantized weights: the AVX-512 kernel against torch, every GGUF type's conversion against gguf-py's own
dequantization, tiny random Llamas written as GGUF files in each type against their dequantized reference, and
the real default model (Q4_1) served as it is."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from busserve.engine import quantized
from busserve.engine.model_loader import LoadedModel, default_gguf, load_model
from tests.helpers import greedy, running_core

KERNEL = quantized.kernel_unavailable_reason()
needs_kernel = pytest.mark.skipif(KERNEL is not None, reason=f"quant_linear kernel unavailable: {KERNEL}")


def _weight(bits: int, n: int, k: int, group: int = 32, seed: int = 0) -> quantized.QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if bits == 4:
        return quantized.quantize_int4(w, "test")
    if group == 16:  # Q6_K's layout: a scale per 16 weights (K need only be a multiple of 16)
        g16 = w.reshape(n, -1, 16)
        scale = (g16.abs().amax(-1) / 127).to(torch.float16)
        q = (g16 / scale.float().unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
        return quantized.QuantizedWeight(8, 16, q.contiguous(), scale.contiguous(), None, "test")
    return quantized.quantize_int8(w, "test")


@needs_kernel
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 32), (8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n,k", [(1, 64, 64), (3, 100, 576), (17, 576, 1536), (40, 33, 96)])
def test_kernel_matches_torch(bits: int, group: int, dtype: torch.dtype, rows: int, n: int, k: int) -> None:
    w = _weight(bits, n, k, group)
    x = torch.randn(rows, k).to(dtype)
    bias = torch.randn(n)
    layer = quantized.QuantLinear(w, bias=bias)
    got = layer(x)
    want = x.float() @ w.dequantize().T + bias
    assert got.dtype == dtype
    # fp32: only the summation order differs. bf16: the kernel rounds the dequantized weights to bf16 (vdpbf16ps)
    # and the output once, so the error is a few bf16 steps of the largest output.
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert (got.float() - want).abs().max().item() <= tol * want.abs().max().item()
    assert torch.equal(layer(x), got)  # same bits on a repeat


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_groups_of_16_with_an_odd_number_of_chunks(dtype: torch.dtype) -> None:
    """K = 48: three 16-weight chunks, which the bf16 loop (32 weights a step) must not cut short."""
    w = _weight(8, 20, 48, group=16)
    x = torch.randn(2, 48).to(dtype)
    got = quantized.QuantLinear(w)(x)
    want = x.float() @ w.dequantize().T
    assert (got.float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_is_batch_invariant_and_takes_strided_rows(bits: int, threads: int) -> None:
    """A row's output does not depend on how many rows share the call, nor on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer = quantized.QuantLinear(_weight(bits, 200, 576))
        x = torch.randn(70, 576 * 2).to(torch.bfloat16)[:, ::2]  # strided rows
        full = layer(x)
        for lo, hi in [(0, 1), (5, 6), (3, 20), (33, 70)]:
            assert torch.equal(layer(x[lo:hi]), full[lo:hi])
        torch.set_num_threads(1)
        assert torch.equal(layer(x), full)
    finally:
        torch.set_num_threads(before)


needs_x16 = pytest.mark.skipif(KERNEL is not None or not quantized.x16_available(),
                               reason="the x16 int4 kernel needs AVX512-BF16")


@needs_x16
@pytest.mark.parametrize("rows,n,k", [(1, 16, 32), (2, 100, 576), (9, 576, 1536), (16, 33, 96), (70, 192, 576)])
@pytest.mark.parametrize("gemm_from_rows", [0, 9])
def test_x16_int4_kernel_and_its_gemm_path_match_torch(rows: int, n: int, k: int, gemm_from_rows: int) -> None:
    w = _weight(4, n, k)
    layer = quantized.QuantLinear(w, bias=torch.randn(n), dtype=torch.bfloat16)
    assert layer.weight_q.layout == "x16" and layer.out_features == n
    assert torch.equal(layer.weight_q.dequantize(), w.dequantize())  # the re-laid weight is the same weight
    layer.gemm_from_rows = gemm_from_rows
    x = torch.randn(rows, k).to(torch.bfloat16)
    got = layer(x)
    want = x.float() @ w.dequantize().T + layer.bias_value
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    assert (got.float() - want).abs().max().item() <= 2e-2 * want.abs().max().item()
    if gemm_from_rows == 0:  # the register kernel alone is batch-invariant
        for lo, hi in [(0, 1), (rows - 1, rows), (0, (rows + 1) // 2)]:
            assert torch.equal(layer(x[lo:hi]), got[lo:hi])


def test_torch_fallback_matches_the_kernel_definition() -> None:
    w = _weight(4, 50, 64)
    x = torch.randn(4, 64)
    got = quantized.reference_linear(x, w, None)
    torch.testing.assert_close(got, x @ w.dequantize().T)


# -- GGUF types --------------------------------------------------------------------------------------------------

# A fp16 scale of the K-quants (d·sc) is rounded once: relative error up to 2^-11 of the largest weight.
K_QUANT_RTOL = 2.0**-10


def random_k_blocks(type_name: str, rows: int, k: int, seed: int) -> np.ndarray:
    """Valid random blocks of a K-quant type ([rows, bytes]): random codes and sub-block scales, small fp16
    super-block scales (gguf-py cannot quantize into K-quants, only read them)."""
    rng = np.random.default_rng(seed)
    qtype = gguf.GGMLQuantizationType[type_name]
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(rows * (k // block_size), block_bytes), dtype=np.uint8)
    if type_name == "Q4_K":
        blocks[:, 0:2] = np.full((len(blocks), 1), 3e-4, np.float16).view(np.uint8)
        blocks[:, 2:4] = np.full((len(blocks), 1), 5e-4, np.float16).view(np.uint8)
    else:  # Q6_K: int8 sub-block scales, then d
        blocks[:, 192:208] = rng.integers(-40, 40, size=(len(blocks), 16), dtype=np.int8).view(np.uint8)
        blocks[:, 208:210] = (rng.uniform(1e-4, 4e-4, size=(len(blocks), 1))).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def gguf_matrix(type_name: str, rows: int, k: int, seed: int) -> np.ndarray:
    """A [rows, k] weight as the raw blocks of ``type_name``."""
    if type_name in ("Q4_K", "Q6_K"):
        return random_k_blocks(type_name, rows, k, seed)
    w = np.random.default_rng(seed).normal(0, 0.15, size=(rows, k)).astype(np.float32)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[type_name])


@pytest.mark.parametrize("type_name", quantized.SUPPORTED_TYPES)
def test_every_gguf_type_converts_to_what_gguf_py_dequantizes(type_name: str) -> None:
    rows, k = 24, 512
    raw = gguf_matrix(type_name, rows, k, seed=1)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name]).reshape(rows, k)
    w = quantized.from_gguf(raw, type_name, rows)
    assert w.bits == (4 if type_name in quantized.INT4_TYPES else 8)
    got = w.dequantize().numpy()
    if type_name in ("Q4_K", "Q6_K"):
        assert np.abs(got - want).max() <= K_QUANT_RTOL * np.abs(want).max()
    else:
        np.testing.assert_array_equal(got, want)
    # Stays at about the quantized size: at most 10 bits a weight (Q6_K's expanded scales), never dense.
    assert w.nbytes * 8 / (rows * k) <= 10.0


def test_unsupported_gguf_type_is_refused_by_name() -> None:
    raw = gguf.quants.quantize(np.zeros((2, 64), np.float32), gguf.GGMLQuantizationType.Q5_0)
    with pytest.raises(ValueError, match="Q5_0"):
        quantized.from_gguf(raw, "Q5_0", 2)


def write_tiny_gguf(path: Path, layer_types: tuple[str, ...], *, seed: int = 0, hidden: int = 256, heads: int = 4,
                    kv_heads: int = 2, ffn: int = 512) -> Path:
    """A random Llama as a GGUF file with the default model's tokenizer, layer i's matrices in
    ``layer_types[i]`` (mixed files are common: Q4_K_M mixes Q4_K and Q6_K), the embedding in Q8_0 as the
    default model's, the output tied to it as SmolLM2's."""
    layers = len(layer_types)
    source = gguf.GGUFReader(str(default_gguf()))
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, field in source.fields.items():
        if key.startswith("tokenizer."):
            value = field.contents()
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, value, field.types[0], sub_type=sub)
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    writer.add_block_count(layers)
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_rope_dimension_count(hidden // heads)
    rng = np.random.default_rng(seed)

    def matrix(name: str, rows: int, k: int, qtype: str) -> None:
        raw = gguf_matrix(qtype, rows, k, seed=int(rng.integers(1 << 30)))
        writer.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])

    def norm(name: str, n: int) -> None:
        writer.add_tensor(name, rng.uniform(0.8, 1.2, size=n).astype(np.float32))

    matrix("token_embd.weight", vocab, hidden, "Q8_0")
    norm("output_norm.weight", hidden)
    kv = hidden // heads * kv_heads
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight", hidden)
        norm(f"blk.{i}.ffn_norm.weight", hidden)
        for name, rows, k in [("attn_q", hidden, hidden), ("attn_k", kv, hidden), ("attn_v", kv, hidden),
                              ("attn_output", hidden, hidden), ("ffn_gate", ffn, hidden), ("ffn_up", ffn, hidden),
                              ("ffn_down", hidden, ffn)]:
            matrix(f"blk.{i}.{name}.weight", rows, k, layer_types[i])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _logits(loaded: LoadedModel, ids: list[int]) -> torch.Tensor:
    model = loaded.model
    before = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"  # stock attention: this compares weights, not the paged cache
    try:
        with torch.inference_mode():
            return model(input_ids=torch.tensor([ids])).logits[0].float()
    finally:
        model.config._attn_implementation = before


@pytest.mark.slow
def test_tiny_gguf_with_a_layer_in_each_type_matches_its_dequantized_reference(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUSSERVE_MODEL_CACHE", str(tmp_path / "cache"))
    path = write_tiny_gguf(tmp_path / "tiny-mixed.gguf", quantized.SUPPORTED_TYPES)
    served = load_model(str(path), dtype=torch.float32, quantization="auto")
    for layer, type_name in zip(served.model.model.layers, quantized.SUPPORTED_TYPES, strict=True):
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.down_proj):
            assert isinstance(proj, quantized.QuantLinear) and proj.weight_q.source == type_name
    assert isinstance(served.model.model.embed_tokens, quantized.QuantEmbedding)
    assert served.model.lm_head.weight_q is served.model.model.embed_tokens.weight_q  # tied: one copy
    # Only the norms are dense.
    assert sum(p.numel() for p in served.model.parameters()) == 256 * (2 * len(quantized.SUPPORTED_TYPES) + 1)
    reference = load_model(str(path), dtype=torch.float32, quantization="none")  # transformers' dequantization
    ids = served.tokenizer("The quick brown fox jumps over the lazy dog")["input_ids"]
    got, want = _logits(served, ids), _logits(reference, ids)
    # The K-quant layers' fp16 scales (K_QUANT_RTOL per weight) dominate the difference.
    assert (got - want).abs().max().item() <= 1e-2 * want.abs().max().item()
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_int4_and_int8_modes_requantize_a_dense_model(tiny_dir: Path) -> None:
    """Each weight within half a step of its group's grid, and the served model exactly the dense model over the
    dequantized weights (up to summation order)."""
    dense = load_model(str(tiny_dir), dtype=torch.float32)
    ids = dense.tokenizer("Hello there, how are you")["input_ids"]
    originals = {name: m.weight.detach().clone() for name, m in dense.model.named_modules()
                 if isinstance(m, torch.nn.Linear)}
    for mode in ("int8", "int4"):
        served = load_model(str(tiny_dir), dtype=torch.float32, quantization=mode)
        layers = {name: m for name, m in served.model.named_modules() if isinstance(m, quantized.QuantLinear)}
        assert set(layers) == set(originals)
        for name, layer in layers.items():
            w = layer.weight_q
            groups = originals[name].reshape(w.out_features, -1, 32)
            if mode == "int8":
                step = groups.abs().amax(-1, keepdim=True) / 127
            else:
                step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
            err = (w.dequantize().reshape_as(groups) - groups).abs()
            assert bool((err <= step * 0.5 + 1e-3 * step + 1e-6).all()), (mode, name)
            model_layer = dense.model.get_submodule(name)
            model_layer.weight.data.copy_(w.dequantize())
        got, want = _logits(served, ids), _logits(dense, ids)
        assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item(), mode


def test_unknown_quantization_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="--quantization 'int3'"):
        load_model(None, quantization="int3")


@pytest.fixture(scope="module")
def smol_q4() -> LoadedModel:
    torch.set_num_threads(2)
    return load_model(None, dtype=torch.bfloat16, quantization="auto")


@pytest.mark.slow
def test_default_model_is_served_at_its_quantized_size(smol_q4: LoadedModel) -> None:
    mods = list(smol_q4.model.modules())
    linears = [m for m in mods if isinstance(m, quantized.QuantLinear)]
    assert len(linears) == 30 * 7 + 1
    assert {m.weight_q.source for m in linears} == {"Q4_1", "Q8_0"}
    file_size = default_gguf().stat().st_size
    # Quantized weights within 5% of the file (the fp16 min of Q4_1 is kept; nothing is dense but the norms).
    assert quantized.quantized_bytes(smol_q4.model) <= 1.05 * file_size
    assert sum(p.nbytes for p in smol_q4.model.parameters()) < 1 << 20


@pytest.mark.slow
def test_default_model_in_q4_1_answers_paris(smol_q4: LoadedModel) -> None:
    tok = smol_q4.tokenizer
    # "What is the capital of France?" alone is a tie in bf16 between "The" and "L" for the first token (both
    # logits 25.125, in the dense model too within 0.25), so bf16 rounding picks the answer; this asks with margin.
    question = "What is the capital of France? Answer in one word."
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     tokenize=False)
    with running_core(smol_q4) as core:
        rid = core.submit(tok(prompt)["input_ids"], greedy(12))
        assert "Paris" in tok.decode(core.tokens(rid))


@pytest.mark.slow
def test_default_model_q4_1_agrees_with_its_fp32_dequantization(smol_q4: LoadedModel, smol: LoadedModel) -> None:
    """Teacher-forced next-token agreement over a fixed text: the quantized path (bf16 activations) against the
    same file dequantized to fp32."""
    text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
            "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
    ids = smol.tokenizer(text)["input_ids"]
    got, want = _logits(smol_q4, ids), _logits(smol, ids)
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    assert agree >= 0.9, agree


def test_rows_layout_undoes_the_x16_interleave() -> None:
    w = _weight(4, 37, 96)  # 37 outputs: the x16 layout pads them to 48
    back = w.interleaved().rows_layout()
    assert back.layout == "rows" and back.out_features == 37
    for a, b in [(w.qweight, back.qweight), (w.scales, back.scales), (w.mins, back.mins)]:
        assert b is not None and torch.equal(a, b)


def test_moving_to_a_device_keeps_a_tied_weight_one_copy_in_the_row_layout() -> None:
    w = _weight(4, 32, 64).interleaved()
    linear = quantized.QuantLinear(w, bias=torch.zeros(32), use_kernel=False)
    model = torch.nn.ModuleDict({"embed": quantized.QuantEmbedding(w, torch.float32), "head": linear})
    quantized.move_to(model, torch.device("meta"))  # any non-CPU device takes the GPU kernel's layout
    moved = model["head"].weight_q
    assert moved is model["embed"].weight_q and moved.layout == "rows" and moved.out_features == 32
    assert {t.device.type for t in (moved.qweight, moved.scales, moved.mins, linear.bias_value)} == {"meta"}
