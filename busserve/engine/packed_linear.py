"""Linear layers whose weights oneDNN has packed once, at load time, for CPU engines in bf16 / fp16.

Why: a decode step on the CPU is mostly the weights streaming through the matmuls. ``torch.nn.functional.linear``
hands oneDNN a plain row-major weight on every call; on a 2-vCPU Sapphire Rapids VM the 135M model's weights then
stream at ~7 GB/s per step, half of what one core can read.
Packing each weight once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``, the op PyTorch's own
inductor uses when it freezes a CPU model) and calling ``mkldnn._linear_pointwise`` takes 19-25% off a
decode step and 8-17% off a prefill step on one core (docs/BENCHMARKS.md, "Packed weights").

For bf16 and fp16 the packed product is bit-identical to ``F.linear`` (both are oneDNN; only the weight's layout
changes), so greedy outputs do not move. fp32 is left alone: there ``F.linear`` is MKL, packing changes the
rounding and is slower for a single row. CUDA is never touched.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

PACKABLE_DTYPES = (torch.bfloat16, torch.float16)
# Rows oneDNN is told to expect when it picks the blocked layout. Decode steps have 1-64 rows and prefill chunks up
# to 512. Over the 135M model's shapes on one core, hint 64 was within ~5% of the best hint for 1-8 rows and best
# for 512 (88 ms vs 93 for hint 8, 117 for hint 1); hint 8 was better for 64 rows (36 ms vs 40).
BATCH_HINT = 64


class PackedLinear(nn.Module):
    """``nn.Linear`` with its weight in oneDNN's blocked layout (an opaque ``torch._mkldnn`` tensor)."""

    def __init__(self, linear: nn.Linear, batch_hint: int = BATCH_HINT) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        # Plain attributes, not parameters or buffers: nothing (state_dict, .to(), parameter counts) should see the
        # opaque tensor; the module is built after the model is on its device and in its dtype.
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_hint)
        self.bias_value = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias_value, "none", [], "")
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=oneDNN"


def packing_unavailable_reason(model: nn.Module) -> str | None:
    """None when ``model``'s linear layers can be packed here, else why not."""
    param = next(model.parameters())
    if param.device.type != "cpu":
        return f"weights are on {param.device.type}, packing is for the CPU"
    if param.dtype not in PACKABLE_DTYPES:
        return f"dtype {param.dtype} (packing is for bfloat16 / float16)"
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return "this PyTorch build has no oneDNN"
    return None


def pack_linear_layers(model: nn.Module, batch_hint: int = BATCH_HINT) -> int:
    """Replace every ``nn.Linear`` in ``model`` by a :class:`PackedLinear`; returns how many were replaced.

    A tied output projection (``lm_head`` sharing the embedding's weight) gets its own packed copy; the embedding
    keeps the plain tensor it looks rows up in.
    """
    # Pack everything first, swap after: a failure leaves the model as it was.
    packed = [(name, PackedLinear(module, batch_hint)) for name, module in model.named_modules()
              if type(module) is nn.Linear]
    for name, module in packed:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return len(packed)


def maybe_pack(model: nn.Module, mode: str) -> int:
    """Apply ``--linear``: ``auto`` packs where :func:`packing_unavailable_reason` allows, ``torch`` never."""
    if mode == "torch":
        return 0
    if mode != "auto":
        raise ValueError(f"--linear {mode!r}: expected auto or torch")
    reason = packing_unavailable_reason(model)
    if reason is not None:
        log.info("linear layers stay unpacked: %s", reason)
        return 0
    try:
        return pack_linear_layers(model)
    except RuntimeError as exc:  # an ISA oneDNN cannot pack for: F.linear still works, just slower
        log.warning("linear layers stay unpacked: %s", exc)
        return 0
