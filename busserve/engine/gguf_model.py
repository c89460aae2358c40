"""Load a Llama-family GGUF file straight into a transformers model whose weights stay quantized.

Where this sits: ``model_loader.load_model`` comes here for a ``.gguf`` model unless ``--quantization none``.
The file is memory-mapped (gguf's ``GGUFReader``); every tensor is read once: linear weights of a supported
type (``quantized.SUPPORTED_TYPES``) become :class:`~busserve.engine.quantized.QuantLinear` modules at their
quantized size, the token embedding a :class:`~busserve.engine.quantized.QuantEmbedding` (shared with the output
projection when the file ties them), norms and anything else dense in the model's dtype. No dense copy of a
quantized weight is ever made, on disk or in memory. Only the tokenizer and config are cached (a small folder
beside the models cache), because transformers takes seconds to build a tokenizer from GGUF metadata.

llama.cpp stores ``attn_q``/``attn_k`` with their rows permuted for its rotary layout; the rows are put back in
transformers' order here (rows only, so the quantized blocks move whole), as transformers' own GGUF loader does.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from busserve.engine import quantized
from busserve.engine.model_cache import cache_key, file_lock, models_cache_dir

log = logging.getLogger(__name__)

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors transformers itself does not load either: Llama 3's rope_freqs is rebuilt from the config's rope scaling.
_SKIPPED = {"rope_freqs.weight"}
SUPPORTED_ARCHITECTURES = ("llama",)


class UnsupportedGGUF(ValueError):
    """The file holds something this loader would get wrong; the message names it."""


def hf_name(gguf_name: str) -> str:
    """The transformers parameter name of a GGUF tensor name (``blk.3.attn_q.weight`` → ``model.layers.3…``)."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    raise UnsupportedGGUF(f"GGUF tensor {gguf_name!r} has no place in a Llama model here")


def _rope_rows(rows: int, heads: int) -> np.ndarray:
    """The row order that undoes llama.cpp's rotary permutation of a q/k weight with ``heads`` heads."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)


def meta_dir(gguf: Path) -> Path:
    """A folder with the config, generation config and tokenizer of ``gguf`` (made once, cached)."""
    target = models_cache_dir() / f"{gguf.stem}-{cache_key(gguf)}-meta"
    if (target / "config.json").exists():
        return target
    with file_lock(target.with_suffix(".lock")):
        if not (target / "config.json").exists():
            _write_meta(gguf, target)
    return target


def _write_meta(gguf: Path, target: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    t0 = time.monotonic()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config.save_pretrained(str(tmp))
    GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
    tmp.replace(target)
    print(f"busserve: read {gguf.name}'s tokenizer and config in {time.monotonic() - t0:.1f}s (cached in {target})",
          file=sys.stderr, flush=True)


def architecture(gguf: Path) -> str:
    import gguf as gguf_py

    reader = gguf_py.GGUFReader(str(gguf))
    field = reader.fields["general.architecture"]
    return bytes(field.parts[field.data[0]]).decode()


def load_quantized(gguf: Path, *, dtype: torch.dtype, mode: str, attn_implementation: str) -> tuple[nn.Module, Path]:
    """(model on the CPU, folder with its tokenizer and configs). ``mode``: ``auto`` keeps each tensor's own
    type where it has a packed layout; ``int4``/``int8`` put every linear weight (and the embedding) in that
    layout, converting what the file holds otherwise."""
    import gguf as gguf_py
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = architecture(gguf)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUF(f"{gguf.name}: architecture {arch!r} is not loaded quantized here (supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}); --quantization none serves it dequantized")
    folder = meta_dir(gguf)
    config = AutoConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            config, dtype=dtype, attn_implementation=attn_implementation)
    reader = gguf_py.GGUFReader(str(gguf))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    weights: dict[str, quantized.QuantizedWeight] = {}
    dense: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED:
            continue
        name = hf_name(tensor.name)
        type_name = tensor.tensor_type.name
        # GGUF shapes run innermost first: [K, N] for a matrix, [N] for a vector (a q/k bias is permuted too).
        rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else int(tensor.shape[0])
        is_matrix = len(tensor.shape) == 2 and name.endswith(".weight") and "norm" not in name
        order = None
        if ".q_proj." in name:
            order = _rope_rows(rows, heads)
        elif ".k_proj." in name:
            order = _rope_rows(rows, kv_heads)
        if is_matrix and mode != "none":
            if type_name in quantized.SUPPORTED_TYPES:
                w = quantized.from_gguf(tensor.data, type_name, rows)
                if mode in ("int4", "int8"):
                    w = quantized.requantize(w, 4 if mode == "int4" else 8)
                weights[name] = w.take_rows(order) if order is not None else w
                continue
            if mode in ("int4", "int8"):
                full = _dequantized(tensor, gguf_py)
                full = full[order] if order is not None else full
                quantize = quantized.quantize_int4 if mode == "int4" else quantized.quantize_int8
                weights[name] = quantize(full, type_name)
                continue
        full = _dequantized(tensor, gguf_py)
        dense[name] = (full[order] if order is not None else full).to(dtype)
    _install(model, config, weights, dense, dtype)
    return model, folder


def _dequantized(tensor: Any, gguf_py: Any) -> torch.Tensor:
    values = gguf_py.quants.dequantize(tensor.data, tensor.tensor_type)
    shape = [int(d) for d in reversed(tensor.shape)]
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))  # a copy: the file is mapped read-only


def _install(model: nn.Module, config: Any, weights: dict[str, quantized.QuantizedWeight],
             dense: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Put the loaded tensors into the meta-device model; fail naming anything left unloaded."""
    tied = "lm_head.weight" not in weights and "lm_head.weight" not in dense
    for name, w in weights.items():
        module_name = name.rsplit(".", 1)[0]
        parent, _, child = module_name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if module_name == "model.embed_tokens":
            owner.embed_tokens = quantized.QuantEmbedding(w, dtype)  # type: ignore[union-attr]
        else:
            setattr(owner, child, quantized.QuantLinear(w, bias=dense.pop(module_name + ".bias", None), dtype=dtype))
    if tied:
        embedding = model.get_submodule("model.embed_tokens")
        if isinstance(embedding, quantized.QuantEmbedding):
            model.lm_head = quantized.QuantLinear(embedding.weight_q, dtype=dtype,  # type: ignore[assignment]
                                                  shared=True)
        elif "model.embed_tokens.weight" in dense:
            dense["lm_head.weight"] = dense["model.embed_tokens.weight"]
    missing = model.load_state_dict(dense, strict=False, assign=True)
    # The rotary tables are computed at construction, which happened on the meta device: build them again.
    rotary = model.get_submodule("model.rotary_emb")
    model.model.rotary_emb = type(rotary)(config=config)  # type: ignore[union-attr]
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left or missing.unexpected_keys:
        raise UnsupportedGGUF(f"GGUF load left {left[:5]} unloaded and {missing.unexpected_keys[:5]} unplaced")
