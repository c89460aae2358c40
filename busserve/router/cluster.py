"""The cluster as strategies see it: live engines with their load and cached prefixes, and a handle per engine
whose methods are the three microserving actions (plus abort).

The view is fed by engine heartbeats (EngineStatus) and KV events (chained page hashes); an engine that misses
three heartbeats drops out. ``Engine.prep_recv`` picks the KV transport for the pair: ``shm`` when sender and
receiver share a host and both offer it, otherwise ``bus``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from busserve.bus.client import Bus
from busserve.errors import BusserveError
from busserve.kv.page_hash import prefix_page_hashes
from busserve.messages import (
    Abort,
    AbortReply,
    EngineStatus,
    KVAddress,
    KVCleared,
    KVEventBatch,
    KVRemoved,
    KVSnapshotRequest,
    KVStored,
    PrepRecv,
    PrepRecvReply,
    RemoteSend,
    RemoteSendReply,
    Role,
    StartGenerate,
    StartGenerateReply,
    Transport,
)
from busserve.router.request import Request
from busserve.telemetry import attributes as A
from busserve.telemetry.router_telemetry import sub_request_span

log = logging.getLogger(__name__)

MISSED_HEARTBEATS = 3


@dataclass
class Timeouts:
    prep_recv_s: float = 10.0
    remote_send_s: float = 600.0  # a whole prefill on a CPU
    start_generate_s: float = 10.0
    abort_s: float = 5.0
    lease_s: float = 60.0  # how long a receiver keeps a parked request; longer than any remote_send


@dataclass
class EngineState:
    status: EngineStatus
    last_seen: float
    cached: set[int] = field(default_factory=set)  # page hashes in the engine's prefix cache
    kv_seq: int = 0  # the last KV-event batch reflected in ``cached``
    snapshot_pending: bool = False
    held_back: list[KVEventBatch] = field(default_factory=list)  # batches that arrived during a snapshot


class Engine:
    """One engine, as a strategy uses it. Attributes mirror its last heartbeat."""

    def __init__(self, bus: Bus, state: EngineState, timeouts: Timeouts, load: LoadTracker) -> None:
        self._bus = bus
        self._state = state
        self._t = timeouts
        self._load = load
        self.status = state.status
        self.id = state.status.engine_id

    @property
    def in_flight(self) -> int:
        """Requests this router has put here and not yet seen finish (ahead of what heartbeats show)."""
        return self._load.get(self.id)

    # -------------------------------------------------------------- what a strategy weighs

    @property
    def roles(self) -> list[Role]:
        return list(self.status.roles)

    @property
    def host(self) -> str:
        return self.status.host

    @property
    def load(self) -> float:
        """Requests queued or running here (the heartbeat's view, or this router's if more recent)."""
        return max(self.status.running + self.status.waiting + self.status.parked, self.in_flight)

    @property
    def prefill_backlog(self) -> int:
        """Prompt tokens this engine still has to prefill (its heartbeat's count or this router's, the larger)."""
        return max(self.status.pending_prefill_tokens, self._load.prefill(self.id))

    @property
    def decoding(self) -> int:
        return max(self.status.decoding, self._load.decoding(self.id))

    @property
    def free_kv_fraction(self) -> float:
        total = self.status.total_pages or 1
        return (self.status.free_pages + self.status.cached_pages) / total

    def cached_prefix(self, req: Request) -> int:
        """Tokens of the request's prompt this engine holds in its prefix cache (per its KV events)."""
        ps = self.status.page_size
        n = 0
        for h in prefix_page_hashes(req.prompt_token_ids, ps):
            if h not in self._state.cached:
                break
            n += ps
        return n

    def __repr__(self) -> str:
        return f"Engine({self.id}, roles={self.roles}, load={self.load})"

    # -------------------------------------------------------------- the actions

    def _subject(self, action: str) -> str:
        return self._bus.subjects.engine_action(self.id, action)  # type: ignore[arg-type]

    def transport_from(self, sender: Engine | None) -> Transport:
        mine = set(self.status.transports)
        if sender is not None and sender.host == self.host and "shm" in mine & set(sender.status.transports):
            return "shm"
        return "bus" if "bus" in mine else next(iter(self.status.transports))  # type: ignore[return-value]

    async def prep_recv(self, req: Request, end: int, *, sender: Engine | None = None,
                        transport: Transport | None = None) -> PrepRecvReply:
        """Reserve KV for ``prompt[:end]`` here (matching our cached prefix) and park the request."""
        req.touched.add(self.id)
        self._load.assign(req, self.id)
        msg = PrepRecv(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, end=end,
                       stream_subject=req.stream_subject, sampling=req.sampling, stream=req.stream, model=req.model,
                       lease_s=self._t.lease_s, transport=transport or self.transport_from(sender))
        with sub_request_span("prep_recv", self.id, req.request_id, **{A.RANGE_END: end}) as span:
            reply = await self._bus.request(self._subject("prep_recv"), msg, PrepRecvReply,
                                            timeout_s=self._t.prep_recv_s)
            span.set_attribute(A.MATCHED, reply.matched)
            return reply

    async def remote_send(self, req: Request, kv_addr: KVAddress, begin: int, end: int) -> RemoteSendReply:
        """Compute (or take from our cache) the KV of ``prompt[:end]`` and write ``[begin, end)`` to ``kv_addr``."""
        req.touched.add(self.id)
        msg = RemoteSend(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids[:end], kv_addr=kv_addr,
                         begin=begin, end=end, model=req.model)
        self._load.add(self.id, 1)  # busy while it prefills for someone else
        self._load.charge_prefill(req, self.id, max(0, end - self.cached_prefix(req)))
        try:
            with sub_request_span("remote_send", self.id, req.request_id, **{
                A.RANGE_BEGIN: begin, A.RANGE_END: end, A.KV_BACKEND: kv_addr.transport}) as span:
                reply = await self._bus.request(self._subject("remote_send"), msg, RemoteSendReply,
                                                timeout_s=self._t.remote_send_s)
                span.set_attribute(A.KV_BYTES, reply.bytes_sent)
                return reply
        finally:
            self._load.add(self.id, -1)
            self._load.prefill_done(req, self.id)

    async def start_generate(self, req: Request, begin: int, prefill_chunk: int = 0) -> StartGenerateReply:
        """Prefill ``prompt[begin:]`` here on top of the received KV, then decode to the request's stream;
        ``prefill_chunk`` > 0: at most that many prompt tokens per step while others decode here."""
        req.touched.add(self.id)
        self._load.assign(req, self.id)
        self._load.charge_prefill(req, self.id, max(0, req.prompt_len - max(begin, self.cached_prefix(req))))
        req.start_pending = self.id
        with sub_request_span("start_generate", self.id, req.request_id, **{A.RANGE_BEGIN: begin}):
            msg = StartGenerate(request_id=req.request_id, begin=begin, prefill_chunk=prefill_chunk)
            reply = await self._bus.request(self._subject("start_generate"), msg, StartGenerateReply,
                                            timeout_s=self._t.start_generate_s)
        req.started_on, req.start_pending = self.id, None
        return reply

    async def abort(self, req: Request, *, notify: bool = False, reason: str = "") -> AbortReply:
        return await self._bus.request(self._subject("abort"), Abort(request_id=req.request_id, notify=notify,
                                                                    reason=reason), AbortReply,
                                       timeout_s=self._t.abort_s)


