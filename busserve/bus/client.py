"""The bus client every busserve process uses: typed publish, request-reply and stream reading over nats-py.

* ``publish``/``request``/``respond`` encode with the codec, add the Content-Type header and the W3C trace
  context, and translate nats-py failures into :mod:`busserve.errors` (no responders, time-outs, oversized
  payloads). A reply that is an :class:`Error` raises :class:`RemoteError`.
* ``open_stream`` subscribes to a stream subject and yields events until the terminal one (Final or Error);
  every wait is bounded, a TokenChunk out of index order ends the stream with a ``stream_gap`` Error (an event was
  lost: never silent), and while the request's owner is a router that has not handed it to an engine yet, the
  reader watches that router's heartbeat and ends with a ``router_failure`` Error if it stops. ``generate`` sends a
  GenerateRequest and streams its events, and cancels the request if the caller stops reading early.
* The connection notices a dead server within seconds (``ping_interval``) and keeps ``connected_since`` — the
  moment it last (re)connected — so that watchers do not mistake their own outage for everybody else's death.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from busserve.bus import codec
from busserve.bus.codec import ContentType
from busserve.bus.config import BusConfig
from busserve.bus.nats_service import NatsService, error_headers
from busserve.bus.subjects import Subjects
from busserve.errors import MalformedMessage, NoResponders, PayloadTooLarge, RemoteError, RequestTimeout
from busserve.messages import (
    Cancel,
    Error,
    Final,
    GenerateRequest,
    Resend,
    RouterStatus,
    StreamEvent,
    StreamStatus,
    TokenChunk,
)
from busserve.telemetry import propagation

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[Msg], Awaitable[None]]

# Time limits for a stream: the first event may wait behind a long prefill, later ones only behind one step.
DEFAULT_FIRST_EVENT_TIMEOUT_S = 300.0
DEFAULT_IDLE_TIMEOUT_S = 120.0
# After a loss on the way (a gap in TokenChunk.index), how long a reader waits for the missing events it asked for
# again, and how often it asks; and how long a started stream may be silent before the reader asks (its tail may
# have been lost with a server).
RESEND_WAIT_S = 4.0
RESEND_EVERY_S = 0.75
RESEND_IDLE_S = 5.0
# A process that misses this many heartbeats in a row is taken for dead (routers judge engines the same way).
MISSED_HEARTBEATS = 3
# Pings every PING_INTERVAL_S; this many unanswered and the connection is dropped and re-dialled.
PING_INTERVAL_S = 2.0
MAX_OUTSTANDING_PINGS = 2


def _is_no_responders(msg: Msg) -> bool:
    return bool(msg.headers) and msg.headers.get("Status") == "503" and not msg.data


class Bus:
    """A NATS connection plus the subject layout; one per process (or per independent component)."""

    def __init__(self, nc: NATS, subjects: Subjects, owner: str = "") -> None:
        self.nc = nc
        self.subjects = subjects
        # Who this connection is on a secured server (its user name): it sends requests and cancels under that
        # name and reads its replies and streams under ``_INBOX.<owner>``. "" on open servers.
        self.owner = owner
        self.connected_since: float | None = time.monotonic()  # None while disconnected
        self.reconnects = 0
        self.closing = False
        # The NATS services this connection is (busserve.bus.nats_service; one per component sharing it): the first
        # publish to a request's reply subject ends that request in its service's counters.
        self.services: list[NatsService] = []

    def connected_for(self) -> float:
        """Seconds since this connection last (re)connected; 0 while it is down."""
        return 0.0 if self.connected_since is None else time.monotonic() - self.connected_since

    @classmethod
    async def connect(cls, config: BusConfig, *, name: str) -> Bus:
        holder: list[Bus] = []
        seen: list[str] = []  # errors the server sent while connecting (an authorization violation, say)

        async def on_error(exc: Exception) -> None:
            if not holder:
                seen.append(str(exc))
            log.warning("nats (%s): %s", name, exc)

        async def on_disconnected() -> None:
            if holder:
                holder[0].connected_since = None
                if holder[0].closing:
                    return
            log.warning("nats (%s): disconnected", name)

        async def on_reconnected() -> None:
            if holder:
                holder[0].connected_since = time.monotonic()
                holder[0].reconnects += 1
            url = getattr(nc, "connected_url", None)
            log.warning("nats (%s): reconnected to %s", name, url.netloc if url else None)

        kwargs = config.connect_kwargs()
        owner = config.owner()
        kwargs["inbox_prefix"] = Subjects.inbox_prefix(owner)
        # nats-py can wait forever after some failures (a TLS verification error, say): bound the whole attempt.
        deadline = config.connect_timeout_s * config.connect_attempts * len(kwargs["servers"]) + 2.0
        nc = NATS()
        try:
            await asyncio.wait_for(nc.connect(name=name, error_cb=on_error, disconnected_cb=on_disconnected,
                                              reconnected_cb=on_reconnected, ping_interval=PING_INTERVAL_S,
                                              max_outstanding_pings=MAX_OUTSTANDING_PINGS, **kwargs),
                                   timeout=deadline)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            servers = ", ".join(kwargs["servers"])
            refused = next((e for e in seen if "authorization" in e.lower()), None)
            if refused is not None:
                who = f"user {config.user!r}" if config.user else "an anonymous connection"
                raise ConnectionError(f"NATS at {servers} refused {who} ({refused}): check the credentials "
                                      "(BUSSERVE_NATS_USER / BUSSERVE_NATS_PASSWORD, --nats-creds)") from exc
            raise ConnectionError(
                f"cannot reach NATS at {servers} ({exc or type(exc).__name__}); "
                "start one with `busserve up` or pass --nats URL"
            ) from exc
        # From now on reconnect as configured (nats-py reads these options at each reconnect).
        if config.max_reconnect_attempts == 0:
            nc.options["allow_reconnect"] = False
        nc.options["max_reconnect_attempts"] = config.max_reconnect_attempts
        nc.options["reconnect_time_wait"] = 1.0
        bus = cls(nc, Subjects(config.subject_prefix), owner)
        holder.append(bus)
        # Which node of a cluster this process rides on: what an operator (or a fault test) needs to know.
        url = nc.connected_url
        log.info("nats (%s): connected to %s", name, url.netloc if url else None)
        return bus

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def close(self) -> None:
        self.closing = True
        if self.nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.nc.drain(), timeout=5)
        with contextlib.suppress(Exception):
            await self.nc.close()

    # ------------------------------------------------------------------ sending

    def _prepare(self, msg: Any, content_type: ContentType, headers: dict[str, str] | None,
                 trace: bool = True) -> tuple[bytes, dict]:
        payload = codec.encode(msg, content_type)
        if isinstance(msg, Error):  # the services protocol's error headers beside the typed body
            headers = {**error_headers(msg), **(headers or {})}
        out = codec.headers_for(content_type, headers)
        if trace:
            propagation.inject(out)
        return payload, out

    def _check_size(self, payload: bytes, subject: str) -> None:
        # nats-py checks too, but only after encoding the whole protocol frame; say clearly what was too big.
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(len(payload), self.max_payload, subject)

    async def publish(
        self,
        subject: str,
        msg: Any,
        *,
        reply: str = "",
        content_type: ContentType = "msgpack",
        headers: dict[str, str] | None = None,
        trace: bool = True,
    ) -> None:
        """``trace=False`` skips the W3C headers (stream events: the request already carried them)."""
        payload, hdrs = self._prepare(msg, content_type, headers, trace)
        self._check_size(payload, subject)
        try:
            await self.nc.publish(subject, payload, reply=reply, headers=hdrs)
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(len(payload), self.max_payload, subject) from exc
        for service in self.services:
            service.published(subject, msg)

    async def publish_raw(self, subject: str, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self._check_size(payload, subject)
        await self.nc.publish(subject, payload, headers=headers)

    async def request(
        self,
        subject: str,
        msg: Any,
        reply_type: type[T],
        *,
        timeout_s: float,
        content_type: ContentType = "msgpack",
        headers: dict[str, str] | None = None,
    ) -> T:
        """Send ``msg`` and wait for one reply of ``reply_type``; an Error reply raises RemoteError."""
        payload, hdrs = self._prepare(msg, content_type, headers)
        self._check_size(payload, subject)
        try:
            reply = await self.nc.request(subject, payload, timeout=timeout_s, headers=hdrs)
        except nats.errors.NoRespondersError as exc:
            raise NoResponders(subject) from exc
        except (TimeoutError, nats.errors.TimeoutError) as exc:
            raise RequestTimeout(subject, timeout_s) from exc
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(len(payload), self.max_payload, subject) from exc
        decoded: Any = codec.decode(reply.data, reply_type | Error, reply.headers)  # type: ignore[operator]
        if isinstance(decoded, Error):
            raise RemoteError(decoded)
        return decoded  # type: ignore[no-any-return]

    async def respond(self, request: Msg, msg: Any, *, content_type: ContentType | None = None) -> None:
        """Reply to ``request`` (in the encoding it arrived in, unless told otherwise). No-op without reply-to."""
        if not request.reply:
            return
        if content_type is None:
            content_type = request_content_type(request)
        try:
            await self.publish(request.reply, msg, content_type=content_type)
        except PayloadTooLarge as exc:
            await self.publish(request.reply, exc.to_error(), content_type=content_type)

    async def subscribe(self, subject: str, handler: Handler, *, queue: str = "",
                        service: NatsService | None = None, endpoint: str | Callable[[Msg], str] = "") -> Subscription:
        """With ``service``: the messages count into its ``endpoint`` (a function of the message where one
        subscription serves several endpoints)."""
        if service is not None:
            handler = service.metered(handler, endpoint)
        return await self.nc.subscribe(subject, queue=queue, cb=_guarded(handler, subject))

    async def serve_as(self, service: NatsService) -> None:
        """Answer the services protocol as ``service`` (before subscribing its endpoints)."""
        self.services.append(service)
        await service.start(self.nc)

    async def stop_serving(self, service: NatsService) -> None:
        if service in self.services:
            self.services.remove(service)
        await service.stop()

    # ------------------------------------------------------------------ streams

    @contextlib.asynccontextmanager
    async def open_stream(self, subject: str | None = None) -> AsyncIterator[StreamReader]:
        """Subscribe to a stream subject (a fresh inbox by default) before anything is published to it."""
        subject = subject or self.nc.new_inbox()
        sub = await self.nc.subscribe(subject)
        try:
            yield StreamReader(subject, sub, self)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def generate(
        self,
        request: GenerateRequest,
        *,
        subject: str | None = None,
        content_type: ContentType = "msgpack",
        first_event_timeout_s: float = DEFAULT_FIRST_EVENT_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        statuses: bool = False,
    ) -> AsyncIterator[StreamEvent]:
        """Publish a GenerateRequest (to the router by default) and yield its events up to the terminal one
        (``statuses``: StreamStatus events too, which say who holds the request).

        Leaving the loop early (break, exception, task cancelled) cancels the request on the servers.
        """
        if request.request_id is None:
            request.request_id = uuid.uuid4().hex
        target = subject or self.subjects.generate(self.owner)
        finished = False
        async with self.open_stream() as stream:
            await self.publish(target, request, reply=stream.subject, content_type=content_type)
            try:
                async for event in stream.events(
                    first_event_timeout_s=first_event_timeout_s, idle_timeout_s=idle_timeout_s, target=target,
                    statuses=statuses, label=request.request_id,
                ):
                    if isinstance(event, (Final, Error)):
                        finished = True
                    yield event
            except NoResponders:
                finished = True  # nobody received it: nothing to cancel
                raise
            finally:
                if not finished:
                    with contextlib.suppress(Exception):
                        await self.publish(
                            self.subjects.cancel(self.owner), Cancel(request_id=request.request_id,
                                                                     reason="client gone")
                        )


class StreamReader:
    """Reads one request's stream subject until its terminal event (see the module docstring for the checks)."""

    def __init__(self, subject: str, sub: Subscription, bus: Bus | None = None) -> None:
        self.subject = subject
        self._sub = sub
        self._bus = bus

    async def events(
        self,
        *,
        first_event_timeout_s: float = DEFAULT_FIRST_EVENT_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        target: str = "",
        statuses: bool = False,
        label: str = "",
    ) -> AsyncIterator[StreamEvent]:
        """``statuses``: yield StreamStatus events too (they are consumed here otherwise). ``label``: the request's
        id (else taken from its first event), for asking the events again after a loss (``Resend``)."""
        next_index = 0
        first_wait = True
        watch = _RouterWatch(self._bus)
        ahead: dict[int, TokenChunk] = {}  # chunks that came past a gap, by index, until the gap is filled
        held: Final | Error | None = None  # a terminal event that came while tokens were missing
        gap_since: float | None = None
        asked_at = 0.0
        idle_since = time.monotonic()
        reconnects = self._bus.reconnects if self._bus is not None else 0
        try:
            while True:
                now = time.monotonic()
                if gap_since is not None:
                    if now - gap_since > RESEND_WAIT_S:
                        yield Error(code="stream_gap", request_id=label,
                                    message=f"token index {min(ahead)} arrived where {next_index} was due and the "
                                            f"missing tokens did not come again within {RESEND_WAIT_S:g}s")
                        return
                    if now - asked_at >= RESEND_EVERY_S:
                        await self._ask_again(label, next_index)
                        asked_at = now
                    budget = RESEND_EVERY_S
                elif first_wait:
                    budget = first_event_timeout_s - (now - idle_since)
                else:
                    # Silence mid-stream (the tail may have been lost with a server): ask once per quiet spell.
                    budget = min(RESEND_IDLE_S, idle_timeout_s - (now - idle_since))
                try:
                    msg = await self._next(max(budget, 0.0), watch, target)
                except RequestTimeout:
                    quiet = time.monotonic() - idle_since
                    if gap_since is not None or (not first_wait and quiet < idle_timeout_s):
                        if gap_since is None:
                            await self._ask_again(label, next_index)
                        continue
                    raise
                idle_since = time.monotonic()
                if msg is None:  # the router holding the request stopped before an engine took it
                    yield Error(code="router_failure", request_id="",
                                message=f"router {watch.router} stopped heartbeating before any engine took the "
                                        "request")
                    return
                if _is_no_responders(msg):
                    raise NoResponders(target or self.subject)
                if self._bus is not None and self._bus.reconnects != reconnects:
                    reconnects = self._bus.reconnects  # our server went away meanwhile: events may be lost
                    if not first_wait:
                        await self._ask_again(label, next_index)
                try:
                    event: StreamEvent = codec.decode(msg.data, StreamEvent, msg.headers)
                except MalformedMessage as exc:
                    log.warning("undecodable event on %s: %s", self.subject, exc)
                    continue
                if isinstance(event, StreamStatus):
                    await watch.follow(event)
                    if statuses:
                        yield event
                    continue
                first_wait = False
                label = label or event.request_id
                if isinstance(event, TokenChunk):
                    watch.stop()
                    end = event.index + len(event.token_ids)
                    if end <= next_index:
                        continue  # sent again after a loss: we have it
                    if event.index < next_index:
                        yield Error(code="stream_gap", request_id=event.request_id,
                                    message=f"token index {event.index} arrived where {next_index} was due: tokens "
                                            "repeated on the way")
                        return
                    if event.index > next_index:  # something was lost: ask for it, keep what came meanwhile
                        ahead[event.index] = event
                        if gap_since is None:
                            gap_since, asked_at = time.monotonic(), 0.0
                        continue
                    yield event
                    next_index = end
                    while next_index in ahead:
                        chunk = ahead.pop(next_index)
                        yield chunk
                        next_index += len(chunk.token_ids)
                    ahead = {i: c for i, c in ahead.items() if i + len(c.token_ids) > next_index}
                    if not ahead:
                        gap_since = None
                        if held is not None:
                            yield held
                            return
                    continue
                if isinstance(event, (Final, Error)):
                    if gap_since is not None:
                        held = held or event  # its tokens first
                        continue
                    yield event
                    return
                yield event
        finally:
            watch.stop()

    async def _ask_again(self, label: str, from_index: int) -> None:
        """Ask (through the routers) for this stream's events again from ``from_index`` (Resend)."""
        if self._bus is None or not label:
            return
        with contextlib.suppress(Exception):
            await self._bus.publish(self._bus.subjects.resend(self._bus.owner),
                                    Resend(request_id=label, from_index=from_index))

    async def _next(self, budget_s: float, watch: _RouterWatch, target: str) -> Msg | None:
        """The next message within ``budget_s``; None if the watched router is dead first."""
        deadline = time.monotonic() + budget_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RequestTimeout(target or self.subject, budget_s)
            try:
                return await self._sub.next_msg(timeout=min(left, 0.5) if watch.active else left)
            except nats.errors.TimeoutError:
                if watch.dead():
                    return None


