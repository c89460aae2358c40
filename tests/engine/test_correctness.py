"""The engine against transformers' own forward and generate, on the real SmolLM2 model.

Logits at prefill and at every decode step; greedy outputs alone, batched with requests of other lengths that
arrive at other times, on a prefix-cache hit, and after preemption. No leaked pages after any of it.
"""

from __future__ import annotations

import time

import pytest
import torch

from busserve.engine.model_loader import LoadedModel
from busserve.engine.runner import ModelRunner, kv_layout_for
from busserve.engine.scheduler import Scheduler, SchedulerConfig
from busserve.engine.sequence import Sequence
from busserve.kv.pool import PageAllocator
from busserve.kv.radix_cache import RadixCache
from busserve.kv.storage import KVStorage
from tests.helpers import assert_greedy_equal, greedy, reference_greedy, reference_model, running_core

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea. The sea",
    "def fibonacci(n):\n    ",
    "In 1969, the first humans landed on the Moon. The mission was called",
]


def _ids(smol: LoadedModel, text: str) -> list[int]:
    return smol.tokenizer(text)["input_ids"]


@torch.inference_mode()
def test_logits_match_transformers_at_prefill_and_every_decode_step(smol: LoadedModel) -> None:
    ref = reference_model(smol)
    alloc = PageAllocator(128)
    sched = Scheduler(SchedulerConfig(page_size=16, max_batch_tokens=24), alloc, RadixCache(alloc, 16))
    runner = ModelRunner(smol, KVStorage(kv_layout_for(smol, 128, 16, torch.float32)))
    seqs = [Sequence(request_id=f"r{i}", token_ids=_ids(smol, p), max_tokens=6) for i, p in enumerate(PROMPTS)]
    for s in seqs:
        sched.add(s)
    checked = 0
    for _ in range(100):
        batch = sched.schedule()
        if not batch:
            break
        sample = [s for s, n in batch if s.num_computed + n == len(s.token_ids)]
        logits = runner.run(batch, sample)
        sched.advance(batch)
        for seq, row in zip(sample, logits, strict=True):
            want = ref(input_ids=torch.tensor([seq.token_ids])).logits[0, -1]
            torch.testing.assert_close(row, want, rtol=1e-4, atol=5e-4)
            checked += 1
            seq.token_ids.append(int(row.argmax()))
            if seq.num_output >= seq.max_tokens:
                sched.finish(seq)
    assert checked == 4 * 6  # every prefill (chunked with a 24-token budget) and every decode step
    sched.check_pages()


def test_greedy_equals_generate_alone(smol: LoadedModel) -> None:
    with running_core(smol) as h:
        for text in PROMPTS:
            ids = _ids(smol, text)
            rid = h.submit(ids, greedy(20))
            assert_greedy_equal(smol, ids, h.tokens(rid), reference_greedy(smol, ids, 20))


def test_greedy_batched_with_staggered_arrivals(smol: LoadedModel) -> None:
    prompts = [_ids(smol, p) for p in PROMPTS] + [_ids(smol, PROMPTS[1] * 6)]
    lengths = [12, 30, 7, 22, 16]
    with running_core(smol, max_batch_tokens=48) as h:
        rids = []
        for ids, n in zip(prompts, lengths, strict=True):
            rids.append(h.submit(ids, greedy(n)))
            time.sleep(0.15)  # arrive while the others are mid-prefill or decoding
        for rid, ids, n in zip(rids, prompts, lengths, strict=True):
            assert_greedy_equal(smol, ids, h.tokens(rid), reference_greedy(smol, ids, n))


def test_prefix_cache_hit_gives_the_output_of_a_miss(smol: LoadedModel) -> None:
    system = ("You are a meticulous assistant. Answer in one sentence, cite no sources, and never apologise. " * 3)
    ids = _ids(smol, system + "Question: what colour is the sky on a clear day? Answer:")
    with running_core(smol) as h:
        miss = h.submit(ids, greedy(16))
        miss_tokens = h.tokens(miss)
        hit = h.submit(ids, greedy(16))
        hit_tokens = h.tokens(hit)
        usage_hit = h.wait(hit)[-1].usage
        assert h.wait(miss)[-1].usage.cached_tokens == 0
    assert usage_hit.cached_tokens >= len(ids) - 16  # all but the last (partial) page came from the cache
    assert_greedy_equal(smol, ids, hit_tokens, miss_tokens)


def test_preempted_and_resumed_requests_give_the_same_output(smol: LoadedModel) -> None:
    prompts = [_ids(smol, p * 3) for p in PROMPTS]
    # 12 pages of 16 tokens cannot hold four ~40-token prompts growing by 40 tokens each: preemption must happen.
    with running_core(smol, num_pages=12, max_batch_tokens=64) as h:
        rids = [h.submit(ids, greedy(40)) for ids in prompts]
        outs = [h.tokens(r) for r in rids]
        preemptions = h.core.scheduler.num_preemptions
    assert preemptions > 0
    for ids, got in zip(prompts, outs, strict=True):
        assert_greedy_equal(smol, ids, got, reference_greedy(smol, ids, 40))
