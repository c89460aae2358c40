"""Context migration: when the engine holding a request's context (its cached prefix) is busy, move that KV to a
less loaded engine instead of recomputing it there — the holder sends from its cache, nothing is recomputed."""

from __future__ import annotations

from busserve.router.strategies.common import disaggregate, run_on
from busserve.router.strategy import Cluster, Request, strategy


@strategy("migrate")
async def migrate(req: Request, cluster: Cluster, *, busy: int = 2, min_prefix: int = 64) -> None:
    holder, cached = cluster.longest_prefix(req)
    idle = cluster.least_loaded(role="decode")
    if holder is None or cached < min_prefix:
        await run_on(req, idle)  # nothing worth moving
        return
    if holder.load < busy or idle.id == holder.id or idle.load >= holder.load:
        await run_on(req, holder)  # the holder has room: use its cache in place
        return
    await disaggregate(req, holder, idle, end=cached)  # move the context to the idle engine
