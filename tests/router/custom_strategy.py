"""A strategy defined outside busserve, run as its own process by the tests (``busserve strategy serve``)."""

from __future__ import annotations

from busserve.router.strategy import Cluster, NoEngine, Request


async def pinned(req: Request, cluster: Cluster, *, target: str = "B") -> None:
    """Everything on one named engine — easy to observe from outside (Final.engine_id)."""
    engine = next((e for e in cluster.engines() if e.id == target), None)
    if engine is None:
        raise NoEngine(f"engine {target} is not up")
    await engine.prep_recv(req, end=0)
    await engine.start_generate(req, begin=0)
