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


def test_quantization_and_deterministic_reach_the_engine_and_busserve_ups_children() -> None:
    from busserve.cli import build_parser
    from busserve.engine.main import options_from_args
    from busserve.launch.stack import engine_command

    args = build_parser().parse_args(["engine", "--quantization", "auto", "--deterministic"])
    opts = options_from_args(args)
    assert opts.quantization == "auto" and opts.deterministic
    assert options_from_args(build_parser().parse_args(["engine"])).quantization == "none"
    up = build_parser().parse_args(["up", "--quantization", "int4", "--deterministic"])
    cmd = engine_command(up, "e0", 1, "prefill,decode")
    assert cmd[cmd.index("--quantization") + 1] == "int4" and "--deterministic" in cmd
    assert "--deterministic" not in engine_command(build_parser().parse_args(["up"]), "e0", 1, "prefill,decode")


def test_deterministic_engine_refuses_dense_fp32_saying_why(tiny_dir: Path) -> None:
    # Why depends on the machine (no AVX-512 kernels, no AVX512-BF16, or fp32 itself); each message says so.
    with pytest.raises(ValueError, match="deterministic"):
        build_core(EngineOptions(engine_id="det", model=str(tiny_dir), dtype="float32", transports=(), kv_pages=32,
                                 deterministic=True))
