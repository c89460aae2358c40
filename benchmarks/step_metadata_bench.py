"""How long ``ModelRunner.build_metadata`` takes to describe one step (slot mapping, decode group, prefill chunks),
without the model: what every engine step pays on the host before its first kernel.

    .venv/bin/python benchmarks/step_metadata_bench.py

Sequences are stand-ins carrying what the runner reads (computed tokens, token ids, page table); shapes are decode
batches of 16 × 500 and 64 × 1,000 tokens of context, and 4 decoders beside a 512-token prompt.
"""

from __future__ import annotations

import time
import types

import torch

from busserve.engine.attention_backends import TorchDecode
from busserve.engine.runner import ModelRunner, StepStaging


def _batch(decoders: int, ctx: int, prompt: int = 0) -> list[tuple[object, int]]:
    batch: list[tuple[object, int]] = []
    for i in range(decoders):
        seq = types.SimpleNamespace(num_computed=ctx, token_ids=list(range(ctx + 1)),
                                    pages=list(range(i * 70, i * 70 + ctx // 16 + 1)))
        batch.append((seq, 1))
    if prompt:
        seq = types.SimpleNamespace(num_computed=0, token_ids=list(range(prompt)),
                                    pages=list(range(5000, 5000 + prompt // 16 + 1)))
        batch.append((seq, prompt))
    return batch


def main() -> None:
    runner = ModelRunner.__new__(ModelRunner)  # no model: only the host-side description of a step is timed
    runner.page_size, runner.deterministic, runner.kv, runner.decode_backend = 16, False, None, TorchDecode()
    runner.prefill_backend, runner.graphs, runner.device = None, None, torch.device("cpu")
    runner.staging = StepStaging(runner.device)
    for name, batch in [("16 decoders x 500", _batch(16, 500)), ("64 decoders x 1000", _batch(64, 1000)),
                        ("4 decoders + 512-token prompt", _batch(4, 300, 512))]:
        sample = [s for s, _ in batch]
        for _ in range(20):
            runner.build_metadata(batch, sample)  # type: ignore[arg-type]
        t = time.perf_counter()
        for _ in range(200):
            runner.build_metadata(batch, sample)  # type: ignore[arg-type]
        print(f"{name}: {(time.perf_counter() - t) / 200 * 1e6:.0f} us")


if __name__ == "__main__":
    main()
