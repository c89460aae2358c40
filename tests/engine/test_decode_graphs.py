"""Decode steps over the static buffers of engine/decode_graphs.py give the tokens of the eager path.

On a GPU those buffers are what the captured CUDA graphs read (tests/gpu checks graphs on and off); here the same
forward runs eagerly over them, which checks what a graph cannot hide: the padding of a batch to its bucket, the
page table and slot mapping written into fixed places, and the rows handed back in batch order.
"""

from __future__ import annotations

import pytest

from busserve.engine.decode_graphs import DecodeGraphs, buckets_up_to
from busserve.engine.model_loader import LoadedModel
from tests.helpers import greedy, running_core


def test_buckets_cover_every_batch_size() -> None:
    assert buckets_up_to(1) == [1]
    assert buckets_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    assert buckets_up_to(48) == [1, 2, 4, 8, 16, 32, 64]


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_static_decode_steps_give_the_eager_tokens(tiny: LoadedModel, attention: str) -> None:
    prompts = [list(range(100 + 7 * i, 100 + 7 * i + n)) for i, n in enumerate((5, 17, 40, 3, 33))]
    lengths = [9, 14, 6, 12, 10]  # rows finish at different steps: batches of 5, 4, 3, ... rows, padded to buckets
    outputs = {}
    for static in (False, True):
        with running_core(tiny, attention=attention, max_batch_tokens=256) as h:
            runner = h.core.runner
            if static:
                runner.graphs = DecodeGraphs(runner.model, runner.kv, runner.decode_backend, runner.page_size,
                                             max_batch=8, max_pages=8, device=runner.device)
            rids = [h.submit(ids, greedy(n)) for ids, n in zip(prompts, lengths, strict=True)]
            outputs[static] = [h.tokens(r) for r in rids]
            if static:
                assert runner.graphs is not None and runner.graphs.replays >= 8
    assert outputs[True] == outputs[False]
    assert [len(t) for t in outputs[True]] == lengths
