"""busserve's processes as NATS services: discoverable and measured with the standard NATS tooling.

Every engine, router and strategy process is a service of the NATS services protocol ("micro"): it answers
``$SRV.PING``, ``$SRV.INFO`` and ``$SRV.STATS`` — for all services, for its kind (``busserve-engine``,
``busserve-router``, ``busserve-strategy``) and for its own id, which is its engine / router id — with the protocol's
own documents (``nats.micro``'s types). So ``nats micro ls`` lists a cluster's processes, ``nats micro info
busserve-engine`` their named, versioned endpoints (subject and queue group each), and ``nats micro stats`` the
per-endpoint request counts, errors and processing times. Errors also travel the protocol's way: every
:class:`Error` a process publishes carries the ``Nats-Service-Error`` and ``Nats-Service-Error-Code`` headers
(:func:`error_headers`, added by ``busserve.bus.client``) beside the typed body.

Why not ``nats.micro.Service``'s endpoints: each of those is its own subscription, and an engine needs one
subscription for all its actions so that they reach the compute thread in the order they were sent (an abort right
behind its prep_recv). So subscriptions stay busserve's (``Bus.subscribe(..., endpoint=...)``) and this module keeps
the counters the protocol reports:

* a request counts when it arrives, and ends with the first message its process publishes to the request's reply
  subject — the reply of an action, the first event of a generate's stream — or, if it has no reply subject, when its
  handler returns;
* it is an error if that first message is an :class:`Error`, or if the handler raised.

Requests that are never answered (a generate dropped for a forged reply subject, say) are forgotten after
``MAX_PENDING`` newer ones, so that nothing grows without bound.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import ERROR_CODE_HEADER, ERROR_HEADER
from nats.micro.service import (
    EndpointInfo,
    EndpointStats,
    ServiceInfo,
    ServicePing,
    ServiceStats,
    ServiceVerb,
    control_subject,
)

from busserve import __version__
from busserve.errors import http_status
from busserve.messages import Error

MAX_PENDING = 10_000
MAX_ERROR_HEADER = 1024  # characters of the message in the Nats-Service-Error header (the body has it whole)
_TOKEN = re.compile(r"^[A-Za-z0-9_:-]+$")  # one subject token, as busserve's ids are

Handler = Callable[[Msg], Awaitable[None]]


def error_headers(error: Error) -> dict[str, str]:
    """The services protocol's error headers for a busserve Error (the code as the HTTP status it maps to)."""
    # A header value is one line: newlines in a message would end the header block.
    text = " ".join(f"{error.code}: {error.message}".split())[:MAX_ERROR_HEADER]
    return {ERROR_HEADER: text, ERROR_CODE_HEADER: str(http_status(error.code))}


@dataclass
class Endpoint:
    """One named endpoint and what the protocol reports of it."""

    name: str
    subject: str
    queue_group: str = ""
    requests: int = 0
    errors: int = 0
    processing_ns: int = 0
    last_error: str = ""

    def finish(self, started_ns: int, error: str | None) -> None:
        self.processing_ns += time.perf_counter_ns() - started_ns
        if error is not None:
            self.errors += 1
            self.last_error = error

    def info(self) -> EndpointInfo:
        return EndpointInfo(name=self.name, subject=self.subject, queue_group=self.queue_group)

    def stats(self) -> EndpointStats:
        return EndpointStats(name=self.name, subject=self.subject, queue_group=self.queue_group,
                             num_requests=self.requests, num_errors=self.errors, processing_time=self.processing_ns,
                             average_processing_time=self.processing_ns // max(self.requests, 1),
                             last_error=self.last_error or None)


class NatsService:
    """One process's presence as a NATS service: its endpoints' counters and the ``$SRV`` control subjects."""

    def __init__(self, name: str, service_id: str, description: str, metadata: dict[str, str] | None = None
                 ) -> None:
        if not _TOKEN.match(service_id):
            raise ValueError(f"a service id must be one subject token of letters, digits, '-', '_' or ':': "
                             f"{service_id!r}")
        self.name = name
        self.id = service_id
        self.description = description
        self.metadata = dict(metadata or {})
        self.started = datetime.now(UTC)
        self.endpoints: dict[str, Endpoint] = {}
        self._pending: OrderedDict[str, tuple[Endpoint, int]] = OrderedDict()  # reply subject -> (endpoint, t0)
        self._subs: list[Subscription] = []

    # ------------------------------------------------------------------ endpoints

    def add_endpoint(self, name: str, subject: str, queue_group: str = "") -> Endpoint:
        return self.endpoints.setdefault(name, Endpoint(name, subject, queue_group))

    def metered(self, handler: Handler, endpoint: str | Callable[[Msg], str]) -> Handler:
        """``handler`` counting into ``endpoint`` (a name, or a function of the message naming one: several
        endpoints on one wildcard subscription)."""

        async def run(msg: Msg) -> None:
            name = endpoint if isinstance(endpoint, str) else endpoint(msg)
            ep = self.endpoints.get(name)
            if ep is None:
                await handler(msg)
                return
            ep.requests += 1
            started = time.perf_counter_ns()
            if msg.reply:
                self._pending[msg.reply] = (ep, started)
                while len(self._pending) > MAX_PENDING:
                    self._pending.popitem(last=False)
            try:
                await handler(msg)
            except Exception as exc:
                self._pending.pop(msg.reply, None)
                ep.finish(started, f"{type(exc).__name__}: {exc}")
                raise
            if not msg.reply:
                ep.finish(started, None)

        return run

    def published(self, subject: str, msg: Any) -> None:
        """Called for every message the process publishes: the first one to a request's reply subject ends it."""
        if not self._pending:
            return
        pending = self._pending.pop(subject, None)
        if pending is not None:
            ep, started = pending
            ep.finish(started, f"{msg.code}: {msg.message}" if isinstance(msg, Error) else None)

    # ------------------------------------------------------------------ the protocol's documents

    def ping(self) -> ServicePing:
        return ServicePing(id=self.id, name=self.name, version=__version__, metadata=self.metadata)

    def info(self) -> ServiceInfo:
        return ServiceInfo(name=self.name, id=self.id, version=__version__, description=self.description,
                           endpoints=[e.info() for e in self.endpoints.values()], metadata=self.metadata)

    def stats(self) -> ServiceStats:
        # nats.micro formats ``started`` as UTC without an offset.
        return ServiceStats(id=self.id, name=self.name, version=__version__,
                            started=self.started.replace(tzinfo=None),
                            endpoints=[e.stats() for e in self.endpoints.values()], metadata=self.metadata)

    async def start(self, nc: NATS) -> None:
        """Answer ``$SRV.<verb>``, ``$SRV.<verb>.<name>`` and ``$SRV.<verb>.<name>.<id>`` for the three verbs."""
        documents: dict[ServiceVerb, Callable[[], Any]] = {
            ServiceVerb.PING: self.ping, ServiceVerb.INFO: self.info, ServiceVerb.STATS: self.stats}
        for verb, document in documents.items():
            async def answer(msg: Msg, document: Callable[[], Any] = document) -> None:
                if msg.reply:
                    await nc.publish(msg.reply, json.dumps(document().to_dict()).encode())

            for subject in (control_subject(verb), control_subject(verb, name=self.name),
                            control_subject(verb, name=self.name, id=self.id)):
                self._subs.append(await nc.subscribe(subject, cb=answer))

    async def stop(self) -> None:
        for sub in self._subs:
            with contextlib.suppress(Exception):  # the connection may be closing already
                await sub.unsubscribe()
        self._subs.clear()
