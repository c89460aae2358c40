"""Prefix-aware routing: send the request where most of its prompt is already cached, weighed against load.

Each engine's cost is the prompt tokens it would still have to compute plus ``queue_tokens`` per request already
in flight there; the cheapest engine runs the whole request (and reuses its cached prefix). Among engines holding the same
number of the prompt's tokens (none, for most), only the least loaded can be cheapest, so only those are weighed
(``Cluster.cheapest_candidates``): a decision costs about the same in a cluster of 8 or 256.
"""

from __future__ import annotations

from busserve.router.cluster import Engine
from busserve.router.strategies.common import run_on
from busserve.router.strategy import Cluster, NoEngine, Request, strategy


@strategy("prefix_aware")
async def prefix_aware(req: Request, cluster: Cluster, *, queue_tokens: int = 256) -> None:
    await run_on(req, cheapest(req, cluster, queue_tokens))


def cheapest(req: Request, cluster: Cluster, queue_tokens: int = 256) -> Engine:
    """The engine where ``req`` costs least: prompt tokens still to compute plus ``queue_tokens`` per request in
    flight (ties: the lower id)."""
    candidates = cluster.cheapest_candidates(req, role="decode")
    if not candidates:
        raise NoEngine("no live engine with role decode")
    return min(candidates, key=lambda c: (req.prompt_len - c[1] + queue_tokens * c[0].load, c[0].id))[0]
