"""The engine on the bus: subscriptions, replies, heartbeats. Bus I/O lives here, in asyncio; compute does not.

Subjects (see ``busserve.bus.subjects``):
  * ``engine.<id>.*`` — one subscription for generate / prep_recv / remote_send / start_generate / abort / renew /
    probe / set_roles / kv_snapshot, so actions reach the compute thread in the order they were sent;
  * ``cancel`` — client cancels; ``kv.<id>`` — KV chunks when the bus is the transport;
  * publishes ``engines.status`` heartbeats and ``engines.<id>.kv`` prefix-cache events.

Events produced by the compute thread are handed over in batches and published by one task, in order.

**The fence.** A router takes an engine's supervised requests over once it has heard no heartbeat from it for
``MISSED_HEARTBEATS`` intervals, and resumes them elsewhere. Whatever the reason for the silence — the process was
stopped (SIGSTOP), its event loop starved, the connection to NATS lost — the engine must then never publish on
those streams again. So the engine keeps the time of its last heartbeat sent while connected (``last_contact``);
before publishing anything, and at every heartbeat, it checks that this is less than ``FENCE_HEARTBEATS``
intervals ago (fewer than the routers wait). If not, it drops every supervised request (``FenceCmd``) and, until the
compute thread has done so, discards their queued events. While disconnected it holds events back (rather than
handing them to the client library's reconnect buffer) and releases them only if it reconnects in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from nats.aio.msg import Msg

from busserve.bus import codec
from busserve.bus.client import MISSED_HEARTBEATS, Bus, request_content_type
from busserve.bus.identity import check_engine_id_free
from busserve.bus.nats_service import NatsService
from busserve.bus.subjects import ENGINE_ACTIONS, Subjects
from busserve.config_store import ConfigStore, ConfigUnavailable, roles_key
from busserve.engine.engine_core import EngineCore
from busserve.engine.requests import ActionCmd, CallCmd, CancelCmd, FenceCmd, GenerateCmd, Outbound, WritesOverCmd
from busserve.engine.sequence import SeqKind
from busserve.engine.stream_log import StreamLog
from busserve.errors import MalformedMessage
from busserve.kv.locality import shm_domain
from busserve.kv.transfer.base import TransferError
from busserve.kv.transfer.bus import BusTransport
from busserve.kv.transfer.nvshmem import require_nvshmem
from busserve.kv.transfer.shm import ShmTransport
from busserve.messages import (
    Abort,
    Cancel,
    Drain,
    EngineStatus,
    Error,
    GenerateRequest,
    KVChunk,
    KVCommit,
    KVCommitReply,
    Migrate,
    PrepRecv,
    Probe,
    RemoteSend,
    Renew,
    Resend,
    ResendStream,
    Role,
    RolesState,
    SetRoles,
    StartGenerate,
)
from busserve.telemetry import propagation
from busserve.tokenization import RequestRejected, check_sampling, prompt_token_ids

log = logging.getLogger(__name__)


async def _bounded(stage: str, aw: Any, timeout_s: float) -> None:
    """Await ``aw`` for at most ``timeout_s``; past that, or on an error, log which stage of the stop it was."""
    try:
        await asyncio.wait_for(aw, timeout=timeout_s)
    except TimeoutError:
        log.warning("engine stop: %s took over %gs; going on", stage, timeout_s)
    except Exception as exc:
        log.warning("engine stop: %s failed: %s", stage, exc)

ACTION_TYPES: dict[str, type] = {
    "prep_recv": PrepRecv,
    "remote_send": RemoteSend,
    "start_generate": StartGenerate,
    "abort": Abort,
    "renew": Renew,
    "probe": Probe,
    "migrate": Migrate,
}
# New work a draining engine refuses: prefills for others. It still takes a receive — routers send one only when no
# other engine is left to resume a request on — and the start of a request parked before the drain (both are then
# migrated like the rest, or finish here within the grace period).
REFUSED_WHILE_DRAINING = frozenset({"remote_send"})
# An engine fences itself after this many heartbeat intervals without contact; routers wait MISSED_HEARTBEATS.
FENCE_HEARTBEATS = MISSED_HEARTBEATS - 0.5
# The compute thread answers every action (also when it stops); this bound only keeps a lost answer from holding a
# task forever.
REPLY_LIMIT_S = 3600.0


@dataclass
class ServiceConfig:
    roles: list[Role] = field(default_factory=lambda: ["prefill", "decode"])
    heartbeat_s: float = 1.0
    metrics_url: str = ""
    drain_grace_s: float = 60.0  # SIGTERM: how long a drain may take before the engine stops with what it holds


class EngineService:
    def __init__(self, bus: Bus, core: EngineCore, config: ServiceConfig | None = None) -> None:
        self.bus = bus
        self.core = core
        self.config = config or ServiceConfig()
        self.engine_id = core.engine_id
        self.subjects: Subjects = bus.subjects
        core.kv_events_subject = self.subjects.engine_kv_events(self.engine_id)
        self.loop: asyncio.AbstractEventLoop | None = None
        # Batches of events from the compute thread, in order; an Event is a barrier (set once all before it are out).
        self._outbox: asyncio.Queue[list[Outbound] | asyncio.Event] = asyncio.Queue()
        self._tasks: list[asyncio.Task[Any]] = []
        self._subs: list[Any] = []
        self.nats_service: NatsService | None = None
        self._heartbeat_seq = 0
        self.host = socket.gethostname()
        self.shm_domain = shm_domain()
        self.stream_log = StreamLog()  # what went out on each stream lately, for a client that missed some of it
        self.store: ConfigStore | None = None
        self.state: Literal["serving", "draining", "stopped"] = "serving"
        self.last_contact = time.monotonic()
        self._fencing = False  # a fence is under way: supervised events are dropped until the core confirms
        self.fences = 0
        self.drained = asyncio.Event()  # set when a drain has ended (the compute loop was asked to stop)

    @property
    def fence_after_s(self) -> float:
        return FENCE_HEARTBEATS * self.config.heartbeat_s

    # ------------------------------------------------------------------ lifecycle

    async def start(self, *, run_core: bool = True) -> None:
        """Subscribe and heartbeat; with ``run_core`` also start the compute loop on its own thread (otherwise
        the caller runs ``core.run()`` — the engine process does, on its main thread)."""
        self.loop = asyncio.get_running_loop()
        await check_engine_id_free(self.bus, self.engine_id)  # before anything is subscribed under it
        self.core.emit = self._emit_threadsafe
        if self.core.kv.shm_name is not None and "shm" in self.core.config.transports:
            self.core.transports["shm"] = ShmTransport(self.core.kv, self.core.transfer_executor, self.bus, self.loop)
        if "bus" in self.core.config.transports:
            self.core.transports["bus"] = BusTransport(self.bus, self.loop, self.core.transfer_executor,
                                                       self.engine_id)
        if "mooncake" in self.core.config.transports:  # asked for explicitly: refuse to start without it
            from busserve.kv.transfer.mooncake import MooncakeTransport, reachable_address

            url = self.bus.nc.connected_url
            host = os.environ.get("BUSSERVE_MOONCAKE_HOST") or reachable_address([url.geturl()] if url else [])
            self.core.transports["mooncake"] = MooncakeTransport(self.core.kv, self.core.transfer_executor,
                                                                 self.bus, self.loop, host)
        if "cuda_ipc" in self.core.config.transports and self.core.kv.data.device.type == "cuda":
            from busserve.kv.transfer.cuda_ipc import CudaIpcTransport

            self.core.transports["cuda_ipc"] = CudaIpcTransport(self.core.kv, self.core.transfer_executor, self.bus,
                                                                self.loop)
        if "nvshmem" in self.core.config.transports:
            require_nvshmem()  # asked for explicitly: refuse to start rather than silently fall back
        self._tasks.append(asyncio.create_task(self._publisher(), name="engine-publisher"))
        self.nats_service = svc = self._nats_service()
        await self.bus.serve_as(svc)
        s = self.subjects
        self._subs += [
            await self.bus.subscribe(s.engine_actions_wildcard(self.engine_id), self._on_action, service=svc,
                                     endpoint=lambda msg: Subjects.action_of(msg.subject)),
            await self.bus.subscribe(s.cancel(), self._on_cancel, service=svc, endpoint="cancel"),
            await self.bus.subscribe(s.resend(), self._on_resend, service=svc, endpoint="resend"),
            await self.bus.subscribe(s.kv_data(self.engine_id), self._on_kv_data, service=svc, endpoint="kv_data"),
        ]
        await self.bus.nc.flush()
        await self._follow_stored_roles()
        if run_core:
            self.core.start()
        self.last_contact = time.monotonic()
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="engine-heartbeat"))
        log.info("engine %s serving %s (%d KV pages of %d tokens, transports: %s)", self.engine_id,
                 self.core.loaded.name, self.core.allocator.num_pages, self.core.config.page_size,
                 ", ".join(self.core.transports))

    def _nats_service(self) -> NatsService:
        """This engine as the NATS service ``busserve-engine`` (id: the engine id), one endpoint per action."""
        s = self.subjects
        service = NatsService("busserve-engine", self.engine_id, "a busserve engine: the microserving actions",
                              {"engine_id": self.engine_id, "model": self.core.loaded.name, "host": socket.gethostname(),
                               "subjects": s.root})
        for action in ENGINE_ACTIONS:
            service.add_endpoint(action, s.engine_action(self.engine_id, action))
        service.add_endpoint("cancel", s.cancel())
        service.add_endpoint("resend", s.resend())
        service.add_endpoint("kv_data", s.kv_data(self.engine_id))
        return service

    async def _follow_stored_roles(self) -> None:
        """Roles changed at run time live in the config bucket: take them now, and follow later changes."""
        try:
            self.store = await ConfigStore.open(self.bus)
        except ConfigUnavailable as exc:
            log.info("roles fixed at %s: %s", ",".join(self.config.roles), exc)
            return
        stored = await self.store.get_roles(self.engine_id)
        if stored:
            self.config.roles = stored
            log.info("roles from the config bucket: %s", ",".join(stored))

        def on_change(state: RolesState, revision: int) -> None:
            if state.roles and list(state.roles) != self.config.roles:
                self.config.roles = list(state.roles)
                log.info("roles now %s", ",".join(state.roles))

        await self.store.watch(roles_key(self.engine_id), RolesState, on_change)

    async def stop(self) -> None:
        """Stop taking work, let the compute loop drop or fail what it holds (``EngineCore._close_requests``),
        publish that, then a last heartbeat saying ``stopped`` — routers resume the dropped requests at once."""
        self.state = "draining"
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        # Every stage is bounded: a stop that hangs (a bus call that never returns, a task that swallows its
        # cancellation, as nats-py's flush can) would keep `busserve up` and its supervisor waiting.
        if self.nats_service is not None:
            await _bounded("stop the NATS service", self.bus.stop_serving(self.nats_service), 5)
        if self.store is not None:
            await _bounded("close the config store", self.store.close(), 5)
        await _bounded("stop the compute loop",
                       asyncio.get_running_loop().run_in_executor(None, self.core.stop), 40)
        await _bounded("publish the last events", self._outbox.join(), 5)
        self.state = "stopped"
        with contextlib.suppress(Exception):
            await self.bus.publish(self.subjects.engines_status(), self.status())
            await self.bus.nc.flush(timeout=2)
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=5)
            if stuck:
                log.warning("engine %s: %d task(s) ignored their cancellation: %s", self.engine_id, len(stuck),
                            ", ".join(t.get_name() for t in stuck))

    async def drain(self, grace_s: float | None = None) -> None:
        """Take no new work and say so (``draining`` heartbeats: routers migrate our running requests to other
        engines, and resume elsewhere what cannot move); once this engine holds no request — or after the grace
        period — stop the compute loop, which drops what is left for the routers to resume (``stop``)."""
        if self.state != "serving":
            return
        grace = self.config.drain_grace_s if grace_s is None else grace_s
        self.state = "draining"
        log.info("engine %s draining (at most %gs)", self.engine_id, grace)
        with contextlib.suppress(Exception):
            await self.bus.publish(self.subjects.engines_status(), self.status())
        deadline = time.monotonic() + grace
        while self.core.holds_requests() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = self.core.holds_requests()
        log.info("engine %s drained%s", self.engine_id, f"; {left} request(s) left to resume elsewhere" if left else "")
        self.core.request_stop()
        self.drained.set()

    # ------------------------------------------------------------------ outbound, and the fence

    def _emit_threadsafe(self, outs: list[Outbound]) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._outbox.put_nowait, outs)

    def _in_contact(self) -> bool:
        return time.monotonic() - self.last_contact < self.fence_after_s

    async def _fence(self, why: str) -> None:
        """Drop every supervised request (their routers have given up on us), and their events until that is done."""
        if self._fencing:
            return
        self._fencing = True
        self.fences += 1
        assert self.loop is not None
        loop, done = self.loop, asyncio.Event()
        log.warning("engine %s fencing itself: %s", self.engine_id, why)
        self.core.submit(FenceCmd(why))
        # The fence is in the inbox; a CallCmd behind it answers once the compute thread has applied it.
        self.core.submit(CallCmd(lambda: None, lambda _: loop.call_soon_threadsafe(done.set)))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=REPLY_LIMIT_S)
        self._fencing = False
        self.last_contact = time.monotonic()

    async def _await_contact(self) -> bool:
        """Wait while disconnected, up to the fence; True once connected with contact kept."""
        while self.bus.connected_since is None or not self.bus.nc.is_connected:
            if not self._in_contact():
                return False
            await asyncio.sleep(0.05)
        return self._in_contact()

    async def _published(self) -> None:
        """Return once every event the compute thread handed over before this call has been published."""
        barrier = asyncio.Event()
        self._outbox.put_nowait(barrier)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(barrier.wait(), timeout=REPLY_LIMIT_S)

    async def _publisher(self) -> None:
        while True:
            outs = await self._outbox.get()
            if isinstance(outs, asyncio.Event):
                outs.set()
                self._outbox.task_done()
                continue
            try:
                if any(o.supervised for o in outs) and not await self._await_contact():
                    await self._fence(f"no contact with the bus for over {self.fence_after_s:g}s")
                for o in outs:
                    if o.supervised and self._fencing:
                        continue
                    self.stream_log.record(o.subject, o.msg, o.content_type)
                    try:
                        await self.bus.publish(o.subject, o.msg, content_type=o.content_type, trace=False)
                    except Exception as exc:
                        log.warning("could not publish to %s: %s", o.subject, exc)
            finally:
                self._outbox.task_done()

    async def _heartbeat(self) -> None:
        interval = self.config.heartbeat_s
        while True:
            gap = time.monotonic() - self.last_contact
            if gap >= self.fence_after_s and self.state != "stopped":
                await self._fence(f"{gap:.1f}s since the last heartbeat went out")
            try:
                if self.bus.nc.is_connected and self.bus.connected_since is not None:
                    await self.bus.publish(self.subjects.engines_status(), self.status())
                    self.last_contact = time.monotonic()
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(interval)

    def status(self) -> EngineStatus:
        core = self.core
        sched = core.scheduler
        self._heartbeat_seq += 1
        pending = decoding = 0
        for seq in list(sched.running) + list(sched.waiting):  # racy reads of ints: a heartbeat, not an audit
            todo = seq.compute_target - seq.num_computed if seq.is_prefill or seq.kind is SeqKind.SEND else 0
            pending += max(0, min(todo, seq.prompt_len - seq.num_computed))
            decoding += seq.kind is SeqKind.GENERATE and not seq.is_prefill
        return EngineStatus(
            engine_id=self.engine_id, model=core.loaded.name, roles=list(self.config.roles),
            running=sum(1 for s in list(sched.running) if s.ctx is not None),
            waiting=len(sched.waiting), parked=len(sched.parked), free_pages=core.allocator.free_count,
            total_pages=core.allocator.num_pages, page_size=core.config.page_size,
            max_model_len=core.max_model_len, transports=list(core.transports),  # type: ignore[arg-type]
            host=self.host, pid=os.getpid(), shm_domain=self.shm_domain, cached_pages=core.cache.num_pages,
            prefix_hit_rate=core.cache.hit_rate, interval_s=self.config.heartbeat_s, seq=self._heartbeat_seq,
            metrics_url=self.config.metrics_url, pending_prefill_tokens=pending, decoding=decoding,
            draining=self.state != "serving", state=self.state, quarantined_pages=sched.held_pages,
            prompt_tokens_computed=core.counters.prompt_tokens_computed,
            prefill_tokens_per_s=round(core.rates.prefill_tokens_per_s, 1),
            decode_step_s=round(core.rates.decode_step_s, 5), prefill_share=round(core.rates.prefill_share(), 3),
        )

    # ------------------------------------------------------------------ inbound

    async def _on_action(self, msg: Msg) -> None:
        action = Subjects.action_of(msg.subject)
        ct = request_content_type(msg)
        if action == "generate":
            await self._on_generate(msg)
            return
        if action == "set_roles":
            await self._on_set_roles(msg)
            return
        if action == "kv_snapshot":
            self._spawn(self._reply_when_done(msg, self._call(self.core.kv_snapshot), action, ""))
            return
        if action == "drain":
            await self._on_drain(msg)
            return
        if self.state != "serving" and action in REFUSED_WHILE_DRAINING:
            await self.bus.respond(msg, Error(code="overloaded", message=f"engine {self.engine_id} is {self.state}; "
                                                                         "it takes no new work"))
            return
        typ = ACTION_TYPES.get(action)
        if typ is None:
            await self.bus.respond(msg, Error(code="invalid_request", message=f"unknown engine action {action!r}"))
            return
        try:
            decoded = codec.decode(msg.data, typ, msg.headers)
        except MalformedMessage as exc:
            await self.bus.respond(msg, exc.error)
            return
        assert self.loop is not None
        fut: asyncio.Future[Any] = self.loop.create_future()
        loop = self.loop

        def reply(value: Any) -> None:
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(value))

        # Submitted now, in arrival order; the reply is awaited off the subscription so that a long
        # remote_send does not hold up the actions behind it.
        self.core.submit(ActionCmd(decoded, reply, ct, trace=propagation.extract(msg.headers)))
        self._spawn(self._reply_when_done(msg, fut, action, decoded.request_id))

    def _call(self, fn: Any) -> asyncio.Future[Any]:
        assert self.loop is not None
        fut: asyncio.Future[Any] = self.loop.create_future()
        loop = self.loop
        self.core.submit(CallCmd(fn, lambda v: loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(v))))
        return fut

    async def _reply_when_done(self, msg: Msg, fut: asyncio.Future[Any], action: str, rid: str) -> None:
        try:
            result = await asyncio.wait_for(fut, timeout=REPLY_LIMIT_S)
        except TimeoutError:
            result = Error(code="timeout", request_id=rid, message=f"engine {self.engine_id} did not finish {action}")
        if action == "migrate":
            # The request's last events on this engine must be out before the router starts it elsewhere, so that
            # its stream goes on in order.
            await self._published()
        await self.bus.respond(msg, result)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _on_generate(self, msg: Msg) -> None:
        """The direct data-parallel path: a whole request on this engine, streamed to the reply-to."""
        ct = request_content_type(msg)
        if not msg.reply:
            log.warning("generate request without a reply subject on %s; dropped", msg.subject)
            return
        try:
            req = codec.decode(msg.data, GenerateRequest, msg.headers)
        except MalformedMessage as exc:
            await self.bus.publish(msg.reply, exc.error, content_type=ct)
            return
        rid = req.request_id or uuid.uuid4().hex
        ct = req.stream.content_type or ct
        try:
            if self.state != "serving":
                raise RequestRejected("overloaded", f"engine {self.engine_id} is {self.state}")
            if req.model and req.model != self.core.loaded.name:
                raise RequestRejected("unknown_model", f"this engine serves {self.core.loaded.name!r}, "
                                                       f"not {req.model!r}", field="model")
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(None, prompt_token_ids, self.core.loaded.tokenizer, req)
            await loop.run_in_executor(None, check_sampling, self.core.loaded.tokenizer, req.sampling)
        except RequestRejected as exc:
            await self.bus.publish(msg.reply, exc.to_error(rid), content_type=ct)
            return
        self.core.submit(GenerateCmd(request_id=rid, token_ids=ids, sampling=req.sampling, stream_subject=msg.reply,
                                     content_type=ct, include_usage=req.stream.include_usage,
                                     trace=propagation.extract(msg.headers)))

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = codec.decode(msg.data, Cancel, msg.headers)
        except MalformedMessage as exc:
            log.debug("bad cancel: %s", exc)
            return
        self.core.submit(CancelCmd(cancel.request_id, cancel.reason))

    async def _on_resend(self, msg: Msg) -> None:
        """A router relays a client's Resend: publish again what this engine sent on that stream (if anything)."""
        try:
            ask = codec.decode(msg.data, ResendStream | Resend, msg.headers)
        except MalformedMessage as exc:
            log.debug("bad resend: %s", exc)
            return
        if not isinstance(ask, ResendStream):
            return  # a client's Resend on an open server, for the routers
        events, content_type = self.stream_log.since(ask.stream_subject, ask.from_index)
        for event in events:
            try:
                await self.bus.publish(ask.stream_subject, event, content_type=content_type, trace=False)
            except Exception as exc:
                log.warning("could not resend to %s: %s", ask.stream_subject, exc)
                return
        if events:
            log.info("resent %d event(s) of %s from index %d", len(events), ask.stream_subject, ask.from_index)

    async def _on_drain(self, msg: Msg) -> None:
        try:
            req = codec.decode(msg.data, Drain, msg.headers)
        except MalformedMessage as exc:
            await self.bus.respond(msg, exc.error)
            return
        self._spawn(self.drain(req.grace_s))
        await asyncio.sleep(0)  # the drain's first heartbeat goes out before the reply
        await self.bus.respond(msg, self.status())

    async def _on_set_roles(self, msg: Msg) -> None:
        try:
            req = codec.decode(msg.data, SetRoles, msg.headers)
        except MalformedMessage as exc:
            await self.bus.respond(msg, exc.error)
            return
        self.config.roles = list(dict.fromkeys(req.roles))
        await self.bus.respond(msg, RolesState(engine_id=self.engine_id, roles=self.config.roles))

    async def _on_kv_data(self, msg: Msg) -> None:
        try:
            decoded = codec.decode(msg.data, KVChunk | KVCommit, msg.headers)
        except MalformedMessage as exc:
            await self.bus.respond(msg, exc.error)
            return
        if isinstance(decoded, KVCommit) and decoded.transport != "bus":
            self.core.submit(WritesOverCmd(decoded.request_id))  # a shm sender is done writing: no reply
            return
        try:
            if isinstance(decoded, KVChunk):
                self.core.landing.write(decoded)
            else:
                chunks = self.core.landing.commit(decoded)
                if chunks != decoded.chunks:
                    raise TransferError(f"received {chunks} of {decoded.chunks} chunks for {decoded.request_id}")
                await self.bus.respond(msg, KVCommitReply(request_id=decoded.request_id, chunks=chunks))
        except TransferError as exc:
            log.warning("KV data for %s refused: %s", decoded.request_id, exc)
            await self.bus.respond(msg, Error(code="transfer_failed", message=str(exc),
                                              request_id=decoded.request_id))
