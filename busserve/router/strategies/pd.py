"""Prefill/decode disaggregation: a prefill engine computes the prompt's KV (all but the last token), a decode
engine receives it and generates. Engines are chosen by role and load, among any number of each."""

from __future__ import annotations

from busserve.router.strategies.common import disaggregate, run_on
from busserve.router.strategy import Cluster, Request, strategy


@strategy("pd")
async def pd(req: Request, cluster: Cluster) -> None:
    prefill = cluster.least_loaded(role="prefill")
    decode = cluster.try_least_loaded(role="decode", exclude=[prefill])
    if decode is None:  # a single engine (or no separate decoder): nothing to disaggregate
        await run_on(req, prefill)
        return
    await disaggregate(req, prefill, decode, end=req.prompt_len - 1)
