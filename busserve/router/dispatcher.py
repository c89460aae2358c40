"""The router: takes GenerateRequests from the generate subject (queue group — run as many routers as you like),
tokenizes them, runs the active strategy, and supervises each request to exactly one terminal event.

The request's life — states, owners, timers, and the one function that ends a stream here — is in
``lifecycle.py``; watching a started request and resuming it after a lost engine in ``supervision.py``. This
module wires them to the bus: admission (decode, validate, tokenize, check model, context and capacity), the
strategy (in this process, or forwarded to a strategy process on its own subject), the live strategy setting,
cancels, and the router's heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from busserve.bus import codec
from busserve.bus.client import Bus, request_content_type
from busserve.bus.identity import check_router_id_free
from busserve.bus.nats_service import NatsService
from busserve.config_store import ConfigStore, ConfigUnavailable
from busserve.errors import BusserveError, MalformedMessage, RemoteError
from busserve.messages import (
    Ack,
    Cancel,
    EngineStatus,
    Error,
    Final,
    GenerateRequest,
    KVEventBatch,
    Resend,
    ResendStream,
    RoutedRequest,
    RouterStatus,
    SetStrategy,
    StrategyParam,
    StrategyResult,
    StrategyState,
    StreamEvent,
    TokenChunk,
)
from busserve.router.cluster import ClusterView, Engine, Timeouts
from busserve.router.lifecycle import Flight, State
from busserve.router.mover import Mover
from busserve.router.rebalance import RebalanceConfig
from busserve.router.registry import BUILTINS
from busserve.router.request import Request
from busserve.router.strategies.common import run_on
from busserve.router.strategy import (
    Cluster,
    NoEngine,
    StrategyFailed,
    StrategyFn,
    coerce_params,
    run_strategy,
)
from busserve.router.supervision import SupervisionConfig, Supervisor, release
from busserve.telemetry import propagation
from busserve.telemetry.router_telemetry import RouterTelemetry, sub_request_span
from busserve.tokenization import RequestRejected, check_sampling, prompt_token_ids

log = logging.getLogger(__name__)
STORE_START_WAIT_S = 30.0

ROUTER_QUEUE = "busserve-routers"


@dataclass
class RouterConfig:
    router_id: str = field(default_factory=lambda: f"router-{uuid.uuid4().hex[:6]}")
    initial_strategy: str = "least_loaded"
    initial_params: dict[str, StrategyParam] = field(default_factory=dict)
    max_in_flight: int = 1024  # beyond this a request is refused with "overloaded" (HTTP 429)
    strategy_timeout_s: float = 900.0  # a strategy may wait for a whole remote prefill
    heartbeat_s: float = 1.0
    timeouts: Timeouts = field(default_factory=Timeouts)
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    # Thresholds of the rebalancing policy; it runs while the active strategy has the parameter ``rebalance=1``.
    rebalance: RebalanceConfig = field(default_factory=RebalanceConfig)


# A parameter every strategy takes: rebalancing (live migration of running requests, ``router/rebalance.py``) on
# top of what the strategy decides for new requests.
REBALANCE_PARAM = "rebalance"


@dataclass
class ActiveStrategy:
    name: str
    fn: StrategyFn | None  # None: served by a strategy process on its own subject
    params: dict[str, StrategyParam]
    revision: int = 0
    rebalance: bool = False

    @property
    def stored_params(self) -> dict[str, StrategyParam]:
        return {**self.params, REBALANCE_PARAM: 1} if self.rebalance else dict(self.params)


class Router:
    def __init__(self, bus: Bus, tokenizer: Any, config: RouterConfig | None = None) -> None:
        self.bus = bus
        self.tokenizer = tokenizer
        self.config = config or RouterConfig()
        self.view = ClusterView(bus, self.config.timeouts)
        self.active = ActiveStrategy(self.config.initial_strategy, None, dict(self.config.initial_params))
        self.in_flight: dict[str, Flight] = {}  # by engine-side id of the first attempt
        # Cancels can overtake their request (it may still be tokenizing): remember recent ones (by label).
        self.cancelled: OrderedDict[tuple[str, str], None] = OrderedDict()  # (owner, label), newest last
        # The stream subjects of requests that ended here lately, for a client's Resend of events it missed.
        self.ended_streams: OrderedDict[tuple[str, str], str] = OrderedDict()  # (owner, label) -> subject
        self.completed = 0
        self.failed = 0
        self.resumed = 0
        self.store: ConfigStore | None = None
        self._subs: list[Any] = []
        self.nats_service: NatsService | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._seq = 0
        self.telemetry = RouterTelemetry(self.config.router_id, lambda: self.active, lambda: self.in_flight)
        self.supervisor = Supervisor(bus, self.view, self.config.supervision, on_resume=self._on_resume)
        self.mover = Mover(self.view, self.supervisor, lambda: self.in_flight.values(), self._spawn,
                           self.config.rebalance, on_moved=self.telemetry.on_migration,
                           enabled=lambda: self.active.rebalance)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        s = self.bus.subjects
        await check_router_id_free(self.bus, self.config.router_id)
        self.nats_service = svc = self._nats_service()
        await self.bus.serve_as(svc)
        self._subs.append(await self.bus.subscribe(s.router_ping(self.config.router_id), self._on_ping, service=svc,
                                                   endpoint="ping"))
        self._subs.append(await self.bus.subscribe(s.engines_status(), self._on_engine_status))
        self._subs.append(await self.bus.subscribe(s.routers_status(), self._on_router_status))
        self._subs.append(await self.bus.subscribe(s.all_kv_events(), self._on_kv_events))
        await self._load_strategy()
        # Hear the engines' heartbeats (one interval, 1 s) before taking traffic, so that a router started into a
        # running cluster does not turn its first requests away for want of engines.
        deadline = time.monotonic() + 1.5
        while not self.view.engines() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for subject in (s.generate(), s.generate_any_owner()):
            self._subs.append(await self.bus.subscribe(subject, self._on_generate, queue=ROUTER_QUEUE, service=svc,
                                                       endpoint="generate"))
        for subject in (s.cancel(), s.cancel_any_owner()):
            self._subs.append(await self.bus.subscribe(subject, self._on_cancel, service=svc, endpoint="cancel"))
        for subject in (s.resend(), s.resend_any_owner()):
            self._subs.append(await self.bus.subscribe(subject, self._on_resend, service=svc, endpoint="resend"))
        self._subs.append(await self.bus.subscribe(s.control_strategy(), self._on_set_strategy, queue=ROUTER_QUEUE,
                                                   service=svc, endpoint="set_strategy"))
        self._spawn(self._heartbeat())
        self._spawn(self.mover.rebalance_forever())
        await self.bus.nc.flush()
        log.info("router %s up; strategy %s %s", self.config.router_id, self.active.name, self.active.params)

    def _nats_service(self) -> NatsService:
        """This router as the NATS service ``busserve-router`` (id: the router id). Requests from every owner
        (``generate.*`` beside the open server's ``generate``) count into one endpoint each."""
        s = self.bus.subjects
        service = NatsService("busserve-router", self.config.router_id,
                              "a busserve router: takes requests and runs strategies over the engines",
                              {"router_id": self.config.router_id, "host": socket.gethostname(), "subjects": s.root})
        service.add_endpoint("generate", s.generate_any_owner(), ROUTER_QUEUE)
        service.add_endpoint("cancel", s.cancel_any_owner())
        service.add_endpoint("resend", s.resend_any_owner())
        service.add_endpoint("set_strategy", s.control_strategy(), ROUTER_QUEUE)
        service.add_endpoint("ping", s.router_ping(self.config.router_id))
        return service

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.nats_service is not None:
            await self.bus.stop_serving(self.nats_service)
        # Let requests already routed finish their strategies (bounded).
        pending = [t for t in self._tasks if not t.get_name().startswith("router-bg")]
        if pending:
            await asyncio.wait(pending, timeout=10)
        for t in list(self._tasks):
            t.cancel()
        if self.store is not None:
            await self.store.close()

    def _spawn(self, coro: Any, name: str = "router-bg") -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------------------------ strategy configuration

    def resolve(self, name: str, params: dict[str, StrategyParam]) -> ActiveStrategy:
        """Validate a strategy setting: a built-in (params checked against its signature) or an external one."""
        params = dict(params)
        flag = params.pop(REBALANCE_PARAM, 0)
        if flag not in (0, 1, True, False, "0", "1", "true", "false"):
            raise ValueError(f"{REBALANCE_PARAM} must be 0 or 1, not {flag!r}")
        rebalance = flag in (1, True, "1", "true")
        fn = BUILTINS.get(name)
        if fn is not None:
            return ActiveStrategy(name, fn, coerce_params(fn, params), rebalance=rebalance)
        return ActiveStrategy(name, None, params, rebalance=rebalance)

    async def _load_strategy(self) -> None:
        self.active = self.resolve(self.config.initial_strategy, self.config.initial_params)
        try:
            self.store = await ConfigStore.open(self.bus)
        except ConfigUnavailable as exc:
            log.warning("%s; the strategy stays %s and is not shared with other routers", exc, self.active.name)
            return
        # A NATS cluster that has just formed may time out JetStream requests for a few seconds (its stream leader
        # is still being elected): try again, bounded, rather than exit.
        deadline = time.monotonic() + STORE_START_WAIT_S
        while True:
            try:
                stored = await self.store.get_strategy()
                if stored is None:
                    await self.store.put_strategy(StrategyState(name=self.active.name,
                                                                params=self.active.stored_params,
                                                                updated_by=self.config.router_id))
                await self.store.watch("strategy", StrategyState, self._apply_stored)
                return
            except (nats.errors.TimeoutError, nats.js.errors.ServiceUnavailableError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.warning("the config bucket does not answer yet (%s); trying again", exc or type(exc).__name__)
                await asyncio.sleep(0.5)

    def _apply_stored(self, state: StrategyState, revision: int) -> None:
        if revision and revision <= self.active.revision:
            return  # already applied (this router stored it, or a late delivery)
        try:
            active = self.resolve(state.name, state.params)
        except ValueError as exc:
            log.error("stored strategy %s is invalid here (%s); keeping %s", state.name, exc, self.active.name)
            return
        active.revision = revision
        if (active.name, active.stored_params) != (self.active.name, self.active.stored_params):
            log.info("strategy now %s %s (revision %d)", active.name, active.stored_params, revision)
        self.active = active

    async def _on_set_strategy(self, msg: Msg) -> None:
        try:
            req = codec.decode(msg.data, SetStrategy, msg.headers)
            active = self.resolve(req.name, req.params)
            if active.fn is None:
                await self._check_strategy_process(req.name)
        except MalformedMessage as exc:
            await self.bus.respond(msg, exc.error)
            return
        except (ValueError, BusserveError) as exc:
            await self.bus.respond(msg, Error(code="invalid_request", field="name", message=str(exc)))
            return
        state = StrategyState(name=active.name, params=active.stored_params, updated_by=self.config.router_id)
        if self.store is not None:
            state.revision = await self.store.put_strategy(state)
        # Apply it here before answering, so a request sent after the reply sees it; other routers follow
        # through their watch of the bucket.
        self._apply_stored(state, state.revision)
        await self.bus.respond(msg, state)

    async def _check_strategy_process(self, name: str) -> None:
        try:
            await self.bus.request(self.bus.subjects.strategy(name), Ack(detail="ping"), Ack, timeout_s=2.0)
        except BusserveError as exc:
            known = ", ".join(sorted(BUILTINS))
            raise ValueError(f"unknown strategy {name!r}: not a built-in ({known}) and no strategy process "
                             f"serves it ({exc})") from exc

    # ------------------------------------------------------------------ cluster view

    async def _on_engine_status(self, msg: Msg) -> None:
        try:
            status = codec.decode(msg.data, EngineStatus, msg.headers)
        except MalformedMessage:
            return
        self.view.on_status(status)
        self.mover.on_status(status)

    async def _on_router_status(self, msg: Msg) -> None:
        try:
            status: RouterStatus = codec.decode(msg.data, RouterStatus, msg.headers)
        except MalformedMessage:
            return
        if status.router_id != self.config.router_id:
            self.view.on_router(status.router_id, status.interval_s)

    async def _on_kv_events(self, msg: Msg) -> None:
        with contextlib.suppress(MalformedMessage):
            self.view.on_kv_events(codec.decode(msg.data, KVEventBatch, msg.headers))

    # ------------------------------------------------------------------ admission

    def _new_id(self) -> str:
        self._seq += 1
        return f"{self.config.router_id}-{self._seq:x}"

    async def _on_generate(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("generate request without a reply subject; dropped")
            return
        owner = self.bus.subjects.owner_of(msg.subject)
        if not _sent_by_owner(msg, owner):
            return
        if owner and not (self.bus.subjects.in_inbox_of(owner, msg.reply)
                          or self.bus.subjects.is_import_reply(msg.reply)):
            # A stream into someone else's inbox: answering there would be the forgery, so nothing is published.
            # (A tenant's request arrives with the server's reply mapping, which leads into its own account only.)
            log.warning("generate from %s with reply subject %r outside its inbox %s.>; dropped", owner, msg.reply,
                        self.bus.subjects.inbox_prefix(owner))
            return
        ct = request_content_type(msg)
        try:
            gen = codec.decode(msg.data, GenerateRequest, msg.headers)
        except MalformedMessage as exc:
            await self.bus.publish(msg.reply, exc.error, content_type=ct, trace=False)
            return
        label = gen.request_id or uuid.uuid4().hex
        ct = gen.stream.content_type or ct
        try:
            req = await self._admit(gen, label, msg.reply, ct)
        except BusserveError as exc:
            self.failed += 1
            await self.bus.publish(msg.reply, exc.to_error(label), content_type=ct, trace=False)
            return
        req.operation = "chat" if gen.messages is not None else "text_completion"
        req.owner = owner
        flight = Flight(req=req, strategy=self.active.name, cancelled=(owner, label) in self.cancelled,
                        resume_limit=self.config.supervision.resume_limit if gen.resume_limit is None
                        else gen.resume_limit)
        self.in_flight[req.base_id] = flight
        parent = propagation.extract(msg.headers)  # continue the caller's trace, if it sent one
        self._spawn(self._serve(flight, self.active, parent), name=f"request-{req.request_id}")

    async def _admit(self, gen: GenerateRequest, label: str, stream_subject: str, ct: Any) -> Request:
        if len(self.in_flight) >= self.config.max_in_flight:
            raise RequestRejected("overloaded", f"router {self.config.router_id} has {len(self.in_flight)} "
                                                "requests in flight (its bound); try again later")
        engines = self.view.engines()
        if not engines:
            raise NoEngine("no engine is up")
        if gen.model and gen.model not in self.view.models():
            served = ", ".join(sorted(self.view.models()))
            raise RequestRejected("unknown_model", f"model {gen.model!r} is not served here (serving: {served})",
                                  field="model")
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(None, prompt_token_ids, self.tokenizer, gen)
        await loop.run_in_executor(None, check_sampling, self.tokenizer, gen.sampling)
        limit = min(e.status.max_model_len for e in self.view.engines(model=gen.model))
        if len(ids) >= limit:
            raise RequestRejected("prompt_too_long", f"prompt has {len(ids)} tokens; the context is {limit} tokens "
                                                     "and at least one must be left for the output", field="prompt")
        return Request(request_id=self._new_id(), prompt_token_ids=ids, sampling=gen.sampling,
                       stream_subject=stream_subject, stream=gen.stream, content_type=ct, model=gen.model,
                       label=label, supervisor=self.config.router_id, engine_hint=gen.engine_hint or "")

    # ------------------------------------------------------------------ one request

    async def _serve(self, flight: Flight, active: ActiveStrategy, parent: Any = None) -> None:
        req = flight.req
        req.strategy = active.name
        sub = None
        with self.telemetry.request_span(req, parent, req.operation) as span:
            try:
                async def on_stream(msg: Msg) -> None:
                    self._on_stream(flight, msg)

                # Watch the stream before anything can be published on it.
                sub = await self.bus.nc.subscribe(req.stream_subject, cb=on_stream)
                await flight.announce(self.bus, self.config.router_id, self.config.heartbeat_s)
                if await self._route(flight, active):
                    await self.supervisor.watch(flight, flight.resume_limit)
            except Exception as exc:  # a bug of ours must still end the request
                log.exception("routing %s failed", req.label)
                with contextlib.suppress(Exception):
                    await self._fail(flight, Error(code="internal",
                                                   message=f"router error: {type(exc).__name__}: {exc}"))
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                for attempt in [req, *flight.attempts]:
                    self.view.load.release(attempt)
                self.in_flight.pop(req.base_id, None)
                self.ended_streams[(req.owner, req.label)] = req.stream_subject
                while len(self.ended_streams) > 10_000:
                    self.ended_streams.popitem(last=False)
                if flight.outcome() == "ok":
                    self.completed += 1
                else:
                    self.failed += 1
                with contextlib.suppress(Exception):
                    self.telemetry.on_finish(flight, flight.outcome(), span)

    async def _route(self, flight: Flight, active: ActiveStrategy) -> bool:
        """ROUTING: run the strategy; True once an engine accepted start_generate (then it owns the stream)."""
        req = flight.req
        flight.state = State.ROUTING
        if flight.cancelled:
            await flight.end(self.bus, Final(request_id=req.label, finish_reason="cancelled"))
            return False
        try:
            await asyncio.wait_for(self._run_strategy(req, active), timeout=self.config.strategy_timeout_s)
            if req.started_on is None:
                raise StrategyFailed(f"strategy {active.name} returned without a start_generate")
        except TimeoutError:
            await self._fail(flight, Error(code="timeout", message=f"strategy {active.name} took over "
                                                                   f"{self.config.strategy_timeout_s:g}s"))
            return False
        except BusserveError as exc:
            await self._fail(flight, exc.to_error(req.label))
            return False
        except ValueError as exc:
            await self._fail(flight, Error(code="invalid_request", message=str(exc)))
            return False
        return True

    async def _run_strategy(self, req: Request, active: ActiveStrategy) -> None:
        hinted = self._hinted(req)
        if hinted is not None:  # the client knows where its prompt is cached: data parallel there
            await run_on(req, hinted)
            return
        if active.fn is not None:
            await run_strategy(active.fn, req, Cluster(self.view, req.model), active.params)
            return
        routed = RoutedRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                               stream_subject=req.stream_subject, sampling=req.sampling, stream=req.stream,
                               model=req.model, params=active.params, label=req.label, supervisor=req.supervisor)
        with sub_request_span(f"strategy {active.name}", "", req.request_id):
            result = await self.bus.request(self.bus.subjects.strategy(active.name), routed, StrategyResult,
                                            timeout_s=self.config.strategy_timeout_s)
        if result.request_id != req.request_id:  # the strategy started over under a fresh id
            req.request_id = result.request_id
        req.touched.update(result.touched)
        req.senders.update(result.senders)
        req.started_on = result.started_on
        if result.error is not None:
            raise RemoteError(result.error)

    def _hinted(self, req: Request) -> Engine | None:
        """The engine the request names, if it is up, not draining and serves the model (a resumed attempt whose
        hinted engine died goes to the strategy)."""
        if not req.engine_hint:
            return None
        return next((e for e in self.view.engines(role="decode", model=req.model) if e.id == req.engine_hint), None)

    def _on_stream(self, flight: Flight, msg: Msg) -> None:
        try:
            event = codec.decode(msg.data, StreamEvent, msg.headers)
        except MalformedMessage:
            return
        first = False
        if isinstance(event, TokenChunk):
            self.telemetry.on_tokens(flight, len(event.token_ids))
            first = flight.first_token_at is None
        flight.on_event(event)
        if first:
            self.view.load.first_token(flight.req)

    async def _fail(self, flight: Flight, error: Error) -> None:
        """The strategy failed: release the engines it touched, then end the stream — unless an engine did."""
        req = flight.req
        ended_elsewhere = await release(self.view, req, error.message, owner=req.start_pending or req.started_on)
        if ended_elsewhere or flight.terminal.is_set():
            flight.accept_engine_ended(None)
            return
        if flight.cancelled or (req.owner, req.label) in self.cancelled:
            await flight.end(self.bus, Final(request_id=req.label, finish_reason="cancelled"))
        else:
            await flight.end(self.bus, error)

    def _on_resume(self, flight: Flight, lost: str) -> None:
        self.resumed += 1
        self.telemetry.on_resume(flight, lost)

    async def _on_ping(self, msg: Msg) -> None:
        await self.bus.respond(msg, Ack())

    async def _on_cancel(self, msg: Msg) -> None:
        """A client's cancel names its own id (the label), and counts only for requests it sent (the owner in the
        subject). The engine running the request hears it from here, by the router's id for it, and ends it with
        Final(cancelled); a request still being routed ends here once its strategy's next action fails."""
        try:
            cancel = codec.decode(msg.data, Cancel, msg.headers)
        except MalformedMessage:
            return
        owner = self.bus.subjects.owner_of(msg.subject)
        if not _sent_by_owner(msg, owner):
            return
        self.cancelled[(owner, cancel.request_id)] = None
        while len(self.cancelled) > 10_000:
            self.cancelled.popitem(last=False)
        for flight in list(self.in_flight.values()):
            if flight.req.label != cancel.request_id or flight.req.owner != owner:
                continue
            flight.cancelled = True
            if flight.state in (State.ROUTING, State.RESUMING, State.ADMITTED):
                self._spawn(release(self.view, flight.req, "cancelled"))
            else:
                self._spawn(self.bus.publish(self.bus.subjects.cancel(), Cancel(request_id=flight.req.request_id,
                                                                                reason=cancel.reason)))

    async def _on_resend(self, msg: Msg) -> None:
        """A client missed events of its stream: the engines publish them again (the one that has them does).
        Only the request's owner names it, as for a cancel; the stream subject comes from here, never the client."""
        try:
            ask = codec.decode(msg.data, Resend | ResendStream, msg.headers)
        except MalformedMessage:
            return
        if not isinstance(ask, Resend):
            return  # another router's relay to the engines
        owner = self.bus.subjects.owner_of(msg.subject)
        if not _sent_by_owner(msg, owner):
            return
        subject = next((f.req.stream_subject for f in self.in_flight.values()
                        if f.req.label == ask.request_id and f.req.owner == owner),
                       self.ended_streams.get((owner, ask.request_id)))
        if subject is not None:
            await self.bus.publish(self.bus.subjects.resend(),
                                   ResendStream(stream_subject=subject, from_index=ask.from_index))

    # ------------------------------------------------------------------ status

    def status(self) -> RouterStatus:
        return RouterStatus(router_id=self.config.router_id, strategy=self.active.name,
                            params=self.active.stored_params,
                            in_flight=len(self.in_flight), completed=self.completed, failed=self.failed,
                            interval_s=self.config.heartbeat_s, resumed=self.resumed, migrated=self.mover.moved)

    async def _heartbeat(self) -> None:
        while True:
            try:
                await self.bus.publish(self.bus.subjects.routers_status(), self.status(), trace=False)
            except Exception as exc:
                log.debug("router heartbeat failed: %s", exc)
            await asyncio.sleep(self.config.heartbeat_s)


_REQUEST_INFO = "Nats-Request-Info"  # set by the server on messages through a service import with ``share``


def _sent_by_owner(msg: Msg, owner: str) -> bool:
    """Whether the user the server says sent ``msg`` (a tenant's request or cancel, through its import) is the
    owner its subject names. The subject alone would do within a tenant's grants; this also holds against a user
    of the tenant's account whose grants are wider than a client's. The server names a password user by its name,
    an mTLS one by its certificate's ``CN=<name>``, a JWT one by its signed name (``name_tag``); a plain nkey user
    only by its public key, which says nothing here, so for those the tenant's grants are the whole check."""
    raw = (msg.headers or {}).get(_REQUEST_INFO)
    if not raw or not owner:
        return True
    try:
        info = json.loads(raw)
        user, name_tag = str(info.get("user") or ""), str(info.get("name_tag") or "")
    except (ValueError, AttributeError):
        user = name_tag = ""
    if owner in (user, user.removeprefix("CN="), name_tag):
        return True
    if not name_tag and len(user) == 56 and user.startswith("U") and user.isalnum() and user.isupper():
        return True  # a plain nkey user
    log.warning("%s names owner %s but the server says %r sent it; dropped", msg.subject, owner, name_tag or user)
    return False
