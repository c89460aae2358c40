"""Linear layers packed by oneDNN (busserve/engine/packed_linear.py): bit-identical to ``F.linear`` in bf16/fp16,
the same greedy tokens from an engine on the real model, and left alone wherever packing does not apply."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from busserve.engine.main import EngineOptions, build_core
from busserve.engine.model_loader import LoadedModel
from busserve.engine.packed_linear import (
    PackedLinear,
    dtype_unpackable_reason,
    maybe_pack,
    pack_linear_layers,
    packing_unavailable_reason,
    small_rows_unavailable_reason,
)
from tests.helpers import CoreHarness, greedy


def _needs_packing(dtype: torch.dtype) -> pytest.MarkDecorator:
    """Skip where oneDNN cannot pack ``dtype`` here (no oneDNN in the build, or a CPU without the ISA it needs)."""
    reason = dtype_unpackable_reason(dtype)
    return pytest.mark.skipif(reason is not None, reason=str(reason))


needs_bf16_packing = _needs_packing(torch.bfloat16)


@pytest.mark.parametrize("dtype", [pytest.param(d, marks=_needs_packing(d), id=str(d))
                                   for d in (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_packed_product_is_bit_identical_to_f_linear(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=bias, dtype=dtype)
    packed = PackedLinear(linear)
    for shape in [(1, 96), (5, 96), (1, 37, 96), (2, 300, 96)]:
        x = torch.randn(*shape, dtype=dtype)
        assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias)), shape
    # A non-contiguous slice of rows, as transformers hands the output projection (logits_to_keep).
    x = torch.randn(1, 9, 96, dtype=dtype)[:, [2, 5, 8]]
    assert torch.equal(packed(x), F.linear(x, linear.weight, linear.bias))


@needs_bf16_packing
@torch.inference_mode()
def test_packing_a_model_keeps_its_logits_and_its_parameters(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    def load() -> nn.Module:  # transformers' own attention: this is about the linear layers alone
        return AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.bfloat16, attn_implementation="sdpa")

    plain, packed = load(), load()
    n_linear = sum(type(m) is nn.Linear for m in plain.modules())
    assert pack_linear_layers(packed) == n_linear == 2 * 7 + 1  # q k v o gate up down per layer, and lm_head
    assert not any(type(m) is nn.Linear for m in packed.modules())
    # Parameters the rest of the engine reads (dtype, device, the embedding) are still plain tensors.
    assert next(packed.parameters()).dtype == torch.bfloat16
    assert all(p.layout == torch.strided for p in packed.parameters())
    ids = torch.randint(0, plain.config.vocab_size, (1, 41))
    assert torch.equal(packed(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert pack_linear_layers(packed) == 0  # packing twice is a no-op


@needs_bf16_packing
def test_a_tied_output_projection_gets_its_own_packed_copy() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 16, dtype=torch.bfloat16)
            self.head = nn.Linear(16, 50, bias=False, dtype=torch.bfloat16)
            self.head.weight = self.embed.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(ids))

    model = Tied()
    ids = torch.tensor([[3, 7, 49]])
    want = model(ids)
    assert pack_linear_layers(model) == 1
    assert isinstance(model.head, PackedLinear) and model.embed.weight.layout == torch.strided
    assert torch.equal(model(ids), want)


def test_packing_is_skipped_where_it_does_not_apply() -> None:
    fp32 = nn.Sequential(nn.Linear(8, 8))
    assert "float32" in (packing_unavailable_reason(fp32) or "")
    assert maybe_pack(fp32, "auto") == 0 and type(fp32[0]) is nn.Linear
    bf16 = nn.Sequential(nn.Linear(8, 8, dtype=torch.bfloat16))
    assert maybe_pack(bf16, "torch") == 0 and type(bf16[0]) is nn.Linear
    with pytest.raises(ValueError, match="--linear 'fast'"):
        maybe_pack(bf16, "fast")


def test_a_cpu_that_cannot_pack_a_dtype_serves_it_unpacked() -> None:
    """oneDNN's own answer decides: where it cannot pack bf16 (no AVX512-BW/VL/DQ nor AVX-NE-CONVERT), the model
    keeps ``nn.Linear`` and the reason names the CPU; where it can, the layers are packed."""
    bf16 = nn.Sequential(nn.Linear(32, 8, dtype=torch.bfloat16))
    reason = packing_unavailable_reason(bf16)
    assert reason == dtype_unpackable_reason(torch.bfloat16)
    if reason is None:
        assert maybe_pack(bf16, "onednn") == 1 and isinstance(bf16[0], PackedLinear)
    else:
        assert "this CPU" in reason or "oneDNN" in reason
        assert maybe_pack(bf16, "onednn") == 0 and type(bf16[0]) is nn.Linear


@needs_bf16_packing
@pytest.mark.slow
def test_an_engine_with_packed_weights_generates_what_an_unpacked_one_does(smol: LoadedModel) -> None:
    """The real model in bf16, built the way `busserve engine` builds it, with and without packing."""
    prompts = [smol.tokenizer(t)["input_ids"] for t in
               ["The capital of France is", "def fibonacci(n):\n    ", "Write a short poem about the sea. The sea"]]
    outputs: dict[str, list[list[int]]] = {}
    for mode in ("torch", "onednn", "auto"):
        core = build_core(EngineOptions(engine_id=f"packed-{mode}", dtype="bfloat16", transports=(), linear=mode,
                                        kv_pages=256))
        packed = [m for m in core.loaded.model.modules() if isinstance(m, PackedLinear)]
        assert bool(packed) == (mode != "torch")
        if mode == "auto" and small_rows_unavailable_reason(core.loaded.model) is None:
            assert all(m.tile_weight is not None for m in packed)  # decode steps on the AMX kernel
        h = CoreHarness(core)
        core.start()
        try:
            rids = [h.submit(p, greedy(24)) for p in prompts]  # batched together, as an engine serves them
            outputs[mode] = [h.tokens(r) for r in rids]
            h.assert_no_leaks()
        finally:
            core.stop()
    assert outputs["auto"] == outputs["onednn"] == outputs["torch"]
