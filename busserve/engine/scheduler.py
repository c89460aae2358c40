"""Continuous batching over one token budget per step. Plain Python: no torch, no NATS.

Each step:
 1. running sequences, oldest first, take what they need — one token when decoding, a chunk when prefilling —
    growing their pages; when pages run out, the youngest running sequences are preempted (pages released,
    state kept, prefill recomputed later, mostly from the prefix cache);
 2. waiting sequences are admitted in arrival order (FCFS: the head blocks the rest) while budget, pages and
    ``max_running`` allow; an admitted sequence first reuses the longest cached prefix of its tokens.

Prefill chunks and decode tokens share one batch. Parked sequences (prep_recv) hold reserved pages and are not
scheduled until start_generate. Pages of a dropped receive that a sender may still be writing are *held* (under the
request's key, outside any sequence) until the engine releases them. The engine calls ``schedule`` → runs the
batch → ``advance`` → samples.

Sequences are keyed by ``(request_id, kind)``: one engine can be a request's sender and its receiver at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from busserve.engine.sequence import SeqKind, SeqStatus, Sequence
from busserve.kv.pool import OutOfPages, PageAllocator
from busserve.kv.radix_cache import RadixCache


class DuplicateRequest(Exception):
    pass


class NeverFits(ValueError):
    """A sequence larger than the whole KV pool: it would preempt itself forever."""


SeqKey = tuple[str, SeqKind]


@dataclass
class SchedulerConfig:
    page_size: int = 16
    max_batch_tokens: int = 1024
    # The budget of a step with nobody decoding, for the oldest prompt's remaining tokens: no one waits on a long
    # step then, and one chunk is cheaper than several (fewer steps; one causal attention instead of chunks that
    # each attend over the ones before). 0: max_batch_tokens.
    max_prefill_tokens: int = 0
    max_running: int = 64
    max_model_len: int = 8192


@dataclass
class Batch:
    seqs: list[Sequence] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_tokens.append(n)

    def __bool__(self) -> bool:
        return bool(self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self) -> Iterator[tuple[Sequence, int]]:
        return iter(zip(self.seqs, self.num_tokens, strict=True))

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: PageAllocator, cache: RadixCache) -> None:
        self.config = config
        self.allocator = allocator
        self.cache = cache
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: dict[str, Sequence] = {}
        self.frozen: dict[str, Sequence] = {}  # live migration: stopped, pages kept, until released or thawed
        self.by_id: dict[SeqKey, Sequence] = {}
        self.held: dict[SeqKey, list[int]] = {}  # pages kept past their sequence (see ``hold``)
        self.num_preemptions = 0

    # ------------------------------------------------------------------ intake

    def get(self, request_id: str, kind: SeqKind = SeqKind.GENERATE) -> Sequence | None:
        return self.by_id.get((request_id, kind))

    def _register(self, seq: Sequence) -> None:
        if seq.key in self.by_id:
            raise DuplicateRequest(f"request {seq.request_id!r} is already on this engine")
        self.by_id[seq.key] = seq

    def _check_fits(self, seq: Sequence) -> None:
        capacity = self.allocator.num_pages * self.config.page_size
        if seq.compute_target + (1 if seq.kind is SeqKind.GENERATE else 0) > capacity:
            raise NeverFits(f"request {seq.request_id!r} needs {seq.compute_target} tokens of KV and more to "
                            f"generate; the whole pool holds {capacity}")

    def add(self, seq: Sequence) -> None:
        self._check_fits(seq)
        self._register(seq)
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def park(self, seq: Sequence, end: int, lease_deadline: float) -> int:
        """prep_recv: reuse the cached prefix of ``prompt[:end]`` and reserve pages for the rest of ``[0, end)``.

        The match stops short of the prompt's last token, so that the page the receiver will compute into is
        never a shared one. Returns ``matched``; raises OutOfPages (holding nothing) when the pool is too full.
        """
        if seq.key in self.by_id:
            raise DuplicateRequest(f"request {seq.request_id!r} is already on this engine")
        self._check_fits(seq)
        ps = self.config.page_size
        limit = min(end, seq.prompt_len - 1)
        matched_pages = self.cache.match(seq.token_ids, limit) if limit > 0 else []
        self.allocator.incref(matched_pages)
        new = self._alloc(-(-end // ps) - len(matched_pages))
        if new is None:
            self.allocator.decref(matched_pages)
            raise OutOfPages(f"cannot reserve {end} tokens of KV ({self.allocator.free_count} pages free)")
        self._register(seq)
        seq.pages = matched_pages + new
        seq.num_computed = seq.num_cached = len(matched_pages) * ps
        seq.parked_end = end
        seq.lease_deadline = lease_deadline
        seq.status = SeqStatus.PARKED
        self.parked[seq.request_id] = seq
        return seq.num_computed

    def start_parked(self, request_id: str, begin: int, prefill_chunk: int = 0) -> Sequence:
        """start_generate: the KV of ``[0, begin)`` is in place; queue the rest of the prefill and the decode."""
        seq = self.parked.pop(request_id)
        seq.prefill_chunk = prefill_chunk
        if begin == 0:
            seq.num_computed = seq.num_cached = 0
            self.allocator.decref(seq.pages)
            seq.pages = []
        else:
            # At least one prompt token must be computed here to get logits for the first output token.
            seq.num_computed = seq.num_cached = min(begin, seq.prompt_len - 1)
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)  # its prefill already happened elsewhere: first in line
        return seq

    def start_migrated(self, request_id: str, begin: int, extend: list[int], prefill_chunk: int = 0) -> Sequence:
        """start_generate after a live migration: the request's tokens grew by ``extend`` while its KV moved here,
        ``[0, begin)`` of it landed; the rest (at least the last token) is computed here. Reserved pages beyond
        what the tokens need go back."""
        seq = self.parked.pop(request_id)
        seq.prefill_chunk = prefill_chunk
        seq.token_ids.extend(extend)
        seq.prompt_len = len(seq.token_ids)
        seq.num_computed = seq.num_cached = min(begin, seq.prompt_len - 1)
        keep = -(-len(seq.token_ids) // self.config.page_size)
        if len(seq.pages) > keep:
            self.allocator.decref(seq.pages[keep:])
            del seq.pages[keep:]
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        return seq

    def freeze(self, seq: Sequence) -> None:
        """Stop scheduling a running sequence, keeping its pages (live migration's last round)."""
        self.running.remove(seq)
        seq.status = SeqStatus.FROZEN
        self.frozen[seq.request_id] = seq

    def thaw(self, seq: Sequence) -> None:
        """A frozen sequence decodes on (its migration did not happen)."""
        del self.frozen[seq.request_id]
        seq.status = SeqStatus.RUNNING
        self.running.insert(0, seq)

    # ------------------------------------------------------------------ the step

    def schedule(self) -> Batch:
        batch = Batch()
        budget = self.config.max_batch_tokens
        # Whether anyone decodes here decides two things: a sequence's ``prefill_chunk`` applies only then (every
        # step stalls them for its whole chunk), and only without them may the oldest prompt take a step of up to
        # ``max_prefill_tokens``.
        decoding = any(not s.is_prefill for s in self.running)
        if not decoding and self.config.max_prefill_tokens > budget:
            oldest = next((s for s in self.running if s.remaining > 0), self.waiting[0] if self.waiting else None)
            if oldest is not None:
                budget = max(budget, min(self.config.max_prefill_tokens, oldest.remaining))
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.remaining, self._chunk(seq, budget, decoding))
            if n > 0:
                if self._grow_or_preempt(seq, seq.num_computed + n, i):
                    batch.add(seq, n)
                    budget -= n
                elif seq.status is not SeqStatus.RUNNING:
                    continue  # seq preempted itself; the list shifted
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running:
            seq = self.waiting[0]
            n = self._admit(seq, self._chunk(seq, budget, decoding))
            if n is None:
                if self._release_queued_pages(behind=seq):
                    continue  # pages held behind the head in the queue came back: try the head again
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            if n > 0:
                batch.add(seq, n)
                budget -= n
        return batch

    @staticmethod
    def _chunk(seq: Sequence, budget: int, decoding: bool) -> int:
        return min(budget, seq.prefill_chunk) if decoding and seq.prefill_chunk > 0 else budget

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Match a cached prefix (fresh sequences), then reserve pages for the first chunk. None: cannot admit."""
        fresh = not seq.pages and seq.num_computed == 0
        matched: list[int] = []
        if fresh:
            limit = seq.compute_target - (1 if seq.kind is SeqKind.GENERATE else 0)
            record = seq.kind is SeqKind.GENERATE and seq.num_preemptions == 0
            matched = self.cache.match(seq.token_ids, limit, record=record) if limit > 0 else []
            self.allocator.incref(matched)  # before allocating, so eviction cannot take them
            seq.pages = matched
            seq.num_computed = seq.num_cached = len(matched) * self.config.page_size
        n = min(seq.remaining, budget)
        if n > 0 and not self._grow(seq, seq.num_computed + n):
            if fresh:
                self.allocator.decref(matched)
                seq.pages = []
                seq.num_computed = seq.num_cached = 0
            return None
        return n

    def _grow(self, seq: Sequence, upto: int) -> bool:
        need = -(-upto // self.config.page_size) - len(seq.pages)
        if need <= 0:
            return True
        new = self._alloc(need)
        if new is None:
            return False
        seq.pages.extend(new)
        return True

    def _grow_or_preempt(self, seq: Sequence, upto: int, index: int) -> bool:
        while not self._grow(seq, upto):
            victim = self._victim(after=index)
            if victim is None:
                if seq.kind is SeqKind.GENERATE:
                    self.preempt(seq)
                return False
            self.preempt(victim)
        return True

    def _release_queued_pages(self, behind: Sequence) -> bool:
        """The queue's head cannot get pages while sequences waiting behind it hold some (started after a
        transfer, or preempted mid-way): take them back from the youngest, as a preemption would (full pages stay
        cached, so it recomputes little). Without this, waiters holding the whole pool wait on each other forever."""
        for seq in reversed(self.waiting):
            if seq is behind:
                return False
            if seq.pages:
                self._release(seq, cache_computed=True)
                seq.num_computed = seq.num_cached = 0
                seq.prompt_cached = False
                seq.num_preemptions += 1
                self.num_preemptions += 1
                return True
        return False

    def _victim(self, after: int) -> Sequence | None:
        """The youngest running GENERATE sequence not yet scheduled in this step."""
        for j in range(len(self.running) - 1, after, -1):
            if self.running[j].kind is SeqKind.GENERATE:
                return self.running[j]
        return None

    def _alloc(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        short = n - self.allocator.free_count
        if short > 0 and self.cache.evict(short) < short:
            return None
        try:
            return self.allocator.alloc(n)
        except OutOfPages:
            return None

    def preempt(self, seq: Sequence) -> None:
        """Release a running sequence's pages; it recomputes later (its full pages stay cached meanwhile)."""
        self.running.remove(seq)
        self._release(seq, cache_computed=True)
        seq.num_computed = seq.num_cached = 0
        seq.prompt_cached = False
        seq.num_preemptions += 1
        self.num_preemptions += 1
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ after the step

    def advance(self, batch: Batch) -> None:
        ps = self.config.page_size
        for seq, n in batch:
            seq.num_computed += n
            if not seq.prompt_cached:
                upto = seq.prompt_len if seq.kind is SeqKind.GENERATE else seq.target
                if seq.num_computed >= upto:
                    self.cache.insert(seq.token_ids[:upto], seq.pages[: upto // ps])
                    seq.prompt_cached = True

    def finish(self, seq: Sequence, *, hold: bool = False) -> None:
        """Remove a sequence wherever it is and give its pages back (computed full pages stay cached). ``hold``
        (parked sequences only): keep the pages referenced, under the sequence's key, until ``release_held``."""
        if self.by_id.pop(seq.key, None) is None:
            return
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.PARKED:
            del self.parked[seq.request_id]
        elif seq.status is SeqStatus.FROZEN:
            del self.frozen[seq.request_id]
        was_parked = seq.status is SeqStatus.PARKED
        if hold and was_parked and seq.pages:
            self.held[seq.key] = self.held.get(seq.key, []) + seq.pages
            seq.pages = []
        else:
            # Parked pages may still be in flight from a sender: never offer them to the cache.
            self._release(seq, cache_computed=not was_parked)
        seq.status = SeqStatus.FINISHED

    def release_held(self, key: SeqKey) -> int:
        """Give back the pages held for ``key`` (uncached: what a late sender wrote is not trusted). Returns them."""
        pages = self.held.pop(key, [])
        self.allocator.decref(pages)
        return len(pages)

    @property
    def held_pages(self) -> int:
        return sum(len(p) for p in self.held.values())

    def _release(self, seq: Sequence, *, cache_computed: bool) -> None:
        ps = self.config.page_size
        if cache_computed and seq.pages:
            full = min(seq.num_computed, len(seq.token_ids)) // ps
            if full:
                self.cache.insert(seq.token_ids[: full * ps], seq.pages[:full])
        self.allocator.decref(seq.pages)
        seq.pages = []

    def expired_parked(self, now: float) -> list[Sequence]:
        return [s for s in self.parked.values() if s.lease_deadline <= now]

    # ------------------------------------------------------------------ accounting

    @property
    def has_work(self) -> bool:
        return any(s.remaining > 0 for s in self.running) or bool(self.waiting)

    def pages_held_by_requests(self) -> int:
        """References held by live sequences and by held (quarantined) pages; 0 when nothing is alive."""
        return sum(len(s.pages) for s in self.by_id.values()) + self.held_pages

    def check_pages(self) -> None:
        """Every page reference is accounted for: refcount == (1 if cached) + live sequences holding it, and a
        page is free exactly when its refcount is 0. Raises AssertionError naming the first page that is off."""
        expected = [0] * self.allocator.num_pages
        for p in self.cache.pages_set():
            expected[p] += 1
        for seq in self.by_id.values():
            for p in seq.pages:
                expected[p] += 1
        for pages in self.held.values():
            for p in pages:
                expected[p] += 1
        for p, want in enumerate(expected):
            got = self.allocator.refcount(p)
            assert got == want, f"page {p}: refcount {got}, accounted {want}"
        free = sum(1 for r in expected if r == 0)
        assert free == self.allocator.free_count, f"{self.allocator.free_count} pages on the free list, {free} free"
