"""The cluster as strategies see it: live engines with their load and cached prefixes, and a handle per engine
whose methods are the three microserving actions (plus abort).

The view is fed by engine heartbeats (EngineStatus) and KV events (chained page hashes); an engine that misses
``MISSED_HEARTBEATS`` heartbeats drops out, and is *gone* — its requests are the router's to take over — once that
silence spans a stretch this router was itself connected for, or at once when its last heartbeat said ``stopped``
(engines fence themselves sooner: ``engine/service.py``). ``Engine.prep_recv`` picks the KV transport for the pair:
``shm`` when sender and receiver see the same /dev/shm (their shm domains, ``busserve.kv.locality``; host names
prove nothing) and both offer it, otherwise ``bus`` — and a sender that cannot map the segment falls back to the bus.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from busserve.bus.client import MISSED_HEARTBEATS, Bus
from busserve.errors import BusserveError, RequestTimeout
from busserve.messages import (
    Abort,
    AbortReply,
    Drain,
    EngineStatus,
    ErrorCode,
    KVAddress,
    KVCleared,
    KVEventBatch,
    KVRemoved,
    KVSnapshotRequest,
    KVStored,
    Migrate,
    MigrateReply,
    PrepRecv,
    PrepRecvReply,
    Probe,
    ProbeReply,
    RemoteSend,
    RemoteSendReply,
    Renew,
    RenewReply,
    Role,
    StartGenerate,
    StartGenerateReply,
    Transport,
)
from busserve.router.request import Request
from busserve.telemetry import attributes as A
from busserve.telemetry.router_telemetry import sub_request_span

T = TypeVar("T")
MigratePhase = Literal["start", "release", "resume"]
log = logging.getLogger(__name__)

SENDER_WATCH_S = 0.25  # how often a remote_send in progress checks that its sender is still there


class EngineLost(BusserveError):
    """The engine an action waits on is gone (silent past the heartbeat limit, or stopped)."""

    code: ErrorCode = "engine_failure"


@dataclass
class Timeouts:
    prep_recv_s: float = 10.0
    remote_send_s: float = 600.0  # a whole prefill on a CPU, queue included (a lost sender is noticed sooner)
    start_generate_s: float = 10.0
    abort_s: float = 2.0
    probe_s: float = 2.0
    migrate_s: float = 120.0  # copying a running request's KV (an 8k context over the bus takes seconds)
    # A parked receive's lease, renewed every lease_s / 3 while the strategy works on the request: a router that
    # dies leaves it to lapse (an Error on the stream) within lease_s.
    lease_s: float = 15.0


@dataclass
class EngineState:
    status: EngineStatus
    last_seen: float
    cached: set[int] = field(default_factory=set)  # page hashes in the engine's prefix cache
    kv_seq: int = 0  # the last KV-event batch reflected in ``cached``
    snapshot_pending: bool = False
    held_back: list[KVEventBatch] = field(default_factory=list)  # batches that arrived during a snapshot


SMALL_GROUP = 16  # engines weighed one by one; a larger group is searched in load order


class PrefixIndex:
    """Which engines hold which cached pages: page hash → engine ids, kept from KV events (each engine's own set
    stays in its EngineState, for removals and snapshots).

    What a request costs the router is then independent of the cluster's size: its page hashes are computed once
    (``Request.page_hashes``), and one walk down them, intersecting the holders of each page, gives every engine's
    cached prefix at once — engines holding none of it cost nothing. The walk is kept per request until the next KV
    event changes the index, so a strategy weighing N engines walks once, not N times.
    """

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._page_size: dict[str, int] = {}
        self.version = 0

    @classmethod
    def of(cls, state: EngineState) -> PrefixIndex:
        """An index of one engine (an Engine handle made outside a ClusterView)."""
        index = cls()
        index.add(state.status.engine_id, state.status.page_size, state.cached)
        return index

    def add(self, engine_id: str, page_size: int, hashes: Iterable[int]) -> None:
        self._page_size[engine_id] = page_size
        for h in hashes:
            self._holders.setdefault(h, set()).add(engine_id)
        self.version += 1

    def remove(self, engine_id: str, hashes: Iterable[int]) -> None:
        for h in hashes:
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(engine_id)
                if not holders:
                    del self._holders[h]
        self.version += 1

    def matches(self, req: Request) -> dict[str, int]:
        """Engine id → prompt tokens of ``req`` it holds cached (engines with none are left out)."""
        memo = req.prefix_memo
        if memo is not None and memo[0] is self and memo[1] == self.version:
            return memo[2]
        out = {e: tokens for tokens, engines in self.groups(req) for e in engines}
        req.prefix_memo = (self, self.version, out)
        return out

    def groups(self, req: Request) -> list[tuple[int, set[str]]]:
        """The engines holding part of ``req``'s prompt, grouped by how many of its tokens they hold — the walk
        itself in set operations, so a prefix every engine shares costs a few set differences, not a step per
        engine."""
        memo = req.groups_memo
        if memo is not None and memo[0] is self and memo[1] == self.version:
            return memo[2]
        out: list[tuple[int, set[str]]] = []
        sizes = set(self._page_size.values())
        for ps in sizes:
            alive: set[str] = set()
            matched = 0
            for i, h in enumerate(req.page_hashes(ps)):
                holders = self._holders.get(h)
                if not holders:
                    break
                if i == 0:
                    alive = set(holders) if len(sizes) == 1 else {e for e in holders if self._page_size.get(e) == ps}
                else:
                    dropped = alive - holders  # they matched i pages
                    if dropped:
                        out.append((matched, dropped))
                        alive -= dropped
                if not alive:
                    break
                matched = (i + 1) * ps
            if alive:
                out.append((matched, alive))
        req.groups_memo = (self, self.version, out)
        return out


class Engine:
    """One engine, as a strategy uses it. Attributes mirror its last heartbeat."""

    def __init__(self, bus: Bus, state: EngineState, timeouts: Timeouts, load: LoadTracker,
                 gone: Callable[[str], bool] | None = None, index: PrefixIndex | None = None) -> None:
        self._bus = bus
        self._state = state
        self._index = index or PrefixIndex.of(state)
        self._t = timeouts
        self._load = load
        self._gone = gone or (lambda _eid: False)
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
    def prefill_tokens_per_s(self) -> float:
        """The prefill rate the engine measures of itself (``busserve.engine.step_rates``); 0 until measured."""
        return self.status.prefill_tokens_per_s

    @property
    def decode_step_s(self) -> float:
        return self.status.decode_step_s

    @property
    def prefill_share(self) -> float:
        return self.status.prefill_share

    @property
    def free_kv_fraction(self) -> float:
        total = self.status.total_pages or 1
        return (self.status.free_pages + self.status.cached_pages) / total

    def cached_prefix(self, req: Request) -> int:
        """Prompt tokens whose KV this engine holds in its prefix cache (whole pages, from its KV events)."""
        return self._index.matches(req).get(self.id, 0)


    def __repr__(self) -> str:
        return f"Engine({self.id}, roles={self.roles}, load={self.load})"

    # -------------------------------------------------------------- the actions

    def _subject(self, action: str) -> str:
        return self._bus.subjects.engine_action(self.id, action)  # type: ignore[arg-type]

    def shares_memory_with(self, other: Engine) -> bool:
        """Whether ``other`` can map our shm segments: the same shm domain (busserve.kv.locality); the same host
        name only for engines that report no domain."""
        mine, theirs = self.status.shm_domain, other.status.shm_domain
        if mine or theirs:
            return mine == theirs
        return other.host == self.host

    def transport_from(self, sender: Engine | None) -> Transport:
        mine = set(self.status.transports)
        theirs = set(sender.status.transports) if sender is not None else set()
        if sender is not None and self.shares_memory_with(sender) and "shm" in mine & theirs:
            return "shm"
        if sender is not None and self.shares_memory_with(sender) and "cuda_ipc" in mine & theirs:
            return "cuda_ipc"  # GPU pools on one host: device to device
        if "mooncake" in mine & theirs:  # one-sided writes between hosts, where both engines run it
            return "mooncake"
        return "bus" if "bus" in mine else next(iter(self.status.transports))  # type: ignore[return-value]

    async def prep_recv(self, req: Request, end: int, *, sender: Engine | None = None,
                        transport: Transport | None = None, migration: bool = False) -> PrepRecvReply:
        """Reserve KV for ``prompt[:end]`` here (matching our cached prefix) and park the request. ``migration``:
        a running request moves here; ``end`` may exceed the prompt (room for what it decodes meanwhile)."""
        chosen = transport or self.transport_from(sender)
        # Built before any bookkeeping: a message that fails its own checks (InvalidField) changes no load.
        msg = PrepRecv(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids, end=end,
                       stream_subject=req.stream_subject, sampling=req.sampling, stream=req.stream, model=req.model,
                       lease_s=self._t.lease_s, transport=chosen, label=req.label, output_offset=req.output_offset,
                       write_window_s=self._t.remote_send_s + 60.0, supervisor=req.supervisor,
                       sender_pid=sender.status.pid if sender is not None and chosen == "shm" else 0,
                       migration=migration)
        req.touched.add(self.id)
        self._load.assign(req, self.id)
        with sub_request_span("prep_recv", self.id, req.request_id, **{A.RANGE_END: end}) as span:
            reply = await self._bus.request(self._subject("prep_recv"), msg, PrepRecvReply,
                                            timeout_s=self._t.prep_recv_s)
            req.parked_on.add(self.id)
            span.set_attribute(A.MATCHED, reply.matched)
            return reply

    async def remote_send(self, req: Request, kv_addr: KVAddress, begin: int, end: int) -> RemoteSendReply:
        """Compute (or take from our cache) the KV of ``prompt[:end]`` and write ``[begin, end)`` to ``kv_addr``."""
        req.touched.add(self.id)
        req.senders.add(self.id)
        msg = RemoteSend(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids[:end], kv_addr=kv_addr,
                         begin=begin, end=end, model=req.model)
        self._load.add(self.id, 1)  # busy while it prefills for someone else
        self._load.charge_prefill(req, self.id, max(0, end - self.cached_prefix(req)))
        try:
            with sub_request_span("remote_send", self.id, req.request_id, **{
                A.RANGE_BEGIN: begin, A.RANGE_END: end, A.KV_BACKEND: kv_addr.transport}) as span:
                reply = await self._while_present(self._bus.request(
                    self._subject("remote_send"), msg, RemoteSendReply, timeout_s=self._t.remote_send_s))
                span.set_attribute(A.KV_BYTES, reply.bytes_sent)
                return reply
        finally:
            self._load.add(self.id, -1)
            self._load.prefill_done(req, self.id)

    async def start_generate(self, req: Request, begin: int, prefill_chunk: int = 0,
                             extend: list[int] | None = None) -> StartGenerateReply:
        """Prefill ``prompt[begin:]`` here on top of the received KV, then decode to the request's stream;
        ``prefill_chunk`` > 0: at most that many prompt tokens per step while others decode here. ``extend``
        (a migration): tokens the request decoded on its source after prep_recv; they join its prompt."""
        req.touched.add(self.id)
        self._load.assign(req, self.id)
        self._load.charge_prefill(req, self.id, max(0, req.prompt_len - max(begin, self.cached_prefix(req))))
        req.start_pending = self.id
        with sub_request_span("start_generate", self.id, req.request_id, **{A.RANGE_BEGIN: begin}):
            msg = StartGenerate(request_id=req.request_id, begin=begin, prefill_chunk=prefill_chunk,
                                extend=list(extend or []))
            try:
                reply = await self._bus.request(self._subject("start_generate"), msg, StartGenerateReply,
                                                timeout_s=self._t.start_generate_s)
            except RequestTimeout:
                # Lost in one direction or the other: the engine says whether it took the request.
                state = (await self.probe(req)).state
                if state not in ("waiting", "running"):
                    raise
                reply = StartGenerateReply(request_id=req.request_id, engine_id=self.id)
        req.started_on, req.start_pending = self.id, None
        req.parked_on.discard(self.id)
        return reply

    async def abort(self, req: Request, *, notify: bool = False, reason: str = "",
                    sender_stopped: bool = False) -> AbortReply:
        msg = Abort(request_id=req.request_id, notify=notify, reason=reason, sender_stopped=sender_stopped)
        return await self._bus.request(self._subject("abort"), msg, AbortReply, timeout_s=self._t.abort_s)

    async def renew(self, req: Request) -> RenewReply:
        return await self._bus.request(self._subject("renew"), Renew(request_id=req.request_id,
                                                                    lease_s=self._t.lease_s), RenewReply,
                                       timeout_s=self._t.probe_s)

    async def migrate(self, req: Request, phase: MigratePhase, kv_addr: KVAddress | None = None, *,
                      final_tokens: int = 16) -> MigrateReply:
        """Live migration, on the request's source engine (see ``router/migration.py``)."""
        msg = Migrate(request_id=req.request_id, phase=phase, kv_addr=kv_addr, final_tokens=final_tokens)
        timeout = self._t.migrate_s if phase == "start" else self._t.start_generate_s
        with sub_request_span(f"migrate {phase}", self.id, req.request_id):
            return await self._while_present(self._bus.request(self._subject("migrate"), msg, MigrateReply,
                                                               timeout_s=timeout))

    async def drain(self, grace_s: float = 60.0) -> EngineStatus:
        return await self._bus.request(self._subject("drain"), Drain(grace_s=grace_s), EngineStatus,
                                       timeout_s=self._t.probe_s)

    async def probe(self, req: Request) -> ProbeReply:
        return await self._bus.request(self._subject("probe"), Probe(request_id=req.request_id), ProbeReply,
                                       timeout_s=self._t.probe_s)

    async def _while_present(self, call: Awaitable[T]) -> T:
        """Await ``call`` unless this engine is gone first (then EngineLost): a dead sender is noticed from its
        heartbeats within seconds, not at the end of a long timeout."""
        task = asyncio.ensure_future(call)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=SENDER_WATCH_S)
                if done:
                    return task.result()
                if self._gone(self.id):
                    raise EngineLost(f"engine {self.id} stopped answering (no heartbeat) during the action")
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


