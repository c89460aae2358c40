"""The two moves every built-in strategy is made of."""

from __future__ import annotations

from busserve.messages import RemoteSendReply
from busserve.router.cluster import Engine
from busserve.router.request import Request


async def run_on(req: Request, engine: Engine) -> None:
    """Data parallel: the whole request on one engine (its own prefix cache still applies)."""
    await engine.prep_recv(req, end=0)
    await engine.start_generate(req, begin=0)


async def disaggregate(req: Request, sender: Engine, receiver: Engine, end: int) -> RemoteSendReply | None:
    """``sender`` provides the KV of ``prompt[:end]`` (computing what it lacks), ``receiver`` does the rest.

    The receiver reuses whatever prefix it already caches; only ``[matched, end)`` crosses the wire.
    """
    end = max(0, min(end, req.prompt_len - 1))
    if sender.id == receiver.id or end == 0:
        await run_on(req, receiver)
        return None
    recv = await receiver.prep_recv(req, end=end, sender=sender)
    sent = None
    if recv.matched < end:
        sent = await sender.remote_send(req, recv.kv_addr, begin=recv.matched, end=end)
    await receiver.start_generate(req, begin=end)
    return sent
