"""Adaptive: per request, data parallel, PD or balanced PD — and the balance factor — by estimating what each
choice costs, from the prompt length, the cached prefixes and the engines' current and recent work.

What the fixed strategies showed on the paper's experiment (docs/BENCHMARKS.md, issue #7): data parallel gives the
best time to first token (prefill is spread over both engines) but decode steps that share an engine with another
request's prefill chunk stall, which is what its P99 is made of; PD keeps decode steps clean but queues every
prefill on one engine. Neither is right at every moment, so for each request this strategy prices every option —
run it whole on engine E, or prefill ``[0, end)`` on P and the rest plus decode on D with ``end`` at f = 0, 0.1,
0.2, 0.3 — and takes the cheapest, in seconds:

* the request's own completion: P's queued prefill, its own prefill, the hop (one extra step on D), D's queue,
  then ``max_tokens`` decode steps stretched by the share of time D is expected to spend prefilling others
  (``Engine.prefill_rate`` over ``prefill_tokens_per_s``);
* the harm it does: every request decoding on an engine waits while this request's prefill runs there.

Priced one request at a time, spreading always wins — an idle engine is the quickest place for this request — and
the cluster settles into data parallel even where PD is better for everyone. So once the engines spend more than
``specialize_at`` of their time prefilling (from their recent prefill rates), decoding is kept on one engine (the
one that has prefilled least lately, which keeps it so): prompts longer than ``short_prompt`` are disaggregated
onto it from the others, with f from the same prices, and short ones may run whole on it when that costs its
decoders less than waiting for the prefill side. The 0.35
default sits between the loads where the fixed strategies measured data parallel and PD equal (0.29) and PD ahead
(0.44).

The costs need two speeds of the engines, ``prefill_tokens_per_s`` and ``decode_step_ms``; the defaults are what
SmolLM2 on one core of the benchmark machine does (docs/BENCHMARKS.md) — set them for other hardware with
``busserve strategy set adaptive --param decode_step_ms=...``. Roles are respected: prefill only on engines with
the prefill role, decode only on those with the decode role.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from busserve.router.cluster import Engine
from busserve.router.strategies.common import disaggregate, run_on
from busserve.router.strategy import Cluster, NoEngine, Request, strategy

FACTORS = (0.0, 0.1, 0.2, 0.3)
MAX_BUSY = 0.9  # never assume an engine prefills more than this share of the time (keeps the stretch finite)


@dataclass(frozen=True)
class EngineLoad:
    """What the cost model reads of an engine."""

    id: str
    can_prefill: bool
    can_decode: bool
    backlog: int  # prompt tokens queued for prefill
    decoding: int  # requests decoding
    prefill_rate: float  # prompt tokens/s sent here lately
    cached: int  # tokens of this request's prompt in its prefix cache


@dataclass(frozen=True)
class Plan:
    prefill: str  # the engine computing [0, end); equal to ``decode`` for data parallel
    decode: str
    end: int  # 0 for data parallel
    f: float
    cost_s: float

    @property
    def data_parallel(self) -> bool:
        return self.prefill == self.decode


def plan(prompt_len: int, max_tokens: int, engines: Sequence[EngineLoad], *, prefill_tokens_per_s: float,
         decode_step_ms: float, harm_weight: float = 1.0, specialize_at: float = 0.35,
         short_prompt: int = 256) -> Plan:
    """The cheapest way to serve one request. Pure: unit-tested without a bus."""
    tau = 1.0 / prefill_tokens_per_s
    step = decode_step_ms / 1000.0
    n_out = max(1, min(max_tokens, 4096))

    def busy(e: EngineLoad) -> float:
        return min(MAX_BUSY, e.prefill_rate * tau)

    def decode_s(e: EngineLoad) -> float:
        return n_out * step / (1.0 - busy(e))

    # Priced one request at a time, spreading always looks best: an idle engine is the quickest place for this
    # request. But once engines spend a large share of their time prefilling (``specialize_at``), every decode
    # step is stretched by it, and the cluster does better as one decode engine (the one with the most decoders)
    # that takes prefill only when that is cheaper than making its decoders wait, fed by the others.
    decoders = [e for e in engines if e.can_decode]
    specialized = len(engines) > 1 and bool(decoders) and sum(busy(e) for e in engines) / len(engines) >= specialize_at
    if specialized:
        # The decode engine is the one prefilling least lately: sticky, since it is then sent few prefills.
        lead = min(decoders, key=lambda e: (e.prefill_rate, -e.decoding, e.id))
        decoders = [lead]
    options: list[Plan] = []
    # Data parallel only on engines with both roles; on decode-only engines only if nothing else is possible.
    # Under specialization the decode engine takes whole requests only when their prefill is short.
    whole = [e for e in decoders if e.can_prefill and (not specialized or prompt_len - e.cached <= short_prompt)]
    if not whole and not any(p.can_prefill and p.id not in {d.id for d in decoders} for p in engines):
        whole = [e for e in decoders if e.can_prefill] or decoders
    for e in whole:
        own = max(0, prompt_len - e.cached)
        mine = tau * (e.backlog + own) + decode_s(e)
        harm = tau * own * e.decoding
        options.append(Plan(e.id, e.id, 0, 0.0, mine + harm_weight * harm))
    for p in engines:
        if not p.can_prefill:
            continue
        for d in decoders:
            if d.id == p.id:
                continue
            for f in FACTORS:
                end = min(prompt_len - 1, math.floor((1 - f) * prompt_len))
                if end <= 0:
                    continue
                first = max(0, end - max(p.cached, d.cached))  # what P computes: D's cached prefix never travels
                rest = prompt_len - max(end, d.cached)
                ready = tau * (p.backlog + first)
                start = max(ready + step, tau * d.backlog) + tau * rest  # the hop costs D one step
                mine = start + decode_s(d)
                harm = tau * (first * p.decoding + rest * d.decoding)
                options.append(Plan(p.id, d.id, end, f, mine + harm_weight * harm))
    if not options:
        raise NoEngine("no live engine with role decode")
    return min(options, key=lambda o: (o.cost_s, not o.data_parallel, o.f, o.prefill, o.decode))


def _load(e: Engine, req: Request) -> EngineLoad:
    return EngineLoad(id=e.id, can_prefill="prefill" in e.roles, can_decode="decode" in e.roles,
                      backlog=e.prefill_backlog, decoding=e.decoding, prefill_rate=e.prefill_rate,
                      cached=e.cached_prefix(req))


@strategy("adaptive")
async def adaptive(req: Request, cluster: Cluster, *, prefill_tokens_per_s: float = 1000.0,
                   decode_step_ms: float = 90.0, harm_weight: float = 1.0, specialize_at: float = 0.35,
                   short_prompt: int = 256) -> None:
    engines = {e.id: e for e in cluster.engines()}
    best = plan(req.prompt_len, req.sampling.max_tokens, [_load(e, req) for e in engines.values()],
                prefill_tokens_per_s=prefill_tokens_per_s, decode_step_ms=decode_step_ms, harm_weight=harm_weight,
                specialize_at=specialize_at, short_prompt=short_prompt)
    if best.data_parallel:
        await run_on(req, engines[best.decode])
    else:
        await disaggregate(req, engines[best.prefill], engines[best.decode], end=best.end)
