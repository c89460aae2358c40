"""The deterministic mode (``--deterministic``): every row of a step computed in an order that does not depend on
the rest of the step, so a request's greedy tokens are the same bits whatever shares its batches, however its
prompt was chunked, and wherever its prefix was computed (this engine, its cache, another engine, a migration).

Where the order could depend on the batch, and what this mode does instead:

* **linear layers** — oneDNN (and MKL) pick kernels and blockings by the product's shape, so a row's sums come out
  in another order in another batch. Dense bf16 layers become :class:`DenseX16Linear` (``cpu_kernels/
  quant_linear.cpp``'s ``dense_linear_x16``: one fixed vdpbf16ps chain over K per output); quantized layers keep
  their register kernels for every row count (``QuantLinear.gemm_from_rows = 0``).
* **attention** — a prefill chunk normally goes through SDPA and a decode token through the paged decode kernel,
  which sum in different orders. Here every token of a step, prompt or not, is one row of the paged decode kernel
  over its own context (``ModelRunner.deterministic``): position p attends to positions 0..p through the same code
  whether it is decoded or prefilled, in a chunk of any size, after a cache hit or not.
* everything else in a step (norms, rotary, activations, sampling) is row-wise already.

The price is measured in docs/BENCHMARKS.md ("Deterministic mode"): prefill attention as decode rows, and the
dense layers off oneDNN's blocked kernels.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from busserve.engine import quantized

log = logging.getLogger(__name__)


class DenseX16Linear(nn.Module):
    """A bf16 ``nn.Linear`` re-laid 16 outputs per vector for ``dense_linear_x16`` (one copy of the weight)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        blocks = -(-self.out_features // 16)
        padded = torch.nn.functional.pad(w, (0, 0, 0, blocks * 16 - self.out_features))
        self.weight_x16 = padded.reshape(blocks, 16, self.in_features // 2, 2).permute(0, 2, 1, 3).contiguous()
        self.bias_f32 = None if linear.bias is None else linear.bias.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y: torch.Tensor = torch.ops.busserve.dense_linear_x16(flat, self.weight_x16, self.out_features, self.bias_f32)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, batch-invariant bf16 kernel"


def unavailable_reason(model: nn.Module) -> str | None:
    """None when every linear layer of ``model`` can be made batch-invariant here, else why not."""
    if quantized.kernel_unavailable_reason() is not None:
        return f"the deterministic mode needs busserve's CPU kernels ({quantized.kernel_unavailable_reason()})"
    from busserve.engine.packed_linear import PackedLinear

    for name, m in model.named_modules():
        if isinstance(m, PackedLinear):  # oneDNN's kernels, chosen by shape: a model packed for the default mode
            return (f"--deterministic: {name} was packed for oneDNN (--linear); the deterministic mode needs the "
                    "model as loaded")
        if type(m) is nn.Linear:
            if m.weight.device.type != "cpu":
                return f"the deterministic mode runs on the CPU ({name} is on {m.weight.device.type})"
            if m.weight.dtype != torch.bfloat16 or not quantized.x16_available() or m.in_features % 2:
                return (f"--deterministic: {name} is dense {m.weight.dtype}; dense layers are batch-invariant here "
                        "only in bfloat16 on CPUs "
                        "with AVX512-BF16 (use --dtype bfloat16, or quantized weights: --quantization auto/int8/int4)")
    return None


def make_batch_invariant(model: nn.Module) -> int:
    """Put every linear layer of ``model`` on a batch-invariant kernel, in place; returns how many were changed.
    Raises ``ValueError`` naming what cannot be (see :func:`unavailable_reason`)."""
    reason = unavailable_reason(model)
    if reason is not None:
        raise ValueError(reason)
    changed = 0
    for name, m in list(model.named_modules()):
        if isinstance(m, quantized.QuantLinear):
            m.gemm_from_rows = 0
            changed += 1
        elif type(m) is nn.Linear:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, DenseX16Linear(m))
            changed += 1
    log.info("deterministic mode: %d linear layers on batch-invariant kernels, prefill attention as decode rows",
             changed)
    return changed
