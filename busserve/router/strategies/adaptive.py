"""Adaptive: per request, data parallel, PD or balanced PD — and the balance factor — from the prompt length, the
cached prefixes and the engines' current work. Its rules, why each is there and what they were measured against:
docs/STRATEGIES.md ("adaptive").

In short: the engines are split once (operator roles, else the first half by id prefills); short prompts run whole
(on the decode side while long prompts are arriving); a long prompt is prefilled where nobody decodes and decoded on
the decode side, the decode engine taking a share that grows with the prefill side's queue; a nearly idle decode
engine takes whole prompts while the prefill side's queue is longer; and a long prompt runs whole while every
prefill-side engine has requests decoding. Queued prompt tokens become seconds at each engine's own prefill rate,
measured by the engine and published in its heartbeats (``busserve.engine.step_rates``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from busserve.router.cluster import Engine
from busserve.router.strategies.common import check_prefill_chunk, disaggregate, run_on
from busserve.router.strategy import Cluster, NoEngine, Request, strategy

log = logging.getLogger(__name__)

UNMEASURED_PREFILL_TOKENS_PER_S = 2000.0  # until an engine has measured its own: SmolLM2 on one CPU core's order


@dataclass(frozen=True)
class EngineLoad:
    """What the choice reads of an engine."""

    id: str
    can_prefill: bool
    can_decode: bool
    requests: float  # requests queued or running there
    backlog: int  # prompt tokens queued for prefill
    decoding: int  # requests decoding
    cached: int  # tokens of this request's prompt in its prefix cache
    prefill_rate: float = 0.0  # prompt tokens per second, as the engine measures it (0: not measured yet)


@dataclass(frozen=True)
class Plan:
    prefill: str  # the engine computing [0, end); equal to ``decode`` for data parallel
    decode: str
    end: int  # 0 for data parallel
    f: float
    short: bool = False  # chosen by the short-prompt rule; the strategy remembers when it last saw each kind
    chunk: int = 0  # start_generate's prefill_chunk: prompt tokens per step beside the decode engine's decoders

    @property
    def data_parallel(self) -> bool:
        return self.prefill == self.decode


def sides(engines: Sequence[EngineLoad]) -> tuple[list[EngineLoad], list[EngineLoad]]:
    """(prefill side, decode side). Operator roles win; engines that do both are split in two halves by id, the
    first (larger, when odd) half prefilling — as ``busserve up --roles prefill --roles decode`` lays them out."""
    prefill_only = [e for e in engines if e.can_prefill and not e.can_decode]
    decode_only = [e for e in engines if e.can_decode and not e.can_prefill]
    both = sorted((e for e in engines if e.can_prefill and e.can_decode), key=lambda e: e.id)
    if not prefill_only and not decode_only and len(both) >= 2:
        half = (len(both) + 1) // 2
        return both[:half], both[half:]
    # With operator roles, dual-role engines stand in for a side that has no dedicated engine.
    return prefill_only or both, decode_only or both


def plan(prompt_len: int, engines: Sequence[EngineLoad], *, f: float = 0.1, f_max: float = 0.3,
         f_per_queued_s: float = 0.05, short_prompt: int = 256, prefill_tokens_per_s: float = 0.0,
         absorb_decoders: int = 3, absorb_queued_s: float = 0.5, memory_s: float = 10.0,
         short_wait_s: float = 0.5, prefill_chunk: int = 256, since_long_s: float = math.inf,
         since_short_s: float = math.inf) -> Plan:
    """How to serve one request. Pure: unit-tested without a bus. ``since_long_s`` / ``since_short_s``: seconds
    since this router last served a long / short prompt."""
    prefill_side, decode_side = sides(engines)
    if not decode_side:
        raise NoEngine("no live engine with role decode")

    def own(e: EngineLoad) -> int:
        return max(0, prompt_len - e.cached)

    def rate(e: EngineLoad) -> float:
        return prefill_tokens_per_s or e.prefill_rate or UNMEASURED_PREFILL_TOKENS_PER_S

    def queued_s(e: EngineLoad) -> float:
        return e.backlog / rate(e)

    def least_loaded(pool: list[EngineLoad]) -> EngineLoad:
        return min(pool, key=lambda e: (e.requests, own(e), e.id))

    def run_whole(pool: list[EngineLoad], short: bool = False) -> Plan:
        e = least_loaded(pool)
        return Plan(e.id, e.id, 0, 0.0, short)

    whole = [e for e in engines if e.can_prefill and e.can_decode]
    split = any(p.id != d.id for p in prefill_side for d in decode_side)  # a prefill and a decode engine apart
    short = [e for e in whole if own(e) <= short_prompt]
    if short:
        # Short prompts run whole. While long prompts are arriving (one within ``memory_s``) they keep to the
        # decode side, as in PD, where no long prefill stalls their decode steps and a long prompt always finds a
        # quiet prefill side (before the C++ decode kernel this measured +21% / +13% on the mixed workload; with
        # it, PD beats data parallel there and this is how adaptive follows). Chat alone runs data parallel.
        decode_ids = {e.id for e in decode_side}
        kept = [e for e in short if e.id in decode_ids]
        if not (since_long_s < memory_s and split and kept):
            return run_whole(short, short=True)
        d = least_loaded(kept)
        # Its prefill, though, goes to the prefill side when that has at most ``short_wait_s`` queued: prefilled
        # on the decode engine it stalls everyone decoding there — the chat answers whose length sets mixed's P99
        # (that way their TPOT ran ~5% above PD's, and mixed's P99 5% behind it at 80% load). A longer queue there
        # would cost this request more than the stall; with nobody decoding, the stall costs nothing.
        quiet = [p for p in prefill_side if p.id != d.id and p.decoding == 0]
        if d.decoding > 0 and own(d) > 1 and quiet:
            p = min(quiet, key=lambda e: (e.backlog, e.requests, e.id))
            if queued_s(p) <= short_wait_s:
                return Plan(p.id, d.id, prompt_len - 1, 0.0, short=True)
        return Plan(d.id, d.id, 0, 0.0, short=True)
    if whole and not split:
        return run_whole(whole)
    if not prefill_side:
        raise NoEngine("no live engine with role prefill")
    d = min(decode_side, key=lambda e: (e.decoding + e.backlog / max(1, prompt_len), e.requests, e.id))
    candidates = [p for p in prefill_side if p.id != d.id]
    if not candidates:  # one engine left that does both: nothing to disaggregate
        return Plan(d.id, d.id, 0, 0.0)
    # Disaggregating pays off by sending a long prefill where nobody decodes. A prefill-side engine with requests
    # decoding on it (short prompts run whole there) would stall them for the whole prefill instead of a share of
    # it, on top of the hop: then the request runs whole, as in data parallel.
    quiet = [p for p in candidates if p.decoding == 0]
    if not quiet and whole:
        return run_whole(whole)
    p = min(quiet or candidates, key=lambda e: (e.backlog + own(e), e.requests, e.id))
    # A burst queues on the prefill side while the decode engine, with few decoders, has spare time: it takes the
    # whole prompt while its own prefill queue is at least ``absorb_queued_s`` shorter (join the shorter queue —
    # requiring an empty one let it take one prompt of a burst at a time). That stalls at most ``absorb_decoders``
    # requests, ``prefill_chunk`` prompt tokens per step, and spares this one the queue — and everyone behind it its
    # share. With more decoders there the stall costs more than the queue saves (an earlier rule that absorbed
    # regardless of them measured +12% / +25% P99; absorb_decoders=6 measured worse than 3 again with packed weights).
    # While short prompts are arriving the decode engine prefills nothing of a long prompt — not the whole, not a
    # tail: their decoders have long answers ahead and make mixed's P99 (a tail of f ≤ 0.3 kept their TPOT p99 at
    # ~100 ms where PD's is ~85).
    chat = since_short_s < memory_s
    ahead_s = queued_s(p) - queued_s(d)
    # Past ``absorb_decoders`` it still absorbs while the stall it causes there (each decoder waits for this prompt)
    # is shorter than the wait it saves this request: a queue that keeps growing is never left to grow.
    stall_s = d.decoding * own(d) / rate(d)
    absorb = absorb_decoders >= 0 and (d.decoding <= absorb_decoders or stall_s < ahead_s)
    if d.can_prefill and absorb and ahead_s >= absorb_queued_s and not chat:
        return Plan(d.id, d.id, 0, 0.0, chunk=prefill_chunk)
    # The prefill side's queue sets the balance factor: the longer it is, the more of each prompt the decode engine
    # takes, up to ``f_max`` — a fixed f either leaves the queue to grow at high load (PD's TTFT diverges at 80%)
    # or stalls decoders for nothing at low load.
    factor = 0.0 if d.backlog > 0 or chat else min(max(f, f_max), f + f_per_queued_s * queued_s(p))
    # What the decode engine already caches of [0, end) never travels (``disaggregate`` sends from its match on).
    return Plan(p.id, d.id, min(prompt_len - 1, math.floor((1 - factor) * prompt_len)), factor,
                chunk=prefill_chunk if factor > 0 else 0)


def plan_remembering(prompt_len: int, engines: Sequence[EngineLoad], seen: dict[bool, float], now: float,
                     **settings: float) -> Plan:
    """``plan`` with the strategy's one piece of history: ``seen`` maps ``short`` → when this router last served a
    prompt of that kind (seconds, any monotonic clock); updated with this one."""
    best = plan(prompt_len, engines, since_long_s=now - seen.get(False, -math.inf),
                since_short_s=now - seen.get(True, -math.inf), **settings)  # type: ignore[arg-type]
    seen[best.short] = now
    return best


def _load(e: Engine, req: Request) -> EngineLoad:
    return EngineLoad(id=e.id, can_prefill="prefill" in e.roles, can_decode="decode" in e.roles, requests=e.load,
                      backlog=e.prefill_backlog, decoding=e.decoding, cached=e.cached_prefix(req),
                      prefill_rate=e.prefill_tokens_per_s)


# When this router last served a short / long prompt, per model (``plan_remembering``'s ``seen``). Per process, so
# router replicas each judge the traffic they see.
_last_seen: dict[str, dict[bool, float]] = {}


@strategy("adaptive")
async def adaptive(req: Request, cluster: Cluster, *, f: float = 0.1, f_max: float = 0.3,
                   f_per_queued_s: float = 0.05, short_prompt: int = 256,
                   prefill_tokens_per_s: float = 0.0, absorb_decoders: int = 3,
                   absorb_queued_s: float = 0.5, memory_s: float = 10.0, short_wait_s: float = 0.5,
                   prefill_chunk: int = 256) -> None:
    for name, value in (("f", f), ("f_max", f_max)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"adaptive: {name} must be in [0, 1), got {value}")
    check_prefill_chunk("adaptive", prefill_chunk)
    engines = {e.id: e for e in cluster.engines()}
    best = plan_remembering(req.prompt_len, [_load(e, req) for e in engines.values()],
                            _last_seen.setdefault(cluster.model, {}), time.monotonic(), f=f, f_max=f_max,
                            f_per_queued_s=f_per_queued_s, short_prompt=short_prompt,
                            prefill_tokens_per_s=prefill_tokens_per_s, absorb_decoders=absorb_decoders,
                            absorb_queued_s=absorb_queued_s, memory_s=memory_s, short_wait_s=short_wait_s,
                            prefill_chunk=prefill_chunk)
    # Why a request went where it did (``busserve router --log-level DEBUG``): the plan and the loads it read.
    if log.isEnabledFor(logging.DEBUG):
        log.debug("adaptive %s: %d tokens -> %s; loads %s", req.request_id, req.prompt_len, best,
                  [(e.id, e.load, e.prefill_backlog, e.decoding) for e in engines.values()])
    if best.data_parallel:
        await run_on(req, engines[best.decode], best.chunk)
    else:
        await disaggregate(req, engines[best.prefill], engines[best.decode], end=best.end, prefill_chunk=best.chunk)
