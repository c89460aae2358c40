"""``n`` and ``best_of`` for the OpenAI front: one request's choices as bus requests that share one prefill.

The bus carries one choice per request (one stream, one terminal event). A request for ``k`` choices (``n``, or
``best_of`` when it asks for more) becomes ``k`` GenerateRequests with ids ``<id>``, ``<id>-1``, ... and, where
a seed was given, seeds ``seed``, ``seed + 1``, ... so that choices differ and each is reproducible:

1. choice 0 goes out alone, through the strategy, like any request;
2. its stream says which engine generates it (the engine's StreamStatus) and, with its first token, that the
   prompt's KV is in that engine's prefix cache (pages enter the cache when the prompt is computed);
3. the other choices then go out with ``engine_hint`` naming that engine: the router runs them there, and each
   computes only the prompt's last, partial page — not the whole prompt again. If the engine is gone by then the
   hint is ignored and the strategy places them (they prefill where they land).

:func:`merged` yields ``(choice, event)`` from all the streams until every choice has its terminal event; leaving
it early cancels every choice still running. :func:`best` picks ``best_of``'s winners by cumulative
log-probability.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import msgspec

from busserve.messages import Error, Final, GenerateRequest, StreamEvent, StreamStatus, TokenChunk, TokenLogprob

MAX_CHOICES = 16


def choice_requests(gen: GenerateRequest, k: int) -> list[GenerateRequest]:
    """``gen`` as choice 0 and ``k - 1`` copies with their own ids and seeds."""
    out = [gen]
    for i in range(1, k):
        sampling = msgspec.structs.replace(gen.sampling, seed=None if gen.sampling.seed is None
                                           else (gen.sampling.seed + i) % 2**63)
        out.append(msgspec.structs.replace(gen, request_id=f"{gen.request_id}-{i}", sampling=sampling))
    return out


async def merged(bus: Any, gens: list[GenerateRequest], first_event_timeout_s: float
                 ) -> AsyncGenerator[tuple[int, StreamEvent], None]:
    """Every choice's events, tagged with its index, StreamStatus left out; ends after the last terminal event."""
    if len(gens) == 1:  # the common case: one stream, nothing to merge
        async for event in bus.generate(gens[0], first_event_timeout_s=first_event_timeout_s):
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, StreamEvent | BaseException]] = asyncio.Queue()
    pumps: list[asyncio.Task[None]] = []

    async def pump(i: int, gen: GenerateRequest, statuses: bool) -> None:
        stream = bus.generate(gen, first_event_timeout_s=first_event_timeout_s, statuses=statuses)
        try:
            async for event in stream:
                await queue.put((i, event))
        except Exception as exc:
            await queue.put((i, exc))
        finally:
            await stream.aclose()  # cancels the choice on the servers if it had not ended

    pumps.append(asyncio.create_task(pump(0, gens[0], statuses=True)))
    engine = ""
    launched = False
    ended = 0
    try:
        while ended < len(gens):
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, StreamStatus):
                if i == 0 and item.owner_kind == "engine":
                    engine = item.owner
                continue
            if i == 0 and not launched and isinstance(item, (TokenChunk, Final)):
                launched = True  # choice 0's prompt is computed and cached: the others reuse it
                for j, gen in enumerate(gens[1:], start=1):
                    hinted = msgspec.structs.replace(gen, engine_hint=engine or None)
                    pumps.append(asyncio.create_task(pump(j, hinted, statuses=False)))
            if isinstance(item, (Final, Error)):
                ended += 1
                if i == 0 and isinstance(item, Error) and not launched:
                    yield i, item  # refused before anything ran: that is the answer for every choice
                    return
            yield i, item
    finally:
        for t in pumps:
            t.cancel()
        for t in pumps:
            with contextlib.suppress(BaseException):
                await t


def best(choices: list[tuple[list[str], list[TokenLogprob], Final]], n: int) -> list[int]:
    """Indices of the ``n`` choices with the highest cumulative log-probability (ties: the earlier choice)."""
    score = [sum(lp.logprob for lp in lps) for _, lps, _ in choices]
    return sorted(range(len(choices)), key=lambda i: (-score[i], i))[:n]
