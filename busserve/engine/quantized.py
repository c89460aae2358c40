"""Quantized weights: busserve's two packed layouts, the conversion of GGUF blocks into them, and the modules
that multiply by them.

Where this sits: ``engine/gguf_model.py`` reads a GGUF file and hands every linear weight here;
:func:`from_gguf` turns the file's blocks into a :class:`QuantizedWeight` without ever making a dense copy, and
:class:`QuantLinear` / :class:`QuantEmbedding` replace ``nn.Linear`` / ``nn.Embedding`` in the model. The
product runs on ``cpu_kernels/quant_linear.cpp`` (AVX-512, weights dequantized in registers); where that kernel
cannot be built, :func:`reference_linear` computes the same product in torch a slice of rows at a time.

The layouts (kept in step with quant_linear.cpp):

* **int4**, groups of 32 along K: ``qweight`` uint8 [N, K/2], byte t of a group holding weight t (low nibble) and
  weight t+16 (high nibble); ``scales`` and ``mins`` fp16 [N, K/32]; w = scale·q + min, q in 0..15. GGUF Q4_0
  (min = −8·d) and Q4_1 convert exactly; Q4_K's per-sub-block scale d·sc and min −dmin·m are rounded to fp16
  (relative error ≤ 2⁻¹¹, far below the 4-bit step).
* **int8**, groups of G (32 or 16) along K: ``qweight`` int8 [N, K], ``scales`` fp16 [N, K/G]; w = scale·q. GGUF
  Q8_0 (G = 32) converts exactly; Q6_K (G = 16, q − 32 in −32..31) with its d·sc rounded to fp16.

Bytes per weight: int4 5 bits (Q4_0 4.5, Q4_1 5, Q4_K 4.5), int8 9 bits at G = 32 and 10 at G = 16 (Q8_0 8.5,
Q6_K 6.56) — the K-quants' super-block scales are expanded per group to keep the kernel's inner loop one shape.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

# GGUF tensor types that convert into a packed layout, by name (gguf.GGMLQuantizationType names).
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_TYPES = ("Q8_0", "Q6_K")
SUPPORTED_TYPES = INT4_TYPES + INT8_TYPES
MODES = ("auto", "none", "int8", "int4")
# Rows of a weight dequantized at a time by the torch fallback: bounded memory whatever the layer's size.
FALLBACK_ROWS = 1024


@dataclass
class QuantizedWeight:
    """A weight W [out_features, in_features] in one of the two layouts (module docstring)."""

    bits: int
    group: int
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    source: str  # the GGUF type (or "bf16"/"f32"… for weights quantized here), for logs and errors

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.qweight.shape[1] * (2 if self.bits == 4 else 1))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.qweight, self.scales, self.mins) if t is not None)

    def take_rows(self, index: torch.Tensor | np.ndarray) -> QuantizedWeight:
        """The rows ``index`` (a permutation, or a lookup), still quantized."""
        idx = torch.as_tensor(index, dtype=torch.long)
        return QuantizedWeight(self.bits, self.group, self.qweight[idx].contiguous(), self.scales[idx].contiguous(),
                               None if self.mins is None else self.mins[idx].contiguous(), self.source)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """W (or its ``rows``) as a dense tensor, computed in fp32 and then cast."""
        q, scales = self.qweight[rows], self.scales[rows].float()
        if self.bits == 4:
            assert self.mins is not None
            n = q.shape[0]
            groups = q.reshape(n, -1, 16)
            values = torch.cat([groups & 0xF, groups >> 4], dim=-1).float()  # [n, K/32, 32]
            w = values * scales.unsqueeze(-1) + self.mins[rows].float().unsqueeze(-1)
        else:
            n = q.shape[0]
            w = q.reshape(n, -1, self.group).float() * scales.unsqueeze(-1)
        return w.reshape(n, -1).to(dtype)


# -- GGUF blocks → layouts ---------------------------------------------------------------------------------------


def _f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [rows, K] → the int4 layout's bytes [rows, K/2]."""
    groups = values.reshape(values.shape[0], -1, 2, 16)
    packed: np.ndarray = (groups[:, :, 0, :] | (groups[:, :, 1, :] << np.uint8(4))).reshape(values.shape[0], -1)
    return packed


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    return flat.reshape(-1, block_bytes)


