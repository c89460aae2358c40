"""Weight-only quantized matmul in Triton (W4A16 / W8A16): the GPU kernel over busserve's quantized layouts.

``y = x @ W.T (+ bias)`` with ``x`` [M, K] in fp16/bf16/fp32 and W in the layouts of ``engine/quantized.py``:

* **int4**: ``qweight`` uint8 [N, K/2] — byte t of a 32-wide group holds weight t (low nibble) and t + 16 (high
  nibble) — with fp16 ``scales`` and ``mins`` [N, K/32]; w = scale·q + min.
* **int8**: ``qweight`` int8 [N, K] with fp16 ``scales`` [N, K/G]; w = scale·q.

MARLIN's principle, kept simple: the weight crosses memory once, in its packed form, and is dequantized in
registers right before the tensor-core product; the activations are the small operand. Each program owns a
``BLOCK_M × BLOCK_N`` tile of the output and walks K in steps of ``BLOCK_K`` (a multiple of the group). For int4 a
step loads ``BLOCK_K / 2`` bytes per output row and splits them into the low-nibble and the high-nibble halves;
the matching activation columns are gathered with the same pattern, so each half is one ``tl.dot`` and no nibble
is ever shuffled across lanes. Accumulation is fp32.

Tested on the CPU under ``TRITON_INTERPRET=1`` against ``QuantizedWeight.dequantize`` (tests/triton_kernels/
test_quant_matmul.py); ``QuantLinear`` runs it for weights on a CUDA device.
"""

# No ``from __future__ import annotations`` here: Triton before 3.2 reads ``tl.constexpr`` only from real (not
# string) annotations.

import os

import torch
import triton
import triton.language as tl

INT4_GROUP = 32


@triton.jit
def _w4_matmul(x_ptr, q_ptr, s_ptr, m_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
               HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_K // 2)  # byte j of the step: group j // 16, weights (j % 16) and (j % 16) + 16
    k_lo = (j // 16) * 32 + j % 16
    groups = K // 32
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + k_lo < K
        x_lo = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + k_lo)[None, :],
                       mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        x_hi = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + k_lo + 16)[None, :],
                       mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = n_ok[:, None] & k_ok[None, :]
        b = tl.load(q_ptr + rn[:, None] * (K // 2) + (k0 // 2 + j)[None, :], mask=w_ok, other=0).to(tl.int32)
        g = rn[:, None] * groups + (k0 // 32 + j // 16)[None, :]
        scale = tl.load(s_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
        low = tl.load(m_ptr + g, mask=w_ok, other=0.0).to(tl.float32)
        w_lo = ((b & 0xF).to(tl.float32) * scale + low).to(x_lo.dtype)
        w_hi = ((b >> 4).to(tl.float32) * scale + low).to(x_lo.dtype)
        if DOT_FP32:
            x_lo, x_hi, w_lo, w_hi = x_lo.to(tl.float32), x_hi.to(tl.float32), w_lo.to(tl.float32), w_hi.to(tl.float32)
        if IEEE:  # fp32 activations: full fp32 products, not TF32's 10-bit mantissas
            acc += tl.dot(x_lo, tl.trans(w_lo), input_precision="ieee") + tl.dot(x_hi, tl.trans(w_hi),
                                                                                input_precision="ieee")
        else:
            acc += tl.dot(x_lo, tl.trans(w_lo)) + tl.dot(x_hi, tl.trans(w_hi))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _w8_matmul(x_ptr, q_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_ym, GROUP: tl.constexpr,
               HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + (k0 + rk)[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        w_ok = n_ok[:, None] & k_ok[None, :]
        q = tl.load(q_ptr + rn[:, None] * K + (k0 + rk)[None, :], mask=w_ok, other=0).to(tl.float32)
        scale = tl.load(s_ptr + rn[:, None] * (K // GROUP) + ((k0 + rk) // GROUP)[None, :], mask=w_ok,
                        other=0.0).to(tl.float32)
        w = (q * scale).to(x.dtype)
        if DOT_FP32:
            x, w = x.to(tl.float32), w.to(tl.float32)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _dot_fp32(dtype: torch.dtype) -> bool:
    # Triton's CPU interpreter multiplies bf16 tiles as raw bits (tl.dot of two bf16 tiles is off by 1e10 there,
    # triton 3.9); on a GPU the product stays bf16 on the tensor cores. The cast happens after the weight was
    # rounded to bf16, so the interpreter still checks every rounding the GPU does.
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _block_m(m: int) -> int:
    # Decode batches are small: a 16-row tile (tl.dot's minimum) keeps the weight the only large stream.
    return 16 if m <= 16 else 32 if m <= 32 else 64


def quant_matmul(x: torch.Tensor, bits: int, qweight: torch.Tensor, scales: torch.Tensor,
                 mins: torch.Tensor | None, group: int, bias: torch.Tensor | None = None,
                 block_n: int = 64, block_k: int = 64) -> torch.Tensor:
    """``x`` [M, K] times a quantized ``W`` [N, K] (layouts in the module docstring): [M, N] in x's dtype."""
    if x.dim() != 2:
        raise ValueError(f"x must be [rows, in_features], got {tuple(x.shape)}")
    m, k = x.shape
    n = qweight.shape[0]
    x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    bias_arg = bias if bias is not None else y  # any pointer; never read without HAS_BIAS
    grid = (triton.cdiv(m, _block_m(m)), triton.cdiv(n, block_n))
    if bits == 4:
        if mins is None or group != INT4_GROUP or k % INT4_GROUP or block_k % INT4_GROUP:
            raise ValueError("int4 weights come in groups of 32 with mins, K and BLOCK_K multiples of 32")
        if qweight.shape[1] * 2 != k:
            raise ValueError(f"int4 weight holds {qweight.shape[1] * 2} inputs, x has {k}")
        _w4_matmul[grid](x, qweight, scales, mins, bias_arg, y, m, n, k, x.stride(0), y.stride(0),
                         HAS_BIAS=bias is not None, DOT_FP32=_dot_fp32(x.dtype), IEEE=x.dtype == torch.float32,
                         BLOCK_M=_block_m(m), BLOCK_N=block_n,
                         BLOCK_K=block_k)
    elif bits == 8:
        if k % group or qweight.shape[1] != k:
            raise ValueError(f"int8 weight [N, {qweight.shape[1]}] in groups of {group} does not fit x's {k} inputs")
        _w8_matmul[grid](x, qweight, scales, bias_arg, y, m, n, k, x.stride(0), y.stride(0), GROUP=group,
                         HAS_BIAS=bias is not None, DOT_FP32=_dot_fp32(x.dtype), IEEE=x.dtype == torch.float32,
                         BLOCK_M=_block_m(m), BLOCK_N=block_n,
                         BLOCK_K=block_k)
    else:
        raise ValueError(f"no {bits}-bit layout (int4 or int8)")
    return y
