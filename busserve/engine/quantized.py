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
  (relative error ≤ 2⁻¹¹ while d·sc is a normal fp16 number, ≥ 6.1e-5; more for subnormal ones — far below the
  4-bit step either way).
* **int8**, groups of G (32 or 16) along K: ``qweight`` int8 [N, K], ``scales`` fp16 [N, K/G]; w = scale·q. GGUF
  Q8_0 (G = 32) converts exactly; Q6_K (G = 16, q − 32 in −32..31) with its d·sc rounded to fp16.

Bytes per weight: int4 5 bits (Q4_0 4.5, Q4_1 5, Q4_K 4.5), int8 9 bits at G = 32 and 10 at G = 16 (Q8_0 8.5,
Q6_K 6.56) — the K-quants' super-block scales are expanded per group to keep the kernel's inner loop one shape.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace

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
# Rows from which an x16 int4 product dequantizes the layer to bf16 and runs oneDNN's GEMM instead of the register
# kernel (prefill chunks; decode batches stay below): docs/BENCHMARKS.md, "Quantized weights".
GEMM_FROM_ROWS = 128


@dataclass
class QuantizedWeight:
    """A weight W [out_features, in_features] in one of the two layouts (module docstring)."""

    bits: int
    group: int
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None
    source: str  # the GGUF type (or "bf16"/"f32"… for weights quantized here), for logs and errors
    # "rows" (the layouts above) or "x16": int4 re-laid for the bf16 kernel, 16 outputs per vector —
    # qweight [N/16, K/2, 16] (byte j of a pair: output j's weights k | k+1 << 4), scales/mins [N/16, K/32, 16].
    layout: str = "rows"
    rows: int = 0  # out_features when the layout pads them (x16), else 0

    @property
    def out_features(self) -> int:
        return self.rows if self.layout == "x16" else int(self.qweight.shape[0])

    @property
    def in_features(self) -> int:
        if self.layout == "x16":
            return int(self.qweight.shape[1] * 2)
        return int(self.qweight.shape[1] * (2 if self.bits == 4 else 1))

    def interleaved(self) -> QuantizedWeight:
        """This int4 weight in the x16 layout (the output rows padded to a multiple of 16 with zero weights)."""
        assert self.bits == 4 and self.layout == "rows" and self.mins is not None
        n, k = self.out_features, self.in_features
        blocks = -(-n // 16)
        pad = blocks * 16 - n
        groups = self.qweight.reshape(n, -1, 16)
        values = torch.cat([groups & 0xF, groups >> 4], dim=-1).reshape(n, k)  # weight order
        values = torch.nn.functional.pad(values, (0, 0, 0, pad))
        pairs = values.reshape(blocks, 16, k // 2, 2)
        packed = (pairs[..., 0] | (pairs[..., 1] << 4)).permute(0, 2, 1).contiguous()  # [blocks, K/2, 16]

        def per_block(t: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, 0, 0, pad)).reshape(blocks, 16, -1).permute(0, 2, 1).contiguous()

        return QuantizedWeight(4, 32, packed, per_block(self.scales), per_block(self.mins), self.source, "x16", n)

    def rows_layout(self) -> QuantizedWeight:
        """The inverse of :meth:`interleaved`: this weight in the row layout (the padding rows dropped)."""
        if self.layout == "rows":
            return self
        assert self.mins is not None
        blocks, half_k, _ = self.qweight.shape
        n = self.rows
        values = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1)  # [blocks, K/2, 16, 2]
        values = values.permute(0, 2, 1, 3).reshape(blocks * 16, half_k * 2)[:n]  # weight order
        groups = values.reshape(n, -1, 2, 16)
        packed = (groups[:, :, 0, :] | (groups[:, :, 1, :] << 4)).reshape(n, half_k).contiguous()

        def per_row(t: torch.Tensor) -> torch.Tensor:
            return t.permute(0, 2, 1).reshape(blocks * 16, -1)[:n].contiguous()

        return QuantizedWeight(4, 32, packed, per_row(self.scales), per_row(self.mins), self.source)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.qweight, self.scales, self.mins) if t is not None)

    def take_rows(self, index: torch.Tensor | np.ndarray) -> QuantizedWeight:
        """The rows ``index`` (a permutation, or a lookup), still quantized."""
        assert self.layout == "rows", "rows are taken before the weight is interleaved"
        idx = torch.as_tensor(index, dtype=torch.long)
        return QuantizedWeight(self.bits, self.group, self.qweight[idx].contiguous(), self.scales[idx].contiguous(),
                               None if self.mins is None else self.mins[idx].contiguous(), self.source)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: slice = slice(None)) -> torch.Tensor:
        """W (or its ``rows``) as a dense tensor, computed in fp32 and then cast."""
        if self.layout == "x16":
            assert self.mins is not None
            blocks, half_k, _ = self.qweight.shape
            values = torch.stack([self.qweight & 0xF, self.qweight >> 4], dim=-1)  # [blocks, K/2, 16, 2]
            values = values.permute(0, 2, 1, 3).reshape(blocks * 16, -1, 32).float()

            def per_row(t: torch.Tensor) -> torch.Tensor:
                return t.permute(0, 2, 1).reshape(blocks * 16, -1, 1).float()

            w = values * per_row(self.scales) + per_row(self.mins)
            return w.reshape(blocks * 16, half_k * 2)[: self.rows][rows].to(dtype)
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

    return cpu_kernels.load_failure()