def _q4_0(raw: np.ndarray, rows: int) -> QuantizedWeight:
    b = _blocks(raw, rows, 18)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)[:, 0]
    q = b[:, 2:].reshape(rows, -1)
    return _int4(q, _f16(d).reshape(rows, -1), _f16(-8.0 * d).reshape(rows, -1), "Q4_0")


def _q4_1(raw: np.ndarray, rows: int) -> QuantizedWeight:
    b = _blocks(raw, rows, 20)
    d = b[:, 0:2].copy().view(np.float16)[:, 0]
    m = b[:, 2:4].copy().view(np.float16)[:, 0]
    return _int4(b[:, 4:].reshape(rows, -1), d.reshape(rows, -1), m.reshape(rows, -1), "Q4_1")


def _q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit sub-block scales and mins of Q4_K blocks (ggml's get_scale_min_k4, as gguf-py unpacks them)."""
    s = scales.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0, :], s[:, 1, :], s[:, 2, :]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(raw: np.ndarray, rows: int) -> QuantizedWeight:
    b = _blocks(raw, rows, 144)
    d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = _q4_k_scale_min(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 weights: low nibbles the first 32, high nibbles the next
    values = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(rows, -1)  # [rows, K], weight order
    return _int4(_pack_nibbles(values), _f16(d * sc).reshape(rows, -1), _f16(-(dmin * mn)).reshape(rows, -1), "Q4_K")


def _int4(q: np.ndarray, scales: np.ndarray, mins: np.ndarray, source: str) -> QuantizedWeight:
    return QuantizedWeight(4, 32, torch.from_numpy(np.ascontiguousarray(q)),
                           torch.from_numpy(np.ascontiguousarray(scales)),
                           torch.from_numpy(np.ascontiguousarray(mins)), source)


def _q8_0(raw: np.ndarray, rows: int) -> QuantizedWeight:
    b = _blocks(raw, rows, 34)
    d = b[:, :2].copy().view(np.float16)[:, 0]
    q = b[:, 2:].copy().view(np.int8).reshape(rows, -1)
    return QuantizedWeight(8, 32, torch.from_numpy(q), torch.from_numpy(d.reshape(rows, -1).copy()), None, "Q8_0")


def _q6_k(raw: np.ndarray, rows: int) -> QuantizedWeight:
    b = _blocks(raw, rows, 210)
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].copy().view(np.int8).astype(np.float32)
    d = b[:, 208:210].copy().view(np.float16).astype(np.float32)
    low = (ql.reshape(n, -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(n, -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = (low.reshape(n, -1, 32) | (high.reshape(n, -1, 32) << np.uint8(4))).astype(np.int8) - np.int8(32)
    return QuantizedWeight(8, 16, torch.from_numpy(np.ascontiguousarray(q.reshape(rows, -1))),
                           torch.from_numpy(_f16(d * sc).reshape(rows, -1)), None, "Q6_K")


_CONVERTERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q8_0": _q8_0, "Q6_K": _q6_k}


def from_gguf(raw: np.ndarray, type_name: str, rows: int) -> QuantizedWeight:
    """A GGUF tensor's raw blocks (``GGUFReader`` tensor ``data``) of ``rows`` output rows, in a packed layout."""
    convert = _CONVERTERS.get(type_name)
    if convert is None:
        raise ValueError(f"GGUF type {type_name} has no packed layout here (supported: {', '.join(SUPPORTED_TYPES)})")
    return convert(raw, rows)


# -- dense → layouts (--quantization int4/int8 over weights the file does not hold in that form) -----------------


def quantize_int4(w: torch.Tensor, source: str) -> QuantizedWeight:
    """Asymmetric 4-bit per group of 32 (Q4_1's rule: min and max of the group span 0..15)."""
    n = w.shape[0]
    g = w.float().reshape(n, -1, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).to(torch.float16)
    mins = lo.to(torch.float16)
    safe = torch.where(scale.float() == 0, torch.ones_like(lo), scale.float())
    q = ((g - mins.float().unsqueeze(-1)) / safe.unsqueeze(-1)).round().clamp(0, 15).to(torch.uint8)
    packed = (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(n, -1).contiguous()
    return QuantizedWeight(4, 32, packed, scale.contiguous(), mins.contiguous(), source)


def quantize_int8(w: torch.Tensor, source: str) -> QuantizedWeight:
    """Symmetric 8-bit per group of 32 (Q8_0's rule: the group's largest magnitude maps to 127)."""
    n = w.shape[0]
    g = w.float().reshape(n, -1, 32)
    scale = (g.abs().amax(-1) / 127).to(torch.float16)
    safe = torch.where(scale.float() == 0, torch.ones_like(scale, dtype=torch.float32), scale.float())
    q = (g / safe.unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8).reshape(n, -1).contiguous()
    return QuantizedWeight(8, 32, q, scale.contiguous(), None, source)


def requantize(weight: QuantizedWeight, bits: int) -> QuantizedWeight:
    """``weight`` in the layout of ``bits`` (a no-op when it is already there)."""
    if weight.bits == bits:
        return weight
    dense = weight.dequantize(torch.float32)
    return quantize_int4(dense, weight.source) if bits == 4 else quantize_int8(dense, weight.source)


# -- the product -------------------------------------------------------------------------------------------------


@functools.cache
def kernel_unavailable_reason() -> str | None:
    """None when ``torch.ops.busserve.quant_linear`` runs here, else why not (then the torch fallback is used)."""
    from busserve import cpu_kernels

    reason = cpu_kernels.unavailable_reason()
    if reason is not None:
        return reason
    try:
        cpu_kernels.load()
    except cpu_kernels.KernelBuildError as exc:
        return str(exc)
    return None


def reference_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The product in torch, dequantizing FALLBACK_ROWS output rows at a time (fp32 accumulation)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    parts = [flat @ weight.dequantize(torch.float32, slice(r, r + FALLBACK_ROWS)).T
             for r in range(0, weight.out_features, FALLBACK_ROWS)]
    y = torch.cat(parts, dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


class QuantLinear(nn.Module):
    """``nn.Linear`` over a :class:`QuantizedWeight`; activations and output in the model's dtype."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None, use_kernel: bool = True) -> None:
        super().__init__()
        self.weight_q = weight
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bias_value = bias
        self.use_kernel = use_kernel and kernel_unavailable_reason() is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_kernel or x.device.type != "cpu":
            return reference_linear(x, self.weight_q, self.bias_value)
        w = self.weight_q
        flat = x.reshape(-1, self.in_features)
        y: torch.Tensor = torch.ops.busserve.quant_linear(flat, w.qweight, w.scales, w.mins, w.bits, w.group,
                                                          self.bias_value)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        w = self.weight_q
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{w.bits} groups of "
                f"{w.group} (from {w.source}), {'AVX-512 kernel' if self.use_kernel else 'torch fallback'}")


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` over a :class:`QuantizedWeight`: the looked-up rows are dequantized, nothing else."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight_q = weight
        self.num_embeddings = weight.out_features
        self.embedding_dim = weight.in_features
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.weight_q.take_rows(flat).dequantize(self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights in ``model`` (a tied weight counted once)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            seen[id(m.weight_q)] = m.weight_q.nbytes
    return sum(seen.values())
