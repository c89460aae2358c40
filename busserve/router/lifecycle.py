"""The life of a request in a router: one state machine, and the one place a router ends a stream.

A request has one owner at a time, and only its owner may publish its terminal event (Final or Error):

=========  ================  ==========================================  ==========================================
state      owner             timer                                       when the owner dies
=========  ================  ==========================================  ==========================================
ADMITTED   this router       none (tokenizing and checks, no waiting)    clients see the router's heartbeat stop
                                                                         (``router_failure``, bus/client.py)
ROUTING    this router       the strategy deadline; each action's        receives on engines lapse (lease_s, an
           (engines hold     timeout; parked leases, renewed every       Error on the stream from the engine);
           reserved pages)   lease_s/3; a sender is watched for life     clients see the router's heartbeat stop
RUNNING    the engine that   heartbeats (gone after MISSED_HEARTBEATS);  this router aborts it there (best effort)
           accepted          no event for ``progress_s``: a probe asks   and RESUMEs; engines that lost contact
           start_generate    the engine; the overall request deadline    have fenced themselves (engine/service.py)
RESUMING   this router       as ROUTING, one attempt per live engine     as ROUTING
FINISHED / —                 —                                           —
FAILED
=========  ================  ==========================================  ==========================================

The numbered life of one request:

 1. ``Flight`` is created on admission (state ADMITTED): the router sends a StreamStatus naming itself owner.
 2. The strategy runs (ROUTING): prep_recv / remote_send / start_generate on engines, under a fresh engine-side id
    (``Request.request_id``); the client's id (``label``) stays what events carry.
 3. start_generate is accepted (RUNNING): the engine sends its own StreamStatus and streams tokens; this router
    reads the same stream and keeps the tokens (``outputs``), checking that indices follow each other.
 4. The engine sends the terminal event → FINISHED (Final) or FAILED (Error). If it is lost instead, the request
    is RESUMING: the prompt plus ``outputs`` go to another engine as a new attempt, which streams on at the next
    index (at most ``resume_limit`` times; then an Error).
 5. Anything failing in 2 or 4 that no engine answered for ends here, in ``Flight.end``: an Error — or
    Final(cancelled) if, and only if, the client cancelled.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field

from busserve.bus.client import Bus
from busserve.messages import Error, Final, StreamEvent, StreamStatus, TokenChunk
from busserve.router.request import Request


class State(enum.Enum):
    ADMITTED = "admitted"
    ROUTING = "routing"
    RUNNING = "running"
    RESUMING = "resuming"
    FINISHED = "finished"
    FAILED = "failed"

    @property
    def ended(self) -> bool:
        return self in (State.FINISHED, State.FAILED)


@dataclass
class Flight:
    """One request in this router, from admission to its terminal event."""

    req: Request
    strategy: str
    state: State = State.ADMITTED
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    last_event_at: float = field(default_factory=time.monotonic)
    outputs: list[int] = field(default_factory=list)  # every output token seen on the stream, in order
    resumable: bool = True  # False once this router missed a token (it could not resume without a gap)
    resumes: int = 0
    attempts: list[Request] = field(default_factory=list)  # the engine-side attempts after the first (resumes)
    resume_limit: int = 2
    cancelled: bool = False
    migrating: bool = False  # a live migration is moving it (supervision waits: router/migration.py)
    terminal: asyncio.Event = field(default_factory=asyncio.Event)
    terminal_event: Final | Error | None = None
    last_token_at: float | None = None
    tokens: int = 0

    @property
    def owner(self) -> str:
        return self.req.started_on if self.state is State.RUNNING and self.req.started_on else self.req.supervisor

    def on_event(self, event: StreamEvent) -> int:
        """Record an event read from the stream; returns the number of new tokens."""
        self.last_event_at = time.monotonic()
        if isinstance(event, TokenChunk):
            if event.index != len(self.outputs):
                self.resumable = False
            self.outputs.extend(event.token_ids)
            self.tokens += len(event.token_ids)
            self.last_token_at = self.last_event_at
            if self.first_token_at is None:
                self.first_token_at = self.last_event_at
            return len(event.token_ids)
        if isinstance(event, (Final, Error)) and not self.terminal.is_set():
            self._ended(event)
        return 0

    def _ended(self, event: Final | Error) -> None:
        self.terminal_event = event
        self.state = State.FINISHED if isinstance(event, Final) else State.FAILED
        self.terminal.set()

    def accept_engine_ended(self, terminal: str | None) -> None:
        """An engine says it published the terminal event (an abort's ``terminated``, a probe's ``ended``) though
        this router has not seen it: record the request as over without publishing anything."""
        if not self.terminal.is_set():
            kind: Final | Error
            if terminal == "error":
                kind = Error(code="engine_failure", message="ended on the engine", request_id=self.req.label)
            else:
                kind = Final(request_id=self.req.label, finish_reason="stop")
            self._ended(kind)

    async def end(self, bus: Bus, event: Final | Error) -> None:
        """The one place this router ends a stream: only if nobody has, and only while the router owns it."""
        if self.terminal.is_set():
            return
        event.request_id = self.req.label
        self._ended(event)
        await bus.publish(self.req.stream_subject, event, content_type=self.req.content_type, trace=False)

    async def announce(self, bus: Bus, router_id: str, heartbeat_s: float) -> None:
        """Step 1: tell the client this router holds the request (so it can tell a dead router from a slow one)."""
        await bus.publish(self.req.stream_subject, StreamStatus(request_id=self.req.label, owner=router_id,
                                                                owner_kind="router", heartbeat_s=heartbeat_s),
                          content_type=self.req.content_type, trace=False)

    def outcome(self) -> str:
        return "ok" if self.state is State.FINISHED else "error"

