"""Linear layers whose weights are packed once, at load time, for CPU engines in bf16 / fp16.

Why: a decode step on the CPU is mostly the weights streaming through the matmuls. ``torch.nn.functional.linear``
hands oneDNN a plain row-major weight on every call; on a 2-vCPU Sapphire Rapids VM the 135M model's weights then
stream at ~7 GB/s per step, half of what one core can read.

* Packing each weight once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``, the op PyTorch's own
  inductor uses when it freezes a CPU model) and calling ``mkldnn._linear_pointwise`` takes 19-25% off a decode
  step and 8-17% off a prefill step on one core (docs/BENCHMARKS.md, "Packed weights"). For bf16 and fp16 the
  packed product is bit-identical to ``F.linear`` (both are oneDNN; only the weight's layout changes).
* In bf16 on CPUs with AMX, products of at most ``SMALL_ROWS`` rows — every decode step — go to busserve's own
  kernel (``cpu_kernels/small_linear.cpp``) over a second copy of each weight in AMX's tile layout: it streams the
  weights at ~15 GB/s where oneDNN's blocked kernels reach ~10 for a few rows, a third off the step's linear layers
  (docs/BENCHMARKS.md, "Decode-step linears on AMX"). Prefill chunks stay on oneDNN, faster there. The price is
  memory: the linear weights are held twice (~270 MB more for the 135M model); ``--linear onednn`` keeps one copy.

fp32 is left alone: there ``F.linear`` is MKL, packing changes the rounding and is slower for a single row. CUDA
is never touched.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16, torch.float16)
# Rows oneDNN is told to expect when it picks the blocked layout. Decode steps have 1-64 rows and prefill chunks up
# to 512. Over the 135M model's shapes on one core, hint 64 was within ~5% of the best hint for 1-8 rows and best
# for 512 (88 ms vs 93 for hint 8, 117 for hint 1); hint 8 was better for 64 rows (36 ms vs 40).
BATCH_HINT = 64
# Rows up to which the AMX kernel beats oneDNN's packed product over the 135M model's linear layers on one core
# (benchmarks/linear_rows_bench.py): 18.8 vs 26.2 ms at 1-16 rows, 29.4 vs 34.1 at 64, level at ~128 (44.8 vs 43.0
# in one run, 44.8 vs 48.5 in another), behind from 192 on.
SMALL_ROWS = 96
MODES = ("auto", "onednn", "torch")


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight in oneDNN's blocked layout (an opaque ``torch._mkldnn`` tensor)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = BATCH_HINT, small_rows: bool = False) -> None:
        """``small_rows``: also keep the weight in AMX's layout for products of at most ``SMALL_ROWS`` rows
        (bf16, ``in_features`` a multiple of 32, the kernel loaded: see :func:`small_rows_unavailable_reason`)."""
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        # Plain attributes, not parameters or buffers: nothing (state_dict, .to(), parameter counts) should see the
        # opaque tensor; the module is built after the model is on its device and in its dtype.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint)
        self.bias_value = None if linear.bias is None else linear.bias.detach()
        self.tile_weight = torch.ops.busserve.pack_vnni(weight) if small_rows and _fits_tiles(linear) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile_weight is not None:
            rows = x.numel() // self.in_features
            if rows <= SMALL_ROWS:
                flat = x.reshape(rows, self.in_features)
                if flat.stride(-1) != 1:
                    flat = flat.contiguous()
                y: torch.Tensor = torch.ops.busserve.small_linear(flat, self.tile_weight, self.out_features,
                                                                  self.bias_value)
                return y.view(*x.shape[:-1], self.out_features)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias_value, "none", [], "")
        return out

    def extra_repr(self) -> str:
        small = f", AMX for <= {SMALL_ROWS} rows" if self.tile_weight is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN{small}"


def _fits_tiles(linear: nn.Linear) -> bool:
    return linear.weight.dtype == torch.bfloat16 and linear.in_features % 32 == 0


def packing_unavailable_reason(model: nn.Module) -> str | None:
    """None when ``model``'s linear layers can be packed here, else why not."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        return f"weights are on {param.device.type}, packing is for the CPU"
    return dtype_unpackable_reason(param.dtype)


