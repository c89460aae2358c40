"""A strategy in its own process: ``busserve strategy serve my_module:my_strategy --name X``.

It listens on ``strategy.X`` (a queue group, so several copies share the work), keeps its own cluster view from
heartbeats and KV events, and runs the strategy for each RoutedRequest a router forwards while X is active. It
answers with the engine that accepted start_generate and the engines it touched (so the router can clean up if
it failed), or with the error. An ``Ack`` ping is answered at once (routers check a strategy exists before
switching to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import uuid
from typing import Any

from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind

from busserve.bus import codec
from busserve.bus.client import Bus
from busserve.bus.nats_service import NatsService
from busserve.errors import BusserveError, MalformedMessage
from busserve.messages import Ack, EngineStatus, Error, KVEventBatch, RoutedRequest, StrategyResult
from busserve.router.cluster import ClusterView
from busserve.router.request import Request
from busserve.router.strategy import Cluster, StrategyFn, coerce_params, run_strategy
from busserve.telemetry import attributes as A
from busserve.telemetry import propagation
from busserve.telemetry.setup import tracer

log = logging.getLogger(__name__)


class StrategyProcess:
    def __init__(self, bus: Bus, name: str, fn: StrategyFn) -> None:
        self.bus = bus
        self.name = name
        self.fn = fn
        self.view = ClusterView(bus)
        self._subs: list[Any] = []
        self.nats_service: NatsService | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        s = self.bus.subjects
        self._subs.append(await self.bus.subscribe(s.engines_status(), self._on_status))
        self._subs.append(await self.bus.subscribe(s.all_kv_events(), self._on_kv))
        queue = f"busserve-strategy-{self.name}"
        service = NatsService("busserve-strategy", f"{self.name}-{uuid.uuid4().hex[:8]}",
                              f"a busserve strategy process serving {self.name!r}",
                              {"strategy": self.name, "host": socket.gethostname(), "subjects": s.root})
        service.add_endpoint("route", s.strategy(self.name), queue)
        self.nats_service = service
        await self.bus.serve_as(service)
        self._subs.append(await self.bus.subscribe(s.strategy(self.name), self._on_request, queue=queue,
                                                   service=service, endpoint="route"))
        await self.bus.nc.flush()

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if self.nats_service is not None:
            await self.bus.stop_serving(self.nats_service)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    async def _on_status(self, msg: Msg) -> None:
        with contextlib.suppress(MalformedMessage):
            self.view.on_status(codec.decode(msg.data, EngineStatus, msg.headers))

    async def _on_kv(self, msg: Msg) -> None:
        with contextlib.suppress(MalformedMessage):
            self.view.on_kv_events(codec.decode(msg.data, KVEventBatch, msg.headers))

    async def _on_request(self, msg: Msg) -> None:
        try:
            routed = codec.decode(msg.data, RoutedRequest | Ack, msg.headers)
        except MalformedMessage as exc:
            await self.bus.respond(msg, exc.error)
            return
        if isinstance(routed, Ack):
            await self.bus.respond(msg, Ack(detail=f"strategy {self.name} here"))
            return
        task = asyncio.create_task(self._run(msg, routed, propagation.extract(msg.headers)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, msg: Msg, routed: RoutedRequest, parent: Any) -> None:
        req = Request(request_id=routed.request_id, prompt_token_ids=list(routed.prompt_token_ids),
                      sampling=routed.sampling, stream_subject=routed.stream_subject, stream=routed.stream,
                      model=routed.model, strategy=self.name, label=routed.label, supervisor=routed.supervisor)
        error = None
        try:
            with tracer("busserve.strategy").start_as_current_span(
                f"strategy {self.name}", context=parent, kind=SpanKind.SERVER,
                attributes={A.REQUEST_ID: req.request_id, A.STRATEGY: self.name},
            ):
                await run_strategy(self.fn, req, Cluster(self.view, req.model), coerce_params(self.fn, routed.params))
        except BusserveError as exc:
            error = exc.to_error(req.request_id)
        except Exception as exc:
            log.exception("strategy %s failed", self.name)
            error = Error(code="internal", message=f"{type(exc).__name__}: {exc}", request_id=req.request_id)
        finally:
            self.view.load.release(req)
        await self.bus.respond(msg, StrategyResult(request_id=req.request_id, started_on=req.started_on,
                                                   touched=sorted(req.touched), error=error,
                                                   senders=sorted(req.senders)))
