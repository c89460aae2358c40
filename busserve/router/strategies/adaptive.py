"""Adaptive: per request, data parallel, PD or balanced PD — and the balance factor — from the prompt length, the
cached prefix and engine load (see docs/BENCHMARKS.md for the measurements behind the thresholds)."""

from __future__ import annotations

import math

from busserve.router.strategies.common import disaggregate, run_on
from busserve.router.strategy import Cluster, Request, strategy


@strategy("adaptive")
async def adaptive(req: Request, cluster: Cluster, *, long_prompt: int = 1024, max_f: float = 0.3) -> None:
    holder, cached = cluster.longest_prefix(req)
    least = cluster.least_loaded(role="decode")
    uncached = req.prompt_len - cached
    # Short work, or a prompt mostly cached somewhere: splitting costs more than it saves.
    if uncached < long_prompt:
        target = holder if holder is not None and cached and holder.load <= least.load + 1 else least
        await run_on(req, target)
        return
    prefill = cluster.least_loaded(role="prefill")
    decode = cluster.try_least_loaded(role="decode", exclude=[prefill])
    if decode is None:
        await run_on(req, prefill)
        return
    # Move part of the prefill to the decode engine as the prefill side gets busier than the decode side.
    pressure = prefill.load - decode.load
    f = 0.0 if pressure <= 0 else min(max_f, 0.1 * pressure)
    end = req.prompt_len - 1 if f == 0 else math.floor((1 - f) * req.prompt_len)
    await disaggregate(req, prefill, decode, end=end)