@functools.cache
def dtype_unpackable_reason(dtype: torch.dtype) -> str | None:
    """None when oneDNN packs and multiplies ``dtype`` weights on this CPU, else why not. Asked of oneDNN itself
    with a tiny weight: its bf16 path needs AVX512-BW/VL/DQ or AVX-NE-CONVERT, its fp16 path AVX512-FP16 or
    AVX-NE-CONVERT, and PyTorch builds without oneDNN have neither."""
    if dtype not in PACKABLE_DTYPES:
        return f"dtype {dtype} (packing is for bfloat16 / float16)"
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return "this PyTorch build has no oneDNN"
    try:
        weight = torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 32, dtype=dtype), BATCH_HINT)
        torch.ops.mkldnn._linear_pointwise(torch.zeros(1, 32, dtype=dtype), weight, None, "none", [], "")
    except RuntimeError as exc:  # e.g. "bf16 path needs the cpu support avx_ne_convert or avx512bw, ..."
        return f"oneDNN cannot pack {dtype} weights on this CPU ({str(exc).strip().splitlines()[0]})"
    return None


def small_rows_unavailable_reason(model: nn.Module) -> str | None:
    """None when decode-sized products of ``model`` can run on busserve's AMX kernel here, else why not."""
    param = next(model.parameters())
    if param.device.type != "cpu" or param.dtype != torch.bfloat16:
        return f"the AMX decode kernel is for bfloat16 on the CPU ({param.dtype} on {param.device.type})"
    from busserve import cpu_kernels

    reason = cpu_kernels.amx_unavailable_reason() or cpu_kernels.load_failure()
    if reason is not None:
        return reason
    if not torch.ops.busserve.small_linear_available():
        return "the kernel was built without AMX, or Linux refused this process AMX's tile state"
    return None


def pack_linear_layers(model: nn.Module, batch_hint: int = BATCH_HINT, small_rows: bool = False) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`PackedLinear`; returns how many were replaced.

    A tied output projection (``lm_head`` sharing the embedding's weight) gets its own packed copy; the embedding
    keeps the plain tensor it looks rows up in.
    """
    # Pack everything first, swap after: a failure leaves the model as it was.
    packed = [(name, PackedLinear(module, batch_hint, small_rows)) for name, module in model.named_modules()
              if type(module) is nn.Linear]
    for name, module in packed:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return len(packed)


def maybe_pack(model: nn.Module, mode: str) -> int:
    """Apply ``--linear``: ``auto`` packs where :func:`packing_unavailable_reason` allows and adds the AMX decode
    kernel where :func:`small_rows_unavailable_reason` allows; ``onednn`` packs only; ``torch`` never."""
    if mode == "torch":
        return 0
    if mode not in MODES:
        raise ValueError(f"--linear {mode!r}: expected one of {', '.join(MODES)}")
    reason = packing_unavailable_reason(model)
    if reason is not None:
        log.info("linear layers stay unpacked: %s", reason)
        return 0
    small_rows = False
    if mode == "auto":
        why_not = small_rows_unavailable_reason(model)
        small_rows = why_not is None
        if why_not is not None:
            log.info("decode-sized linear products stay on oneDNN: %s", why_not)
    try:
        n = pack_linear_layers(model, small_rows=small_rows)
    except RuntimeError as exc:  # an ISA oneDNN cannot pack for: F.linear still works, just slower
        log.warning("linear layers stay unpacked: %s", exc)
        return 0
    if small_rows:
        extra = sum(m.tile_weight.nbytes for m in model.modules()
                    if isinstance(m, PackedLinear) and m.tile_weight is not None)
        log.info("%d linear layers packed; up to %d rows on the AMX kernel (%.0f MiB of weights in its layout)", n,
                 SMALL_ROWS, extra / 2**20)
    return n
