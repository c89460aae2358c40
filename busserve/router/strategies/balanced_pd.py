"""Balanced PD: like ``pd``, but the decode engine prefills the last fraction ``f`` of the prompt itself, taking
prefill work off a loaded prefill engine (the paper's balance factor)."""

from __future__ import annotations

import math

from busserve.router.strategies.common import disaggregate, run_on
from busserve.router.strategy import Cluster, Request, strategy


@strategy("balanced_pd")
async def balanced_pd(req: Request, cluster: Cluster, *, f: float = 0.1) -> None:
    if not 0.0 <= f < 1.0:
        raise ValueError(f"balanced_pd: f must be in [0, 1), got {f}")
    prefill = cluster.least_loaded(role="prefill")
    decode = cluster.try_least_loaded(role="decode", exclude=[prefill])
    if decode is None:
        await run_on(req, prefill)
        return
    await disaggregate(req, prefill, decode, end=math.floor((1 - f) * req.prompt_len))