class LoadTracker:
    """What this router has put on each engine and not yet seen done — heartbeats lag by up to a second, and without
    this a burst of requests would all pick the same "idle" engine. Three counts per engine: requests, prompt tokens
    still to prefill (until the request's first token, or the end of a remote_send), and requests decoding."""

    def __init__(self) -> None:
        self._n: dict[str, int] = {}
        self._prefill: dict[str, int] = {}
        self._decoding: dict[str, int] = {}
        self.on_change: Callable[[str], None] | None = None  # an engine's request count moved (the view reorders)

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
        if self.on_change is not None:
            self.on_change(engine_id)

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
        self.index = PrefixIndex()
        self._tasks: set[asyncio.Task[None]] = set()
        self._peers: dict[str, tuple[float, float]] = {}  # other routers: id → (last heartbeat, its interval)
        # Every engine as (load, id), kept in order as heartbeats and this router's assignments move them: the
        # lightest engine of a group is found without weighing the group (``cheapest_candidates``).
        self._by_load: list[tuple[int, str]] = []
        self._load_key: dict[str, tuple[int, str]] = {}
        self.load.on_change = self._reorder

    def on_status(self, st: EngineStatus) -> None:
        now = time.monotonic()
        state = self._engines.get(st.engine_id)
        if state is None:
            state = self._engines[st.engine_id] = EngineState(status=st, last_seen=now)
            self._reorder(st.engine_id)
            self._request_snapshot(state)
            return
        if st.pid == state.status.pid and st.seq < state.status.seq:
            return  # a late heartbeat, overtaken by a newer one
        restarted = st.pid != state.status.pid
        state.status = st
        state.last_seen = now
        self._reorder(st.engine_id)
        if restarted:  # a restarted engine starts with an empty cache and a new event sequence
            self._clear(state)
            state.kv_seq = 0
            self._request_snapshot(state)

    def _reorder(self, engine_id: str) -> None:
        state = self._engines.get(engine_id)
        if state is None:
            return
        st = state.status
        key = (max(st.running + st.waiting + st.parked, self.load.get(engine_id)), engine_id)
        old = self._load_key.get(engine_id)
        if old == key:
            return
        if old is not None:
            del self._by_load[bisect.bisect_left(self._by_load, old)]
        bisect.insort(self._by_load, key)
        self._load_key[engine_id] = key

    def cheapest_candidates(self, req: Request, *, role: Role | None = None, model: str = ""
                            ) -> list[tuple[Engine, int]]:
        """``(engine, cached prompt tokens)`` for every engine that can be the cheapest place for ``req`` under a
        cost that grows with the tokens left to compute and with load (ties: the lower id): per group of engines
        holding the same number of its tokens, and among those holding none, only the least loaded can be. Small
        groups are weighed whole, large ones by walking the engines in load order — so the work does not grow with
        the cluster."""
        now = time.monotonic()
        out: list[tuple[Engine, int]] = []

        def fits(eid: str) -> EngineState | None:
            state = self._engines.get(eid)
            return state if state is not None and self._takes_work(state, now, role, model) else None

        groups = self.index.groups(req)
        holding: set[str] = set().union(*(ids for _, ids in groups)) if groups else set()
        others = [(0, set(self._engines) - holding)]
        for tokens, ids in [*groups, *others]:
            if len(ids) <= SMALL_GROUP:
                out += [(self._handle(st), tokens) for eid in sorted(ids) if (st := fits(eid)) is not None]
                continue
            for _, eid in self._by_load:  # the first that fits is the group's cheapest
                if eid in ids and (st := fits(eid)) is not None:
                    out.append((self._handle(st), tokens))
                    break
        return out

    def _takes_work(self, state: EngineState, now: float, role: Role | None, model: str,
                    draining: bool = False) -> bool:
        """Alive, not draining (unless ``draining``), with ``role`` and serving ``model`` where they are given."""
        st = state.status
        return (self.alive(state, now) and (draining or not st.draining) and (role is None or role in st.roles)
                and (not model or st.model == model))

    def _handle(self, state: EngineState) -> Engine:
        return Engine(self.bus, state, self.timeouts, self.load, self.is_gone, self.index)

    def on_router(self, router_id: str, interval_s: float) -> None:
        """Another router's heartbeat (routers placing requests on the same engines)."""
        self._peers[router_id] = (time.monotonic(), interval_s)

    def routers(self) -> int:
        """Routers placing requests on these engines now: this one and the others heard from lately."""
        now = time.monotonic()
        for rid, (seen, interval) in list(self._peers.items()):
            if now - seen > MISSED_HEARTBEATS * max(interval, 0.1):
                del self._peers[rid]
        return 1 + len(self._peers)

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

    def _apply(self, state: EngineState, batch: KVEventBatch) -> None:
        eid, ps = state.status.engine_id, state.status.page_size
        for ev in batch.events:
            if isinstance(ev, KVStored):
                new = [h for h in ev.page_hashes if h not in state.cached]
                state.cached.update(new)
                self.index.add(eid, ps, new)
            elif isinstance(ev, KVRemoved):
                gone = [h for h in ev.page_hashes if h in state.cached]
                state.cached.difference_update(gone)
                self.index.remove(eid, gone)
            elif isinstance(ev, KVCleared):
                self._clear(state)
        state.kv_seq = batch.seq
        if state.status.total_pages and len(state.cached) > state.status.total_pages:
            # More pages than the engine has: events were lost or wrong. Bounded memory, and a fresh start.
            self._clear(state)
            self._request_snapshot(state)

    def _clear(self, state: EngineState) -> None:
        self.index.remove(state.status.engine_id, state.cached)
        state.cached.clear()

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
            self._clear(state)
            self._apply(state, snap)
        held, state.held_back = sorted(state.held_back, key=lambda b: b.seq), []
        for batch in held:
            if batch.seq == state.kv_seq + 1:
                self._apply(state, batch)

    @staticmethod
    def dead_after_s(state: EngineState) -> float:
        return MISSED_HEARTBEATS * max(state.status.interval_s, 0.1)

    def alive(self, state: EngineState, now: float) -> bool:
        return state.status.state != "stopped" and now - state.last_seen <= self.dead_after_s(state)

    def is_gone(self, engine_id: str) -> bool:
        """True once this router may take the engine's requests over: it said it stopped, or it has been silent
        for longer than the heartbeat limit while this router was connected (our own outage proves nothing)."""
        state = self._engines.get(engine_id)
        if state is None:
            return self.bus.connected_for() > MISSED_HEARTBEATS
        if state.status.state == "stopped":
            return True
        limit = self.dead_after_s(state)
        return time.monotonic() - state.last_seen > limit and self.bus.connected_for() > limit

    def engines(self, *, role: Role | None = None, model: str = "", draining: bool = False) -> list[Engine]:
        """Live engines that take new work (``draining``: also those draining, which still serve what they hold)."""
        now = time.monotonic()
        out = [self._handle(state) for state in list(self._engines.values())
               if self._takes_work(state, now, role, model, draining)]
        return sorted(out, key=lambda e: e.id)

    def get(self, engine_id: str) -> Engine | None:
        state = self._engines.get(engine_id)
        return None if state is None else self._handle(state)

    def status_of(self, engine_id: str) -> EngineStatus | None:
        """The engine's last heartbeat, whatever its state (``engines`` leaves out draining and dead ones)."""
        state = self._engines.get(engine_id)
        return None if state is None else state.status

    def is_alive(self, engine_id: str) -> bool:
        state = self._engines.get(engine_id)
        return state is not None and self.alive(state, time.monotonic())

    def models(self) -> set[str]:
        now = time.monotonic()
        return {s.status.model for s in self._engines.values() if self.alive(s, now)}