class LoadTracker:
    """What this router has put on each engine and not yet seen done — heartbeats lag by up to a second, and without
    this a burst of requests would all pick the same "idle" engine. Three counts per engine: requests, prompt tokens
    still to prefill (until the request's first token, or the end of a remote_send), and requests decoding."""

    def __init__(self) -> None:
        self._n: dict[str, int] = {}
        self._prefill: dict[str, int] = {}
        self._decoding: dict[str, int] = {}

    def get(self, engine_id: str) -> int:
        return self._n.get(engine_id, 0)

    def prefill(self, engine_id: str) -> int:
        return self._prefill.get(engine_id, 0)

    def decoding(self, engine_id: str) -> int:
        return self._decoding.get(engine_id, 0)

    @staticmethod
    def _bump(book: dict[str, int], engine_id: str, delta: int) -> None:
        book[engine_id] = max(0, book.get(engine_id, 0) + delta)

    def add(self, engine_id: str, delta: int) -> None:
        self._bump(self._n, engine_id, delta)

    def assign(self, req: Request, engine_id: str) -> None:
        if engine_id not in req.assigned:
            req.assigned.add(engine_id)
            self.add(engine_id, 1)

    def charge_prefill(self, req: Request, engine_id: str, tokens: int) -> None:
        self._bump(self._prefill, engine_id, tokens)
        req.prefill_charge[engine_id] = req.prefill_charge.get(engine_id, 0) + tokens

    def prefill_done(self, req: Request, engine_id: str) -> None:
        self._bump(self._prefill, engine_id, -req.prefill_charge.pop(engine_id, 0))

    def first_token(self, req: Request) -> None:
        """The request's prefill is over and it decodes on the engine that started it."""
        if req.started_on is not None:
            self.prefill_done(req, req.started_on)
            if req.decoding_on is None:
                req.decoding_on = req.started_on
                self._bump(self._decoding, req.started_on, 1)

    def release(self, req: Request) -> None:
        for engine_id in req.assigned:
            self.add(engine_id, -1)
        req.assigned.clear()
        for engine_id in list(req.prefill_charge):
            self.prefill_done(req, engine_id)
        if req.decoding_on is not None:
            self._bump(self._decoding, req.decoding_on, -1)
            req.decoding_on = None


