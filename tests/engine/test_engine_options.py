"""How ``busserve engine``'s options become the scheduler's budgets (busserve/engine/main.py build_core)."""

from __future__ import annotations

from pathlib import Path

import pytest

from busserve.engine.main import EngineOptions, build_core


@pytest.mark.parametrize(("batch", "prefill", "want"), [
    (None, None, (512, 2048)),  # CPU defaults: 512 beside decoders, a prompt of up to 2,048 in one step alone
    (64, None, (64, 64)),  # a budget set by hand holds for both
    (64, 1024, (64, 1024)),
    (None, 256, (512, 256)),  # below the step budget: no effect (the scheduler never shrinks a step for it)
])
def test_step_budgets(tiny_dir: Path, batch: int | None, prefill: int | None, want: tuple[int, int]) -> None:
    core = build_core(EngineOptions(engine_id="opts", model=str(tiny_dir), dtype="float32", transports=(),
                                    kv_pages=32, max_batch_tokens=batch, max_prefill_tokens=prefill))
    config = core.scheduler.config
    assert (config.max_batch_tokens, config.max_prefill_tokens) == want
