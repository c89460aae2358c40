"""Data parallel: every request runs whole on one engine."""

from __future__ import annotations

import itertools

from busserve.router.strategies.common import check_prefill_chunk, run_on
from busserve.router.strategy import Cluster, NoEngine, Request, strategy

_turn = itertools.count()


@strategy("least_loaded")
async def least_loaded(req: Request, cluster: Cluster, *, prefill_chunk: int = 0) -> None:
    """The engine with the fewest requests in flight. ``prefill_chunk`` > 0: at most that many prompt tokens per
    step while others decode there (shorter stalls for them, a longer prefill for this one)."""
    check_prefill_chunk("least_loaded", prefill_chunk)
    await run_on(req, cluster.least_loaded(role="decode"), prefill_chunk)


@strategy("round_robin")
async def round_robin(req: Request, cluster: Cluster) -> None:
    """Engines in turn, whatever their load."""
    engines = cluster.engines(role="decode")
    if not engines:
        raise NoEngine("no live engine with role decode")
    await run_on(req, engines[next(_turn) % len(engines)])