class ClusterView:
    """Live engines, from heartbeats and KV events, plus this router's own assignments."""

    def __init__(self, bus: Bus, timeouts: Timeouts | None = None) -> None:
        self.bus = bus
        self.timeouts = timeouts or Timeouts()
        self._engines: dict[str, EngineState] = {}
        self.load = LoadTracker()
        self._tasks: set[asyncio.Task[None]] = set()

    def on_status(self, st: EngineStatus) -> None:
        now = time.monotonic()
        state = self._engines.get(st.engine_id)
        if state is None:
            state = self._engines[st.engine_id] = EngineState(status=st, last_seen=now)
            self._request_snapshot(state)
            return
        if st.pid == state.status.pid and st.seq < state.status.seq:
            return  # a late heartbeat, overtaken by a newer one
        restarted = st.pid != state.status.pid
        state.status = st
        state.last_seen = now
        if restarted:  # a restarted engine starts with an empty cache and a new event sequence
            state.cached.clear()
            state.kv_seq = 0
            self._request_snapshot(state)

    def on_kv_events(self, batch: KVEventBatch) -> None:
        state = self._engines.get(batch.engine_id)
        if state is None:
            return
        if state.snapshot_pending:
            state.held_back.append(batch)
            return
        if batch.seq <= state.kv_seq:
            return  # already reflected by a snapshot
        if batch.seq != state.kv_seq + 1:
            state.held_back.append(batch)
            self._request_snapshot(state)  # we missed some: start over from a snapshot
            return
        self._apply(state, batch)

    @staticmethod
    def _apply(state: EngineState, batch: KVEventBatch) -> None:
        for ev in batch.events:
            if isinstance(ev, KVStored):
                state.cached.update(ev.page_hashes)
            elif isinstance(ev, KVRemoved):
                state.cached.difference_update(ev.page_hashes)
            elif isinstance(ev, KVCleared):
                state.cached.clear()
        state.kv_seq = batch.seq

    def _request_snapshot(self, state: EngineState) -> None:
        if state.snapshot_pending:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (unit tests feeding the view by hand): events alone must do
        state.snapshot_pending = True
        task = loop.create_task(self._fetch_snapshot(state))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fetch_snapshot(self, state: EngineState) -> None:
        eid = state.status.engine_id
        try:
            snap = await self.bus.request(self.bus.subjects.engine_action(eid, "kv_snapshot"), KVSnapshotRequest(),
                                          KVEventBatch, timeout_s=5.0)
        except BusserveError as exc:
            log.debug("no KV snapshot from %s: %s", eid, exc)
            snap = None
        state.snapshot_pending = False
        if snap is not None:
            state.cached.clear()
            self._apply(state, snap)
        held, state.held_back = sorted(state.held_back, key=lambda b: b.seq), []
        for batch in held:
            if batch.seq == state.kv_seq + 1:
                self._apply(state, batch)

    def alive(self, state: EngineState, now: float) -> bool:
        return now - state.last_seen <= MISSED_HEARTBEATS * max(state.status.interval_s, 0.1)

    def engines(self, *, role: Role | None = None, model: str = "") -> list[Engine]:
        now = time.monotonic()
        out = []
        for state in list(self._engines.values()):
            if not self.alive(state, now) or state.status.draining:
                continue
            if role is not None and role not in state.status.roles:
                continue
            if model and state.status.model != model:
                continue
            out.append(Engine(self.bus, state, self.timeouts, self.load))
        return sorted(out, key=lambda e: e.id)

    def get(self, engine_id: str) -> Engine | None:
        state = self._engines.get(engine_id)
        if state is None:
            return None
        return Engine(self.bus, state, self.timeouts, self.load)

    def is_alive(self, engine_id: str) -> bool:
        state = self._engines.get(engine_id)
        return state is not None and self.alive(state, time.monotonic())

    def models(self) -> set[str]:
        now = time.monotonic()
        return {s.status.model for s in self._engines.values() if self.alive(s, now)}

    def forget_dead(self) -> list[str]:
        now = time.monotonic()
        dead = [eid for eid, s in self._engines.items() if now - s.last_seen > 10 * MISSED_HEARTBEATS]
        for eid in dead:
            del self._engines[eid]
        return dead


def least_loaded(engines: Iterable[Engine], exclude: Iterable[Engine] = ()) -> Engine | None:
    """The engine with the fewest requests (ties: most free KV, then id)."""
    skip = {e.id for e in exclude}
    pool = [e for e in engines if e.id not in skip]
    if not pool:
        return None
    return min(pool, key=lambda e: (e.load, -e.free_kv_fraction, e.id))
