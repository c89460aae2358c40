"""The scheduler and the KV bookkeeping, driven on plain Python objects (no torch, no NATS)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from busserve.engine.scheduler import Batch, DuplicateRequest, NeverFits, Scheduler, SchedulerConfig
from busserve.engine.sequence import SeqKind, SeqStatus, Sequence
from busserve.kv.page_hash import prefix_page_hashes
from busserve.kv.pool import OutOfPages, PageAllocator
from busserve.kv.radix_cache import RadixCache
from busserve.messages import KVRemoved, KVStored

PS = 4


def create_scheduler(pages: int = 64, budget: int = 32, max_running: int = 16) -> Scheduler:
    alloc = PageAllocator(pages)
    return Scheduler(SchedulerConfig(page_size=PS, max_batch_tokens=budget, max_running=max_running),
                     alloc, RadixCache(alloc, PS))


def create_seq(rid: str, prompt_len: int, max_tokens: int = 4, base: int = 0) -> Sequence:
    return Sequence(request_id=rid, token_ids=[base + i for i in range(prompt_len)], max_tokens=max_tokens)


def run_to_completion(s: Scheduler, max_steps: int = 1000) -> list[Batch]:
    """Drive the scheduler like the engine does; 'sample' token 7 until each seq has max_tokens outputs."""
    batches = []
    for _ in range(max_steps):
        batch = s.schedule()
        if not batch:
            break
        batches.append(batch)
        s.advance(batch)
        for seq in batch.seqs:
            if seq.kind is SeqKind.GENERATE and seq.remaining == 0:
                seq.token_ids.append(7)
                if seq.num_output >= seq.max_tokens:
                    s.finish(seq)
            elif seq.kind is SeqKind.SEND and seq.remaining == 0:
                s.finish(seq)
        s.check_pages()
    assert not s.by_id, "requests left unfinished"
    return batches


def test_bookkeeping_imports_neither_torch_nor_nats() -> None:
    code = (
        "import sys, busserve.engine.scheduler, busserve.kv.radix_cache, busserve.kv.pool\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'nats')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_chunked_prefill_shares_the_budget_with_decode() -> None:
    s = create_scheduler(budget=10)
    a, b = create_seq("a", 6), create_seq("b", 20)
    s.add(a)
    s.add(b)
    first = s.schedule()
    assert [(q.request_id, n) for q, n in first] == [("a", 6), ("b", 4)]
    s.advance(first)
    a.token_ids.append(7)  # a sampled its first token; b is mid-prefill
    second = s.schedule()
    assert [(q.request_id, n) for q, n in second] == [("a", 1), ("b", 9)]
    s.advance(second)
    assert b.num_computed == 13 and a.num_computed == 7


def test_fcfs_head_blocks_while_it_cannot_fit_yet() -> None:
    s = create_scheduler(pages=8, budget=100)
    held = create_seq("held", 24, base=500)
    s.park(held, end=23, lease_deadline=1e9)  # 6 of the 8 pages, until its lease or start_generate
    big, small = create_seq("big", 16), create_seq("small", 4)
    s.add(big)
    s.add(small)
    assert not s.schedule()  # big needs 4 pages, 2 are free; small must not jump the queue
    assert [q.request_id for q in s.waiting] == ["big", "small"]
    s.finish(held)  # the reservation goes (its lease ended): both fit now, in arrival order
    assert [q.request_id for q in s.schedule().seqs] == ["big", "small"]
    s.check_pages()


def test_max_running_limits_admission() -> None:
    s = create_scheduler(max_running=2)
    for i in range(3):
        s.add(create_seq(f"r{i}", 4))
    batch = s.schedule()
    assert [q.request_id for q in batch.seqs] == ["r0", "r1"]
    run_to_completion(s)


def test_prefix_cache_hit_skips_computed_pages() -> None:
    s = create_scheduler()
    run_to_completion_one = create_seq("a", 13)
    s.add(run_to_completion_one)
    run_to_completion(s)
    b = create_seq("b", 13)
    s.add(b)
    batch = s.schedule()
    # 13 prompt tokens: 3 full pages cached; the match stops before the last token, so 12 are reused.
    assert b.num_cached == 12 and batch.num_tokens == [1]
    assert s.cache.hit_rate > 0
    run_to_completion(s)


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    s = create_scheduler()
    s.add(create_seq("a", 12))
    run_to_completion(s)
    b = create_seq("b", 12)
    s.add(b)
    batch = s.schedule()
    assert b.num_cached == 8 and batch.num_tokens == [4]  # last page recomputed into b's own page


def test_preemption_by_recompute_when_pages_run_out() -> None:
    s = create_scheduler(pages=6, budget=64)
    a, b = create_seq("a", 8, max_tokens=10), create_seq("b", 8, max_tokens=10, base=100)
    s.add(a)
    s.add(b)
    batches = run_to_completion(s)
    assert s.num_preemptions > 0
    assert b.num_preemptions > 0 and a.num_preemptions == 0  # the youngest goes first
    assert a.num_output == 10 and b.num_output == 10
    assert any(n > 1 for batch in batches[1:] for q, n in batch if q is b)  # b re-prefilled


def test_eviction_frees_lru_cached_pages_under_pressure() -> None:
    s = create_scheduler(pages=8, budget=64)
    s.add(create_seq("old", 12, base=100))
    run_to_completion(s)
    s.add(create_seq("new", 12, base=200))
    run_to_completion(s)
    s.add(create_seq("big", 28, base=300))  # needs 8 pages: everything cached must go
    run_to_completion(s)
    events = s.cache.drain_events()
    assert any(isinstance(e, KVRemoved) for e in events)
    assert any(isinstance(e, KVStored) for e in events)


def test_kv_events_use_chained_page_hashes() -> None:
    s = create_scheduler()
    seq = create_seq("a", 9)
    s.add(seq)
    run_to_completion(s)
    stored = [h for e in s.cache.drain_events() if isinstance(e, KVStored) for h in e.page_hashes]
    assert stored[:2] == prefix_page_hashes(seq.token_ids, PS)[:2]


def test_park_reserves_and_start_generates() -> None:
    s = create_scheduler()
    s.add(create_seq("warm", 10))
    run_to_completion(s)
    seq = create_seq("p", 10)
    matched = s.park(seq, end=9, lease_deadline=1e9)
    assert matched == 8  # two full pages cached from "warm"
    assert len(seq.pages) == 3 and seq.status is SeqStatus.PARKED
    assert not s.schedule()  # parked sequences are not scheduled
    s.start_parked("p", begin=9)
    batch = s.schedule()
    assert batch.num_tokens == [1]  # only the last prompt token is computed here
    run_to_completion(s)


def test_prefill_chunk_caps_a_prompt_only_beside_decoders() -> None:
    s = create_scheduler(budget=32)
    # Nobody decoding: the cap does not apply, the prompt takes the whole budget.
    alone = create_seq("alone", 40)
    s.park(alone, end=0, lease_deadline=1e9)
    s.start_parked("alone", begin=0, prefill_chunk=8)
    assert s.schedule().num_tokens == [32]
    s.finish(alone)
    # Beside a decoder: at most 8 of its prompt tokens per step, the decoder's token besides.
    d = create_seq("d", 4, max_tokens=100)
    s.add(d)
    s.advance(s.schedule())
    d.token_ids.append(7)
    p = create_seq("p", 20, base=100)
    s.park(p, end=0, lease_deadline=1e9)
    s.start_parked("p", begin=0, prefill_chunk=8)
    steps = []
    while p.is_prefill:
        batch = s.schedule()
        steps.append(batch.num_tokens)
        s.advance(batch)
        for q in batch.seqs:
            if q.remaining == 0:
                q.token_ids.append(7)
    assert steps == [[1, 8], [1, 8], [1, 4]]
    # A request without the cap still takes what the budget leaves.
    q = create_seq("q", 40, base=200)
    s.add(q)
    assert s.schedule().num_tokens == [1, 1, 30]
    for seq in (d, p, q):
        s.finish(seq)
    s.check_pages()


def test_with_nobody_decoding_the_oldest_prompt_goes_in_one_chunk() -> None:
    alloc = PageAllocator(64)
    s = Scheduler(SchedulerConfig(page_size=PS, max_batch_tokens=16, max_prefill_tokens=48), alloc,
                  RadixCache(alloc, PS))
    # Alone: the 40-token prompt in one step (its own length, not the whole idle budget: the next prompt waits).
    a, b = create_seq("a", 40, max_tokens=3), create_seq("b", 60, base=100, max_tokens=3)
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert batch.num_tokens == [40]
    s.advance(batch)
    a.token_ids.append(7)
    # a decodes now: back to max_batch_tokens, b's prompt in 16-token chunks beside it.
    batch = s.schedule()
    assert batch.num_tokens == [1, 15]
    s.advance(batch)
    a.token_ids.append(7)
    s.finish(a)
    # Nobody decoding again: b's remaining 45 tokens, up to max_prefill_tokens (48).
    assert s.schedule().num_tokens == [45]
    s.finish(b)
    s.check_pages()
    # Longer than max_prefill_tokens: chunks of it.
    c = create_seq("c", 100, base=200, max_tokens=1)
    s.add(c)
    assert [batch.num_tokens for batch in run_to_completion(s)] == [[48], [48], [4]]


def test_park_whole_prompt_recomputes_last_token() -> None:
    s = create_scheduler()
    seq = create_seq("p", 10)
    assert s.park(seq, end=10, lease_deadline=1e9) == 0
    s.start_parked("p", begin=10)
    assert s.schedule().num_tokens == [1]
    run_to_completion(s)


def test_parked_pages_are_not_cached_when_abandoned() -> None:
    s = create_scheduler()
    seq = create_seq("p", 12)
    s.park(seq, end=11, lease_deadline=0.0)
    assert s.expired_parked(now=1.0) == [seq]
    s.finish(seq)
    assert s.cache.num_pages == 0  # their KV may never have landed
    assert s.allocator.free_count == s.allocator.num_pages
    s.check_pages()


def test_a_request_larger_than_the_pool_is_refused_not_spun() -> None:
    """A prompt the whole pool cannot hold would preempt itself at every step and never finish: refused at once."""
    s = create_scheduler(pages=4)  # 16 tokens
    with pytest.raises(NeverFits, match="holds 16"):
        s.add(create_seq("big", 16))
    with pytest.raises(NeverFits):
        s.park(create_seq("big2", 20), end=10, lease_deadline=1e9)
    assert not s.by_id and s.allocator.free_count == 4
    s.add(create_seq("fits", 15, max_tokens=1))  # just fits: prompt and its first output token
    run_to_completion(s)


def test_a_sequence_alone_always_finishes_when_it_fits_the_pool() -> None:
    """With the pool just big enough for one request, a running request completes; others wait, never spin."""
    s = create_scheduler(pages=5, budget=64)  # 20 tokens
    a, b = create_seq("a", 8, max_tokens=12), create_seq("b", 8, max_tokens=12, base=100)
    s.add(a)
    s.add(b)
    batches = run_to_completion(s, max_steps=200)
    assert a.num_output == 12 and b.num_output == 12
    assert len(batches) < 100


def test_queued_requests_holding_the_pool_do_not_wait_on_each_other() -> None:
    """Two received requests (pages filled by a sender, started) hold the whole pool between them, queued, and each
    needs one more page for the rest of its prompt: the youngest gives its pages back (they stay cached) and both
    finish, instead of waiting on each other for ever."""
    s = create_scheduler(pages=8, budget=64)
    a, b = create_seq("a", 18, max_tokens=4), create_seq("b", 18, max_tokens=4, base=100)
    for q in (a, b):
        s.park(q, end=16, lease_deadline=1e9)  # 4 pages each: all 8; the last 2 prompt tokens need a 5th
    s.start_parked("a", 16)
    s.start_parked("b", 16)
    assert s.allocator.free_count == 0
    run_to_completion(s, max_steps=100)
    assert a.num_output == 4 and b.num_output == 4
    assert s.num_preemptions >= 1


def test_park_fails_cleanly_when_full() -> None:
    s = create_scheduler(pages=4)
    s.park(create_seq("held", 12, base=500), end=11, lease_deadline=1e9)  # 3 of the 4 pages
    with pytest.raises(OutOfPages):
        s.park(create_seq("p", 10), end=9, lease_deadline=1e9)
    assert s.allocator.free_count == 1 and list(s.by_id) == [("held", SeqKind.GENERATE)]


def test_duplicate_request_ids_are_refused() -> None:
    s = create_scheduler()
    s.add(create_seq("x", 4))
    with pytest.raises(DuplicateRequest):
        s.add(create_seq("x", 4))
    with pytest.raises(DuplicateRequest):
        s.park(create_seq("x", 4), end=2, lease_deadline=1e9)
    run_to_completion(s)


def test_send_sequences_prefill_to_target_only() -> None:
    s = create_scheduler(budget=8)
    send = Sequence(request_id="s", token_ids=list(range(20)), kind=SeqKind.SEND, target=15)
    s.add(send)
    batches = run_to_completion(s)
    assert sum(n for b in batches for _, n in b) == 15


def test_cancel_anywhere_releases_pages() -> None:
    s = create_scheduler(budget=4)
    seqs = [create_seq(f"c{i}", 9) for i in range(3)]
    for q in seqs:
        s.add(q)
    s.advance(s.schedule())
    for q in seqs:  # one running mid-prefill, others waiting
        s.finish(q)
    s.check_pages()
    assert not s.by_id and s.pages_held_by_requests() == 0


@pytest.mark.parametrize("seed", range(5))
def test_random_workload_never_leaks(seed: int) -> None:
    rng = random.Random(seed)
    s = create_scheduler(pages=24, budget=rng.choice([3, 8, 32]), max_running=rng.choice([2, 5, 16]))
    prefixes = [[rng.randrange(50) for _ in range(rng.randrange(1, 12))] for _ in range(3)]
    for i in range(30):
        toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randrange(1, 10))]
        seq = Sequence(request_id=f"r{i}", token_ids=toks, max_tokens=rng.randrange(1, 8))
        s.add(seq)
    # cancel a few at random points while running
    steps = 0
    while s.by_id and steps < 2000:
        steps += 1
        batch = s.schedule()
        s.advance(batch)
        for seq in batch.seqs:
            if seq.remaining == 0:
                seq.token_ids.append(rng.randrange(50))
                if seq.num_output >= seq.max_tokens:
                    s.finish(seq)
        if rng.random() < 0.05 and s.by_id:
            s.finish(rng.choice(list(s.by_id.values())))
        s.check_pages()
    assert not s.by_id
    s.cache.clear()
    assert s.allocator.free_count == s.allocator.num_pages