def reference_linear(x: torch.Tensor, weight: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """The product in torch, dequantizing FALLBACK_ROWS output rows at a time (fp32 accumulation)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    if weight.layout == "x16":  # only ever a test's or an odd caller's path: the engine feeds it bf16
        parts = [flat @ weight.dequantize(torch.float32).T]
    else:
        parts = [flat @ weight.dequantize(torch.float32, slice(r, r + FALLBACK_ROWS)).T
                 for r in range(0, weight.out_features, FALLBACK_ROWS)]
    y = torch.cat(parts, dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.out_features)


@functools.cache
def x16_available() -> bool:
    """Whether the bf16 int4 kernel over the x16 layout runs here (AVX512-BF16 in the kernels' build)."""
    return kernel_unavailable_reason() is None and bool(torch.ops.busserve.quant_linear_x16_available())


class QuantLinear(nn.Module):
    """``nn.Linear`` over a :class:`QuantizedWeight`; activations and output in the model's dtype.

    ``dtype``: the activations it will see. In bf16 on a CPU with AVX512-BF16, an int4 weight is re-laid into the
    x16 layout (one copy: the row layout is dropped) unless ``shared`` (an embedding looks rows up in it)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None, use_kernel: bool = True,
                 dtype: torch.dtype | None = None, shared: bool = False) -> None:
        super().__init__()
        self.use_kernel = use_kernel and kernel_unavailable_reason() is None
        if (self.use_kernel and dtype == torch.bfloat16 and weight.bits == 4 and weight.layout == "rows"
                and not shared and x16_available()):
            weight = weight.interleaved()
        self.weight_q = weight
        self.in_features = weight.in_features
        self.out_features = weight.out_features
        self.bias_value = bias
        # The x16 kernel adds the bias in fp32 before its one rounding.
        self.bias_f32 = None if bias is None else bias.float().contiguous()
        # 0: the register kernel for every row count, which keeps a row's output independent of the batch.
        self.gemm_from_rows = GEMM_FROM_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_q
        if x.device.type == "cuda" and w.layout == "rows":
            from busserve.triton_kernels.quant_matmul import quant_matmul

            out = quant_matmul(x.reshape(-1, self.in_features), w.bits, w.qweight, w.scales, w.mins, w.group,
                               self.bias_value)
            return out.view(*x.shape[:-1], self.out_features)
        if not self.use_kernel or x.device.type != "cpu" or (w.layout == "x16" and x.dtype != torch.bfloat16):
            return reference_linear(x, w, self.bias_value)
        flat = x.reshape(-1, self.in_features)
        y: torch.Tensor
        if w.layout == "x16":
            y = torch.ops.busserve.quant_linear_x16(flat, w.qweight, w.scales, w.mins, w.rows, self.bias_f32,
                                                    self.gemm_from_rows)
        else:
            y = torch.ops.busserve.quant_linear(flat, w.qweight, w.scales, w.mins, w.bits, w.group, self.bias_value)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        w = self.weight_q
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{w.bits} groups of "
                f"{w.group} (from {w.source}, {w.layout} layout), "
                f"{'AVX-512 kernel' if self.use_kernel else 'torch fallback'}")


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


def move_to(model: nn.Module, device: torch.device) -> None:
    """Move the quantized weights of ``model`` to ``device`` (``nn.Module.to`` does not see them: they are plain
    attributes), keeping a weight shared by two modules (a tied embedding and output) one copy there too."""
    if device.type == "cpu":
        return
    moved: dict[int, QuantizedWeight] = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            key = id(m.weight_q)
            if key not in moved:
                w = m.weight_q.rows_layout()  # the x16 layout is the AVX-512 kernel's; the GPU kernel reads rows
                moved[key] = replace(w, qweight=w.qweight.to(device), scales=w.scales.to(device),
                                     mins=None if w.mins is None else w.mins.to(device))
            m.weight_q = moved[key]
        if isinstance(m, QuantLinear):
            m.bias_value = None if m.bias_value is None else m.bias_value.to(device)
            m.bias_f32 = None if m.bias_f32 is None else m.bias_f32.to(device)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the quantized weights in ``model`` (a tied weight counted once)."""
    seen: dict[int, int] = {}
    for m in model.modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            seen[id(m.weight_q)] = m.weight_q.nbytes
    return sum(seen.values())
