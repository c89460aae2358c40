"""Live migration, driven by the router: a running request moves to another engine while it keeps decoding.

The three actions, in order (the source's half is ``engine/migration.py``):

 1. **prep_recv** on the target, with ``migration``: a fresh attempt of the request whose prompt is the prompt plus
    the output tokens this router has seen, and an ``end`` that leaves room for the tokens the source decodes while
    the copy runs. The target matches its own cached prefix; only the rest is copied.
 2. **Migrate(start)** on the source with the target's ``kv_addr`` (the remote_send of a running request): rounds of
    copying while it decodes, then a short stop, the last round, and a reply with every token of the request —
    sent once its last events on the source are out, so the client's stream stays in order.
 3. **start_generate** on the target with ``begin`` = positions copied and ``extend`` = the tokens beyond the
    attempt's prompt: the target streams on at the next index. Then **Migrate(release)** drops it on the source.

Failures leave the request where it was: if step 3 fails, ``Migrate(resume)`` lets it decode on at the source; if
step 2 fails, the source has already resumed it — or it is lost, and supervision resumes it by recompute. In every
case the target's reservation is aborted. While a migration runs, supervision leaves the request alone
(``Flight.migrating``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

from busserve.errors import BusserveError
from busserve.messages import MigrateReply
from busserve.router.cluster import ClusterView, Engine
from busserve.router.lifecycle import Flight, State
from busserve.router.request import Request
from busserve.router.supervision import release
from busserve.telemetry import attributes as A
from busserve.telemetry.router_telemetry import sub_request_span

log = logging.getLogger(__name__)

# Room reserved on the target for tokens decoded during the copy (an 8k context over the bus copies in ~1 s).
HEADROOM_TOKENS = 256


@dataclass
class Moved:
    """What one migration did (also the ``migrate`` span's attributes)."""

    ok: bool
    source: str
    target: str = ""
    detail: str = ""
    rounds: int = 0
    bytes_sent: int = 0
    copy_s: float = 0.0
    pause_s: float = 0.0  # the request stopped on the source until the target accepted it


def can_migrate(flight: Flight) -> bool:
    return (flight.state is State.RUNNING and not flight.migrating and not flight.cancelled and flight.resumable
            and not flight.terminal.is_set() and flight.req.started_on is not None)


def pick_target(view: ClusterView, flight: Flight, avoid: set[str]) -> Engine | None:
    """The decode engine that caches most of the request, then the least loaded (draining ones never)."""
    engines = [e for e in view.engines(role="decode", model=flight.req.model) if e.id not in avoid]
    if not engines:
        return None
    return max(engines, key=lambda e: (e.cached_prefix(flight.req), -e.load, -e.decoding, e.id))


async def migrate(view: ClusterView, flight: Flight, target: Engine, *, reason: str,
                  final_tokens: int = 16) -> Moved:
    """Move ``flight`` from the engine running it to ``target`` (see the module docstring)."""
    req = flight.req
    assert req.started_on is not None
    source = view.get(req.started_on)
    if source is None or not can_migrate(flight):
        return Moved(False, req.started_on, target.id, "the request cannot migrate now")
    flight.migrating = True
    with sub_request_span("migrate", source.id, req.request_id, **{A.MIGRATION_TARGET: target.id,
                                                                   A.MIGRATION_REASON: reason}) as span:
        try:
            moved = await _migrate(view, flight, source, target, final_tokens)
        finally:
            flight.migrating = False
        span.set_attribute(A.KV_BYTES, moved.bytes_sent)
        span.set_attribute(A.MIGRATION_ROUNDS, moved.rounds)
        span.set_attribute(A.MIGRATION_PAUSE_S, moved.pause_s)
        if not moved.ok:
            span.set_attribute(A.MIGRATION_FAILED, moved.detail[:200])
    log.info("migration of %s %s -> %s (%s): %s", req.label, source.id, target.id, reason,
             f"{moved.rounds} rounds, {moved.bytes_sent} B, paused {moved.pause_s * 1e3:.1f} ms" if moved.ok
             else f"not done: {moved.detail}")
    return moved


async def _migrate(view: ClusterView, flight: Flight, source: Engine, target: Engine, final_tokens: int) -> Moved:
    req = flight.req
    attempt = req.next_attempt(flight.outputs)
    room = min(HEADROOM_TOKENS, max(1, req.sampling.max_tokens - len(flight.outputs)))
    end = min(attempt.prompt_len + room, target.status.max_model_len)
    try:
        reply = await target.prep_recv(attempt, end=end, sender=source, migration=True)
    except BusserveError as exc:
        await release(view, attempt, "migration: prep_recv failed")
        return Moved(False, source.id, target.id, f"prep_recv on {target.id}: {exc}")
    try:
        stopped = await source.migrate(req, "start", reply.kv_addr, final_tokens=final_tokens)
    except BusserveError as exc:
        # The source answered with an error (it decodes on: the request finished, or the copy failed) or is
        # lost (supervision resumes the request by recompute once the migration is out of its way).
        await release(view, attempt, "migration: the source did not stop the request")
        return Moved(False, source.id, target.id, f"migrate on {source.id}: {exc}")
    t_stopped = time.monotonic() - stopped.stopped_s
    extend = _extension(attempt.prompt_token_ids, stopped)
    if extend is None or flight.cancelled:
        why = "the client cancelled" if flight.cancelled else "the source's tokens do not extend this router's"
        await _resume_on_source(view, source, req, attempt, why)
        return Moved(False, source.id, target.id, why)
    try:
        await target.start_generate(attempt, begin=stopped.end, extend=extend)
    except BusserveError as exc:
        await _resume_on_source(view, source, req, attempt, f"start_generate on {target.id}: {exc}")
        return Moved(False, source.id, target.id, f"start_generate on {target.id}: {exc}")
    pause = time.monotonic() - t_stopped
    flight.req = attempt
    flight.attempts.append(attempt)
    view.load.release(req)
    view.load.first_token(attempt)  # it decodes on the target from its first step there
    with contextlib.suppress(BusserveError):
        await source.migrate(req, "release")
    return Moved(True, source.id, target.id, rounds=stopped.rounds, bytes_sent=stopped.bytes_sent,
                 copy_s=stopped.copy_s, pause_s=pause)


def _extension(prompt: list[int], stopped: MigrateReply) -> list[int] | None:
    """The tokens the source holds beyond the attempt's prompt (None if the prompt is not a prefix of them)."""
    tokens = stopped.token_ids
    if len(tokens) < len(prompt) or tokens[: len(prompt)] != prompt:
        return None
    return tokens[len(prompt):]


async def _resume_on_source(view: ClusterView, source: Engine, req: Request, attempt: Request, why: str) -> None:
    await release(view, attempt, f"migration called off: {why}"[:200])
    with contextlib.suppress(BusserveError):
        await source.migrate(req, "resume")
