"""The Triton W4A16/W8A16 kernel under TRITON_INTERPRET=1 against the dequantized weight in torch."""

from __future__ import annotations

import pytest
import torch

from busserve.engine import quantized
from busserve.triton_kernels.quant_matmul import quant_matmul


def _weight(bits: int, n: int, k: int, group: int, seed: int) -> quantized.QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    if bits == 4:
        return quantized.quantize_int4(w, "test")
    if group == 16:  # Q6_K's layout: a scale per 16 weights
        g16 = w.reshape(n, -1, 16)
        scale = (g16.abs().amax(-1) / 127).to(torch.float16)
        q = (g16 / scale.float().unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8).reshape(n, k)
        return quantized.QuantizedWeight(8, 16, q.contiguous(), scale.contiguous(), None, "test")
    return quantized.quantize_int8(w, "test")


@pytest.mark.parametrize(("bits", "group"), [(4, 32), (8, 32), (8, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("rows", "n", "k"), [(1, 64, 64), (5, 100, 96), (17, 40, 160)])
def test_matches_the_dequantized_weight(bits: int, group: int, dtype: torch.dtype, rows: int, n: int, k: int
                                        ) -> None:
    w = _weight(bits, n, k, group, seed=rows + n)
    g = torch.Generator().manual_seed(k)
    x = torch.randn(rows, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if rows % 2 else None
    got = quant_matmul(x, w.bits, w.qweight, w.scales, w.mins, w.group, bias, block_n=32, block_k=64)
    want = x.float() @ w.dequantize(torch.float32).T + (bias.float() if bias is not None else 0)
    assert got.dtype == dtype and got.shape == (rows, n)
    # The weight is dequantized to x's dtype before the product (as on tensor cores): one rounding per weight.
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}[dtype]
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_strided_rows_and_block_sizes_agree() -> None:
    w = _weight(4, 48, 128, 32, seed=3)
    base = torch.randn(6, 256)
    x = base[:, :128]  # rows 256 apart: the kernel reads x through its row stride
    a = quant_matmul(x, 4, w.qweight, w.scales, w.mins, 32, block_n=16, block_k=32)
    b = quant_matmul(x.contiguous(), 4, w.qweight, w.scales, w.mins, 32, block_n=64, block_k=128)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, x @ w.dequantize().T, atol=1e-4, rtol=1e-4)


def test_refuses_a_weight_that_does_not_fit() -> None:
    w = _weight(4, 16, 64, 32, seed=1)
    with pytest.raises(ValueError, match="int4 weight holds 64 inputs, x has 96"):
        quant_matmul(torch.zeros(2, 96), 4, w.qweight, w.scales, w.mins, 32)
    with pytest.raises(ValueError, match="no 3-bit layout"):
        quant_matmul(torch.zeros(2, 64), 3, w.qweight, w.scales, w.mins, 32)