class _RouterWatch:
    """While a router owns a request (it said so on the stream and no engine has taken it), watch its heartbeat."""

    def __init__(self, bus: Bus | None) -> None:
        self._bus = bus
        self._sub: Subscription | None = None
        self.router = ""
        self._interval = 1.0
        self._last_seen = 0.0

    @property
    def active(self) -> bool:
        return self._sub is not None

    async def follow(self, status: StreamStatus) -> None:
        if status.owner_kind != "router" or self._bus is None:
            self.stop()  # an engine has it: its router supervises it from here
            return
        if self._sub is not None:
            return
        self.router, self._interval = status.owner, max(status.heartbeat_s, 0.1)
        self._last_seen = time.monotonic()

        async def on_status(msg: Msg) -> None:
            with contextlib.suppress(MalformedMessage):
                if codec.decode(msg.data, RouterStatus, msg.headers).router_id == self.router:
                    self._last_seen = time.monotonic()

        self._sub = await self._bus.nc.subscribe(self._bus.subjects.routers_status(), cb=on_status)

    def dead(self) -> bool:
        if self._sub is None or self._bus is None:
            return False
        limit = MISSED_HEARTBEATS * self._interval + 0.5
        # Our own outage is not the router's death: judge only over a span we were connected for.
        return time.monotonic() - self._last_seen > limit and self._bus.connected_for() > limit

    def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().create_task(sub.unsubscribe())


def request_content_type(msg: Msg) -> ContentType:
    try:
        return codec.content_type_of(msg.data, msg.headers)
    except MalformedMessage:
        return "json"


def _guarded(handler: Handler, subject: str) -> Handler:
    """One bad message must never stop a subscription: log and carry on."""

    async def run(msg: Msg) -> None:
        try:
            await handler(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("handler for %s failed on a message to %s", subject, msg.subject)

    return run
