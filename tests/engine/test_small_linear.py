"""busserve's AMX kernel for decode-sized linear products (busserve/cpu_kernels/small_linear.cpp), against a fp32
reference: shapes that do and do not fill its tiles, bias, threads, the hand-over to oneDNN above ``SMALL_ROWS``,
and a model whose logits stay those of the unpacked one. Skipped where the CPU has no AMX."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from busserve import cpu_kernels
from busserve.engine.packed_linear import (
    SMALL_ROWS,
    PackedLinear,
    dtype_unpackable_reason,
    maybe_pack,
    small_rows_unavailable_reason,
)

_why_not = cpu_kernels.unavailable_reason() or cpu_kernels.amx_unavailable_reason()
needs_amx = pytest.mark.skipif(_why_not is not None, reason=str(_why_not))


def _within_bf16_rounding(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """``got`` is the fp32 product rounded once to bf16 (half an ulp: 2^-9 relative), give or take the order of
    the fp32 sum."""
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    err = (got.float() - want).abs()
    bound = want.abs() * 2.0**-8 + 1e-3
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} (worst bound {bound.min().item():.3g})"


@pytest.fixture(scope="module", autouse=True)
def _kernels() -> None:
    if _why_not is None:
        cpu_kernels.load()


@needs_amx
@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40, SMALL_ROWS])
@pytest.mark.parametrize(("out_features", "in_features"), [(200, 96), (48, 64), (7, 32)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_small_linear_matches_the_fp32_product(rows: int, out_features: int, in_features: int, bias: bool) -> None:
    torch.manual_seed(rows * 1000 + out_features)
    w = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    b = torch.randn(out_features, dtype=torch.bfloat16) if bias else None
    x = torch.randn(rows, in_features, dtype=torch.bfloat16)
    got = torch.ops.busserve.small_linear(x, torch.ops.busserve.pack_vnni(w), out_features, b)
    assert got.shape == (rows, out_features) and got.dtype == torch.bfloat16
    _within_bf16_rounding(got, x, w, b)


@needs_amx
def test_rows_with_a_stride_and_several_threads() -> None:
    """A view of every other row (row stride twice the width), on two threads and on one: the same bits."""
    torch.manual_seed(1)
    w = torch.randn(300, 128, dtype=torch.bfloat16)
    packed = torch.ops.busserve.pack_vnni(w)
    x = torch.randn(40, 128, dtype=torch.bfloat16)[::2]
    assert x.stride(0) == 256
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = torch.ops.busserve.small_linear(x, packed, 300, None)
        torch.set_num_threads(1)
        one = torch.ops.busserve.small_linear(x, packed, 300, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    _within_bf16_rounding(one, x, w, None)


@needs_amx
def test_bad_shapes_are_refused_with_what_was_wrong() -> None:
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.busserve.pack_vnni(torch.zeros(16, 40, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.busserve.pack_vnni(torch.zeros(16, 64))
    packed = torch.ops.busserve.pack_vnni(torch.zeros(20, 64, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.busserve.small_linear(torch.zeros(2, 32, dtype=torch.bfloat16), packed, 20, None)
    with pytest.raises(RuntimeError, match="features"):
        torch.ops.busserve.small_linear(torch.zeros(2, 64, dtype=torch.bfloat16), packed, 40, None)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.busserve.small_linear(torch.zeros(2, 64, dtype=torch.bfloat16), packed, 20,
                                        torch.zeros(3, dtype=torch.bfloat16))


@needs_amx
def test_packed_linear_takes_small_products_to_the_kernel_and_large_ones_to_onednn() -> None:
    """Both paths interleaved, as decode and prefill steps interleave in an engine: each leaves AMX's tiles in a
    state the other can use."""
    torch.manual_seed(2)
    linear = nn.Linear(96, 200, bias=True, dtype=torch.bfloat16)
    packed = PackedLinear(linear, small_rows=True)
    assert packed.tile_weight is not None and "AMX" in repr(packed)
    for rows in [1, SMALL_ROWS + 1, 5, 300, SMALL_ROWS, 2]:
        x = torch.randn(1, rows, 96, dtype=torch.bfloat16)
        got = packed(x)
        assert got.shape == (1, rows, 200)
        _within_bf16_rounding(got[0], x[0], linear.weight, linear.bias)
        if rows > SMALL_ROWS:  # oneDNN's product: bit-identical to F.linear
            assert torch.equal(got, F.linear(x, linear.weight, linear.bias))
    # Weights the kernel's tiles do not fit (fp16, or in_features not a multiple of 32) stay on oneDNN alone.
    assert PackedLinear(nn.Linear(96, 8, dtype=torch.float16), small_rows=True).tile_weight is None
    assert PackedLinear(nn.Linear(40, 8, dtype=torch.bfloat16), small_rows=True).tile_weight is None


@needs_amx
@torch.inference_mode()
def test_a_model_on_the_kernel_keeps_its_greedy_logits(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    def load() -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.bfloat16, attn_implementation="sdpa")

    plain, fast = load(), load()
    assert small_rows_unavailable_reason(fast) is None
    assert maybe_pack(fast, "auto") == 2 * 7 + 1
    assert all(m.tile_weight is not None for m in fast.modules() if isinstance(m, PackedLinear))
    ids = torch.randint(0, plain.config.vocab_size, (1, 9))  # nine rows: every product on the kernel
    got, want = fast(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got.float() - want.float()).abs().max().item() < 0.05


def test_onednn_mode_and_fp32_keep_one_copy_of_the_weights() -> None:
    bf16 = nn.Sequential(nn.Linear(64, 8, dtype=torch.bfloat16))
    if dtype_unpackable_reason(torch.bfloat16) is None:  # oneDNN packs bf16 on this CPU
        assert maybe_pack(bf16, "onednn") == 1
        assert isinstance(bf16[0], PackedLinear) and bf16[0].tile_weight is None
    fp32 = nn.Sequential(nn.Linear(64, 8))
    assert "bfloat16" in (small_rows_unavailable_reason(fp32) or "")
