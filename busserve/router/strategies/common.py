"""The two moves every built-in strategy is made of."""

from __future__ import annotations

import contextlib
import logging

from busserve.errors import BusserveError, RemoteError
from busserve.messages import RemoteSendReply
from busserve.router.cluster import Engine, EngineLost
from busserve.router.request import Request

log = logging.getLogger(__name__)


def check_prefill_chunk(strategy: str, prefill_chunk: int) -> None:
    if prefill_chunk < 0:
        raise ValueError(f"{strategy}: prefill_chunk must be >= 0 (0: the engine's budget), got {prefill_chunk}")


async def run_on(req: Request, engine: Engine, prefill_chunk: int = 0) -> None:
    """Data parallel: the whole request on one engine (its own prefix cache still applies). ``prefill_chunk`` > 0:
    at most that many of its prompt tokens per step while others decode there."""
    await engine.prep_recv(req, end=0)
    await engine.start_generate(req, begin=0, prefill_chunk=prefill_chunk)


async def disaggregate(req: Request, sender: Engine, receiver: Engine, end: int,
                       prefill_chunk: int = 0) -> RemoteSendReply | None:
    """``sender`` provides the KV of ``prompt[:end]`` (computing what it lacks), ``receiver`` does the rest, at most
    ``prefill_chunk`` (> 0) prompt tokens per step while others decode there.

    The receiver reuses whatever prefix it already caches; only ``[matched, end)`` crosses the wire.
    """
    end = max(0, min(end, req.prompt_len - 1))
    if sender.id == receiver.id or end == 0:
        await run_on(req, receiver, prefill_chunk)
        return None
    try:
        recv = await receiver.prep_recv(req, end=end, sender=sender)
    except RemoteError as exc:
        if exc.code != "overloaded" or exc.field != "end":
            raise
        # No room to reserve the prompt's KV now: the receiver prefills it itself, queued until pages free up.
        log.info("%s: %s cannot reserve %d tokens now; it prefills the request itself", req.label, receiver.id, end)
        await run_on(req, receiver, prefill_chunk)
        return None
    sent = None
    if recv.matched < end:
        try:
            sent = await sender.remote_send(req, recv.kv_addr, begin=recv.matched, end=end)
        except EngineLost:
            # The prefill engine is gone mid-transfer: drop the reservation (the receiver quarantines its pages,
            # since the sender may only be stalled) and let the receiver prefill the prompt, under a new id.
            log.warning("%s: sender %s lost mid-transfer; %s prefills the request", req.label, sender.id, receiver.id)
            with contextlib.suppress(BusserveError):
                await receiver.abort(req, reason=f"sender {sender.id} lost")
            req.renumber()
            await run_on(req, receiver, prefill_chunk)
            return None
    await receiver.start_generate(req, begin=end, prefill_chunk=prefill_chunk)
    return sent
