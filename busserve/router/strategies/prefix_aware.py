"""Prefix-aware routing: send the request where most of its prompt is already cached, weighed against load.

Each engine's cost is the prompt tokens it would still have to compute plus ``queue_tokens`` per request already
in flight there; the cheapest engine runs the whole request (and reuses its cached prefix).
"""

from __future__ import annotations

from busserve.router.strategies.common import run_on
from busserve.router.strategy import Cluster, NoEngine, Request, strategy


@strategy("prefix_aware")
async def prefix_aware(req: Request, cluster: Cluster, *, queue_tokens: int = 256) -> None:
    engines = cluster.engines(role="decode")
    if not engines:
        raise NoEngine("no live engine with role decode")
    best = min(engines, key=lambda e: (req.prompt_len - e.cached_prefix(req) + queue_tokens * e.load, e.id))
    await run_on(req, best)
