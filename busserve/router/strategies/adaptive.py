"""Adaptive: per request, data parallel, PD or balanced PD — and the balance factor — from the prompt length, the
cached prefix and the engines' load, measured in work rather than in requests.

What the measurements on a 2-core machine said (docs/BENCHMARKS.md, issue #7): for long prompts PD cut P99 JCT by
24-38% against data parallel, because decode steps no longer wait behind 512-token prefill chunks; for short chat
prompts every strategy was within a few percent. So:

* a long prompt (at least ``long_prompt`` tokens that no engine has cached) is disaggregated: prefill where the
  least work is queued, decode where the fewest requests decode; the decode engine takes the last ``f`` of the
  prompt only when the prefill side is backed up by more than a whole prompt beyond it (balanced PD);
* anything shorter runs whole on one engine, the one with the least work ahead — a cached prefix counts for the
  engine holding it, and a queued long prefill counts against an engine (short requests should not wait behind it).

Work is prompt tokens still to prefill plus ``decode_cost`` tokens per request decoding.
"""

from __future__ import annotations

import math

from busserve.router.cluster import Engine
from busserve.router.strategies.common import disaggregate, run_on
from busserve.router.strategy import Cluster, NoEngine, Request, strategy


@strategy("adaptive")
async def adaptive(req: Request, cluster: Cluster, *, long_prompt: int = 512, decode_cost: int = 128,
                   max_f: float = 0.3) -> None:
    engines = cluster.engines(role="decode")
    if not engines:
        raise NoEngine("no live engine with role decode")

    def uncached(e: Engine) -> int:
        return req.prompt_len - e.cached_prefix(req)

    def work(e: Engine) -> int:
        return e.prefill_backlog + decode_cost * e.decoding

    if min(uncached(e) for e in engines) < long_prompt or len(cluster.engines()) < 2:
        await run_on(req, min(engines, key=lambda e: (work(e) + uncached(e), e.id)))
        return
    prefill = min(cluster.engines(role="prefill") or engines, key=lambda e: (work(e) + uncached(e), e.id))
    others = [e for e in engines if e.id != prefill.id]
    if not others:
        await run_on(req, prefill)
        return
    decode = min(others, key=lambda e: (e.decoding, e.prefill_backlog, e.id))
    excess = prefill.prefill_backlog - decode.prefill_backlog
    f = min(max_f, excess / (2 * req.prompt_len)) if excess > req.prompt_len else 0.0
    end = req.prompt_len - 1 if f == 0 else math.floor((1 - f) * req.prompt_len)
    await disaggregate(req, prefill, decode, end=end)
