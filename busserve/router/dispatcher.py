"""The router: takes GenerateRequests from the generate subject (queue group — run as many routers as you like),
tokenizes them, runs the active strategy, and guarantees each request exactly one terminal event.

Lifecycle of a request here:
 1. decode and validate; tokenize (chat template); check model, engines, prompt length — any failure is an Error
    on the request's stream, at once;
 2. snapshot the active strategy (a switch later does not touch this request) and run it — in this process for a
    built-in or loaded strategy, or by forwarding to a strategy process on its own subject;
 3. the engine that accepted start_generate now owns the stream; the router watches it until the terminal event,
    and publishes an Error itself only if that engine dies first;
 4. if the strategy fails (an engine error, a time-out, no responders), the engines it touched are aborted and
    the client gets an Error — or, for a client cancel, Final(cancelled) — unless an engine already sent one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from busserve.bus import codec
from busserve.bus.client import Bus, request_content_type
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
    RoutedRequest,
    RouterStatus,
    SetStrategy,
    StrategyParam,
    StrategyResult,
    StrategyState,
    StreamEvent,
    TokenChunk,
)
from busserve.router.cluster import ClusterView, Timeouts
from busserve.router.request import Request
from busserve.router.strategy import BUILTINS, Cluster, NoEngine, StrategyFailed, StrategyFn, coerce_params
from busserve.telemetry import propagation
from busserve.telemetry.router_telemetry import RouterTelemetry, sub_request_span
from busserve.tokenization import RequestRejected, prompt_token_ids

log = logging.getLogger(__name__)

ROUTER_QUEUE = "busserve-routers"


@dataclass
class RouterConfig:
    router_id: str = field(default_factory=lambda: f"router-{uuid.uuid4().hex[:6]}")
    initial_strategy: str = "least_loaded"
    initial_params: dict[str, StrategyParam] = field(default_factory=dict)
    max_in_flight: int = 1024  # beyond this a request is refused with "overloaded"
    strategy_timeout_s: float = 900.0  # a strategy may wait for a whole remote prefill
    heartbeat_s: float = 1.0
    timeouts: Timeouts = field(default_factory=Timeouts)


@dataclass
class ActiveStrategy:
    name: str
    fn: StrategyFn | None  # None: served by a strategy process on its own subject
    params: dict[str, StrategyParam]
    revision: int = 0


@dataclass
class InFlight:
    req: Request
    strategy: str
    started: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    terminal: asyncio.Event = field(default_factory=asyncio.Event)
    terminal_event: Any = None
    cancelled: bool = False
    tokens: int = 0
    last_token_at: float | None = None


class Router:
    def __init__(self, bus: Bus, tokenizer: Any, config: RouterConfig | None = None) -> None:
        self.bus = bus
        self.tokenizer = tokenizer
        self.config = config or RouterConfig()
        self.view = ClusterView(bus, self.config.timeouts)
        self.active = ActiveStrategy(self.config.initial_strategy, None, dict(self.config.initial_params))
        self.in_flight: dict[str, InFlight] = {}
        # Cancels can overtake their request (it may still be tokenizing): remember recent ones.
        self.cancelled: OrderedDict[str, None] = OrderedDict()
        self.completed = 0
        self.failed = 0
        self.store: ConfigStore | None = None
        self._subs: list[Any] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self.telemetry = RouterTelemetry(self.config.router_id, lambda: self.active, lambda: self.in_flight)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        import busserve.router.strategies  # noqa: F401 - register the built-ins

        s = self.bus.subjects
        self._subs.append(await self.bus.subscribe(s.engines_status(), self._on_engine_status))
        self._subs.append(await self.bus.subscribe(s.all_kv_events(), self._on_kv_events))
        await self._load_strategy()
        # Hear the engines' heartbeats (one interval, 1 s) before taking traffic, so that a router started into a
        # running cluster does not turn its first requests away for want of engines.
        deadline = time.monotonic() + 1.5
        while not self.view.engines() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._subs.append(await self.bus.subscribe(s.generate(), self._on_generate, queue=ROUTER_QUEUE))
        self._subs.append(await self.bus.subscribe(s.cancel(), self._on_cancel))
        self._subs.append(await self.bus.subscribe(s.control_strategy(), self._on_set_strategy, queue=ROUTER_QUEUE))
        self._spawn(self._heartbeat())
        await self.bus.nc.flush()
        log.info("router %s up; strategy %s %s", self.config.router_id, self.active.name, self.active.params)

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
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
        fn = BUILTINS.get(name)
        if fn is not None:
            return ActiveStrategy(name, fn, coerce_params(fn, params))
        return ActiveStrategy(name, None, dict(params))

    async def _load_strategy(self) -> None:
        self.active = self.resolve(self.config.initial_strategy, self.config.initial_params)
        try:
            self.store = await ConfigStore.open(self.bus)
        except ConfigUnavailable as exc:
            log.warning("%s; the strategy stays %s and is not shared with other routers", exc, self.active.name)
            return
        stored = await self.store.get_strategy()
        if stored is None:
            await self.store.put_strategy(StrategyState(name=self.active.name, params=self.active.params,
                                                        updated_by=self.config.router_id))
        await self.store.watch("strategy", StrategyState, self._apply_stored)

    def _apply_stored(self, state: StrategyState, revision: int) -> None:
        if revision and revision <= self.active.revision:
            return  # already applied (this router stored it, or a late delivery)
        try:
            active = self.resolve(state.name, state.params)
        except ValueError as exc:
            log.error("stored strategy %s is invalid here (%s); keeping %s", state.name, exc, self.active.name)
            return
        active.revision = revision
        if (active.name, active.params) != (self.active.name, self.active.params):
            log.info("strategy now %s %s (revision %d)", active.name, active.params, revision)
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
        state = StrategyState(name=active.name, params=active.params, updated_by=self.config.router_id)
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
        with contextlib.suppress(MalformedMessage):
            self.view.on_status(codec.decode(msg.data, EngineStatus, msg.headers))

    async def _on_kv_events(self, msg: Msg) -> None:
        with contextlib.suppress(MalformedMessage):
            self.view.on_kv_events(codec.decode(msg.data, KVEventBatch, msg.headers))

    # ------------------------------------------------------------------ requests

    async def _on_generate(self, msg: Msg) -> None:
        if not msg.reply:
            log.warning("generate request without a reply subject; dropped")
            return
        ct = request_content_type(msg)
        try:
            gen = codec.decode(msg.data, GenerateRequest, msg.headers)
        except MalformedMessage as exc:
            await self.bus.publish(msg.reply, exc.error, content_type=ct, trace=False)
            return
        rid = gen.request_id or uuid.uuid4().hex
        ct = gen.stream.content_type or ct
        try:
            req = await self._admit(gen, rid, msg.reply, ct)
        except BusserveError as exc:
            self.failed += 1
            await self.bus.publish(msg.reply, exc.to_error(rid), content_type=ct, trace=False)
            return
        req.operation = "chat" if gen.messages is not None else "text_completion"
        parent = propagation.extract(msg.headers)  # continue the caller's trace, if it sent one
        self._spawn(self._serve(req, self.active, parent), name=f"request-{rid}")

    async def _admit(self, gen: GenerateRequest, rid: str, stream_subject: str, ct: Any) -> Request:
        if rid in self.in_flight:
            raise RequestRejected("conflict", f"request {rid} is already in flight", field="request_id")
        if len(self.in_flight) >= self.config.max_in_flight:
            raise RequestRejected("overloaded", f"router {self.config.router_id} has {len(self.in_flight)} "
                                                "requests in flight; try again later")
        engines = self.view.engines()
        if not engines:
            raise NoEngine("no engine is up")
        if gen.model and gen.model not in self.view.models():
            served = ", ".join(sorted(self.view.models()))
            raise RequestRejected("unknown_model", f"model {gen.model!r} is not served here (serving: {served})",
                                  field="model")
        loop = asyncio.get_running_loop()
        ids = await loop.run_in_executor(None, prompt_token_ids, self.tokenizer, gen)
        limit = min(e.status.max_model_len for e in self.view.engines(model=gen.model))
        if len(ids) >= limit:
            raise RequestRejected("prompt_too_long", f"prompt has {len(ids)} tokens; the context is {limit} tokens "
                                                     "and at least one must be left for the output", field="prompt")
        return Request(request_id=rid, prompt_token_ids=ids, sampling=gen.sampling, stream_subject=stream_subject,
                       stream=gen.stream, content_type=ct, model=gen.model)

    async def _serve(self, req: Request, active: ActiveStrategy, parent: Any = None) -> None:
        flight = InFlight(req=req, strategy=active.name, cancelled=req.request_id in self.cancelled)
        req.strategy = active.name
        self.in_flight[req.request_id] = flight
        outcome = "error"
        sub = None
        with self.telemetry.request_span(req, parent, req.operation) as span:
            try:
                async def on_stream(msg: Msg) -> None:
                    await self._on_stream(flight, msg)

                # Watch the stream before anything can be published on it.
                sub = await self.bus.nc.subscribe(req.stream_subject, cb=on_stream)
                outcome = await self._route(flight, active)
            except Exception as exc:  # a bug of ours must still end the request
                log.exception("routing %s failed", req.request_id)
                with contextlib.suppress(Exception):
                    await self._fail(flight, Error(code="internal", request_id=req.request_id,
                                                   message=f"router error: {type(exc).__name__}: {exc}"))
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()
                self.view.load.release(req)
                self.in_flight.pop(req.request_id, None)
                if outcome == "error":
                    self.failed += 1
                else:
                    self.completed += 1
                with contextlib.suppress(Exception):
                    self.telemetry.on_finish(flight, outcome, span)

    async def _route(self, flight: InFlight, active: ActiveStrategy) -> str:
        """Run the strategy, then watch the stream; returns "ok" or "error"."""
        req = flight.req
        try:
            await asyncio.wait_for(self._run_strategy(req, active), timeout=self.config.strategy_timeout_s)
            if req.started_on is None:
                raise StrategyFailed(f"strategy {active.name} returned without a start_generate")
        except TimeoutError:
            await self._fail(flight, Error(code="timeout", request_id=req.request_id,
                                           message=f"strategy {active.name} took over "
                                                   f"{self.config.strategy_timeout_s:g}s"))
            return "error"
        except BusserveError as exc:
            await self._fail(flight, exc.to_error(req.request_id))
            return "error"
        except ValueError as exc:
            await self._fail(flight, Error(code="invalid_request", message=str(exc), request_id=req.request_id))
            return "error"
        return await self._supervise(flight)

    async def _run_strategy(self, req: Request, active: ActiveStrategy) -> None:
        if active.fn is not None:
            await active.fn(req, Cluster(self.view, req.model), **active.params)
            return
        routed = RoutedRequest(request_id=req.request_id, prompt_token_ids=req.prompt_token_ids,
                               stream_subject=req.stream_subject, sampling=req.sampling, stream=req.stream,
                               model=req.model, params=active.params)
        with sub_request_span(f"strategy {active.name}", "", req.request_id):
            result = await self.bus.request(self.bus.subjects.strategy(active.name), routed, StrategyResult,
                                            timeout_s=self.config.strategy_timeout_s)
        req.touched.update(result.touched)
        req.started_on = result.started_on
        if result.error is not None:
            raise RemoteError(result.error)

    async def _on_stream(self, flight: InFlight, msg: Msg) -> None:
        try:
            event = codec.decode(msg.data, StreamEvent, msg.headers)
        except MalformedMessage:
            return
        if isinstance(event, TokenChunk):
            if flight.first_token_at is None:
                flight.first_token_at = time.monotonic()
                self.view.load.first_token(flight.req)
            flight.tokens += len(event.token_ids)
            self.telemetry.on_tokens(flight, len(event.token_ids))
        elif not flight.terminal.is_set():
            flight.terminal_event = event
            flight.terminal.set()

    async def _supervise(self, flight: InFlight) -> str:
        """Wait for the terminal event; if the owning engine dies first, send an Error in its place."""
        req = flight.req
        engine = req.started_on
        assert engine is not None
        while not flight.terminal.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(flight.terminal.wait(), timeout=1.0)
            if not flight.terminal.is_set() and not self.view.is_alive(engine):
                await self._publish_terminal(flight, Error(
                    code="engine_failure", request_id=req.request_id,
                    message=f"engine {engine} stopped answering while serving this request"))
                return "error"
        return "error" if isinstance(flight.terminal_event, Error) else "ok"

    async def _fail(self, flight: InFlight, error: Error) -> None:
        """The strategy failed: release the engines it touched, then send the one terminal event if none was."""
        req = flight.req
        terminal_elsewhere = await self._release(req, reason=error.message)
        if terminal_elsewhere or flight.terminal.is_set():
            return
        if flight.cancelled or req.request_id in self.cancelled:
            await self._publish_terminal(flight, Final(request_id=req.request_id, finish_reason="cancelled"))
        else:
            await self._publish_terminal(flight, error)

    async def _release(self, req: Request, reason: str) -> bool:
        """Abort the request on every engine it touched. True if an engine sent (or sends now) its terminal."""
        owner = req.start_pending or req.started_on
        targets = set(req.touched) or {e.id for e in self.view.engines()}
        done = False

        async def abort(eid: str) -> None:
            nonlocal done
            engine = self.view.get(eid)
            if engine is None:
                return
            with contextlib.suppress(BusserveError):
                reply = await engine.abort(req, notify=eid == owner, reason=reason[:200])
                done = done or reply.notified or reply.terminated

        await asyncio.gather(*(abort(e) for e in targets))
        return done

    async def _publish_terminal(self, flight: InFlight, event: Final | Error) -> None:
        if flight.terminal.is_set():
            return
        flight.terminal_event = event
        flight.terminal.set()
        await self.bus.publish(flight.req.stream_subject, event, content_type=flight.req.content_type, trace=False)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            cancel = codec.decode(msg.data, Cancel, msg.headers)
        except MalformedMessage:
            return
        self.cancelled[cancel.request_id] = None
        while len(self.cancelled) > 10_000:
            self.cancelled.popitem(last=False)
        flight = self.in_flight.get(cancel.request_id)
        if flight is not None:
            # Engines drop the request on the same Cancel; the strategy's next action fails, and _fail then sends
            # Final(cancelled) — unless the request had already started, when its engine sends it.
            flight.cancelled = True

    # ------------------------------------------------------------------ status

    def status(self) -> RouterStatus:
        return RouterStatus(router_id=self.config.router_id, strategy=self.active.name, params=self.active.params,
                            in_flight=len(self.in_flight), completed=self.completed, failed=self.failed,
                            interval_s=self.config.heartbeat_s)

    async def _heartbeat(self) -> None:
        host = socket.gethostname()
        while True:
            try:
                st = self.status()
                st.router_id = st.router_id or host
                await self.bus.publish(self.bus.subjects.routers_status(), st, trace=False)
            except Exception as exc:
                log.debug("router heartbeat failed: %s", exc)
            await asyncio.sleep(self.config.heartbeat_s)