def least_loaded(engines: Iterable[Engine], exclude: Iterable[Engine] = (), *, routers: int = 1,
                 rng: random.Random | None = None) -> Engine | None:
    """The engine with the fewest requests (ties: most free KV, then id).

    With ``routers`` > 1 routers placing requests on the same engines, each sees the others' placements only in
    the next heartbeat: all would pick the same least-loaded engine until then, and it gets a burst of up to
    ``routers`` requests (simulated at 64 engines and 8 routers: twice the mean JCT of one router). So each router
    then weighs a random ``ceil(N / routers)`` of the N candidates (at least 2), ties going to a random one of
    them — power-of-d choices, which stays balanced on stale loads (benchmarks/cluster_sim.py,
    docs/BENCHMARKS.md); with one router it is the exact least-loaded engine.
    """
    skip = {e.id for e in exclude}
    pool = [e for e in engines if e.id not in skip]
    if not pool:
        return None
    if routers > 1 and len(pool) > 2:
        d = max(2, math.ceil(len(pool) / routers))
        # In random order, ties go to whichever comes first: by id they would all go to the lowest ids.
        pool = (rng or _sampling).sample(pool, min(d, len(pool)))
        return min(pool, key=lambda e: (e.load, -e.free_kv_fraction))
    return min(pool, key=lambda e: (e.load, -e.free_kv_fraction, e.id))


_sampling = random.Random()
