"""Watching a started request until its terminal event; taking it over when its engine is lost; resuming it.

``Supervisor.watch`` is state RUNNING of ``lifecycle.py``. Each quarter second it asks: has the terminal event come?
Is the owning engine gone (``ClusterView.is_gone``)? Has the stream been quiet for ``progress_s`` — then a probe asks
the engine what became of the request (a lost Final is found out this way, and so is a request an engine fenced
during an outage of our own)? Has the request outlived ``request_timeout_s``?

Taking over: the router first aborts the request on the engine (without a stream event; if the engine answers that
it had already ended the stream, nothing more is sent). Then, while the router has seen every token and the request
has resumes left, it RESUMEs: a new attempt of the request (``Request.next_attempt``) whose prompt is the prompt and
every token streamed so far goes to the live engine that caches the longest prefix of it (else the least loaded),
which streams on at the next index. Otherwise the router ends the stream with an Error.

``release`` is the clean-up after a strategy that failed: senders are stopped first, so that receivers can give
their pages back at once instead of holding them in quarantine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from busserve.bus.client import Bus
from busserve.errors import BusserveError
from busserve.messages import Error, Final, Usage
from busserve.router.cluster import ClusterView, Engine
from busserve.router.lifecycle import Flight, State
from busserve.router.request import Request

log = logging.getLogger(__name__)

WATCH_S = 0.25


@dataclass
class SupervisionConfig:
    progress_s: float = 30.0  # a stream quiet this long gets its engine probed
    request_timeout_s: float = 3600.0  # no request lives longer
    resume_limit: int = 2  # default per request (GenerateRequest.resume_limit overrides)


async def release(view: ClusterView, req: Request, reason: str, owner: str | None = None) -> bool:
    """Abort the request on every engine it touched: senders first, then the rest (receivers told whether every
    sender confirmed it stopped, so that they need not quarantine pages). ``owner``: the engine asked to end the
    stream itself (it is the one that accepted start_generate). True if some engine ended (or had ended) the stream."""
    ended = False
    stopped = True

    async def abort(eid: str, *, notify: bool, sender_stopped: bool) -> bool:
        nonlocal ended
        engine = view.get(eid)
        if engine is None:
            return False
        try:
            reply = await engine.abort(req, notify=notify, reason=reason[:200], sender_stopped=sender_stopped)
        except BusserveError:
            return False
        ended = ended or reply.notified or reply.terminated
        return True

    senders = sorted(req.senders)
    if senders:
        confirmed = await asyncio.gather(*(abort(e, notify=False, sender_stopped=False) for e in senders))
        stopped = all(confirmed)
    rest = sorted(req.touched - req.senders) or ([] if req.touched else [e.id for e in view.engines()])
    await asyncio.gather(*(abort(e, notify=e == owner, sender_stopped=stopped) for e in rest))
    return ended


def resume_target(view: ClusterView, req: Request, lost: set[str]) -> Engine | None:
    """Where a resumed request goes: the live engine caching most of its tokens, else the least loaded — one that
    is draining only if no other is left (it still serves within its grace period; a failure would be worse)."""
    engines = [e for e in view.engines(role="decode", model=req.model) if e.id not in lost]
    if not engines:
        engines = [e for e in view.engines(role="decode", model=req.model, draining=True) if e.id not in lost]
    if not engines:
        return None
    return max(engines, key=lambda e: (e.cached_prefix(req), -e.load, -e.decoding, e.id))


class Supervisor:
    def __init__(self, bus: Bus, view: ClusterView, config: SupervisionConfig, on_resume: object = None) -> None:
        self.bus = bus
        self.view = view
        self.config = config
        self.on_resume = on_resume  # telemetry hook: (flight, lost engine id)

    async def watch(self, flight: Flight, resume_limit: int) -> None:
        """Until the request's terminal event is out (seen from its engine, or published here)."""
        flight.state = State.RUNNING
        deadline = flight.started + self.config.request_timeout_s
        last_probe = time.monotonic()
        reconnects = self.bus.reconnects
        while not flight.terminal.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(flight.terminal.wait(), timeout=WATCH_S)
            if flight.terminal.is_set():
                return
            if flight.migrating:  # every step of a migration has its own timeout; its outcome decides
                continue
            engine_id = flight.req.started_on
            assert engine_id is not None
            now = time.monotonic()
            if now > deadline:
                await release(self.view, flight.req, "request deadline")
                await flight.end(self.bus, Error(code="timeout", message=f"the request outlived its "
                                                                          f"{self.config.request_timeout_s:g}s limit"))
                return
            lost = self.view.is_gone(engine_id)
            if not lost and (now - max(flight.last_event_at, last_probe) > self.config.progress_s
                             or self.bus.reconnects != reconnects):
                reconnects = self.bus.reconnects
                last_probe = now
                lost = await self._probe_says_lost(flight, engine_id)
            if lost and not flight.terminal.is_set():
                await self._take_over(flight, engine_id, resume_limit)

    async def _probe_says_lost(self, flight: Flight, engine_id: str) -> bool:
        engine = self.view.get(engine_id)
        if engine is None:
            return False
        try:
            reply = await engine.probe(flight.req)
        except BusserveError:
            return False  # unreachable: its heartbeats decide
        if reply.state == "ended":
            # Its terminal event went out and we missed it: the client may have it; nothing more is sent.
            await asyncio.sleep(WATCH_S)  # it may still be on its way to us
            flight.accept_engine_ended(reply.terminal)
            return False
        return reply.state in ("dropped", "unknown")

    async def _take_over(self, flight: Flight, lost: str, resume_limit: int) -> None:
        """The engine that owned the request is lost: make sure it will not publish, then resume or fail."""
        req = flight.req
        engine = self.view.get(lost)
        if engine is not None:
            with contextlib.suppress(BusserveError):
                reply = await engine.abort(req, reason="taken over by the router")
                if reply.terminated:
                    flight.accept_engine_ended(None)
                    return
        if flight.terminal.is_set():
            return
        log.warning("engine %s lost request %s after %d tokens", lost, req.label, len(flight.outputs))
        if flight.cancelled:
            await flight.end(self.bus, Final(request_id=req.label, finish_reason="cancelled"))
            return
        why = None
        if not flight.resumable:
            why = "this router missed some of its tokens, so it cannot resume it without a gap"
        elif flight.resumes >= resume_limit:
            why = f"it was resumed {flight.resumes} time(s) already (its resume_limit)"
        if why is not None:
            await flight.end(self.bus, Error(code="engine_failure",
                                             message=f"engine {lost} stopped while serving this request; {why}"))
            return
        await self.resume(flight, {lost})

    async def resume(self, flight: Flight, lost: set[str]) -> None:
        """Start the request again after the tokens streamed so far, on the best live engine (trying each)."""
        flight.state = State.RESUMING
        flight.resumes += 1
        if self.on_resume is not None:
            self.on_resume(flight, ",".join(sorted(lost)))  # type: ignore[operator]
        finished = _already_finished(flight)
        if finished is not None:
            await flight.end(self.bus, finished)
            return
        tried = set(lost)
        while not flight.terminal.is_set():
            attempt = flight.req.next_attempt(flight.outputs)
            target = resume_target(self.view, attempt, tried)
            if target is None:
                await flight.end(self.bus, Error(code="no_engine", message="no live engine left to resume this "
                                                 f"request on (lost: {', '.join(sorted(tried))})"))
                return
            tried.add(target.id)
            flight.req = attempt
            flight.attempts.append(attempt)
            try:
                await target.prep_recv(attempt, end=0)
                await target.start_generate(attempt, begin=0)
            except BusserveError as exc:
                log.warning("resuming %s on %s failed: %s", attempt.label, target.id, exc)
                await release(self.view, attempt, "resume failed")
                continue
            log.info("request %s resumed on %s at token %d", attempt.label, target.id, len(flight.outputs))
            flight.state = State.RUNNING
            return


def _already_finished(flight: Flight) -> Final | None:
    """A request whose engine was lost between its last token and its Final needs no new attempt."""
    req = flight.req
    n = len(flight.outputs)
    usage = Usage(prompt_tokens=req.prompt_len - req.output_offset, completion_tokens=n)
    if n >= req.sampling.max_tokens:
        return Final(request_id=req.label, finish_reason="length", usage=usage)
    if n and flight.outputs[-1] in req.sampling.stop_token_ids:
        return Final(request_id=req.label, finish_reason="stop", stop_reason=flight.outputs[-1], usage=usage)
    return None
