"""The bus client every busserve process uses: typed publish, request-reply and stream reading over nats-py.

* ``publish``/``request``/``respond`` encode with the codec, add the Content-Type header and the W3C trace
  context, and translate nats-py failures into :mod:`busserve.errors` (no responders, time-outs, oversized
  payloads). A reply that is an :class:`Error` raises :class:`RemoteError`.
* ``open_stream`` subscribes to a stream subject and yields events until the terminal one (Final or Error);
  every wait is bounded. ``generate`` sends a GenerateRequest and streams its events, and cancels the request if
  the caller stops reading early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
from busserve.bus.subjects import Subjects
from busserve.errors import MalformedMessage, NoResponders, PayloadTooLarge, RemoteError, RequestTimeout
from busserve.messages import Cancel, Error, Final, GenerateRequest, StreamEvent
from busserve.telemetry import propagation

log = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[[Msg], Awaitable[None]]

# Time limits for a stream: the first event may wait behind a long prefill, later ones only behind one step.
DEFAULT_FIRST_EVENT_TIMEOUT_S = 300.0
DEFAULT_IDLE_TIMEOUT_S = 120.0


def _is_no_responders(msg: Msg) -> bool:
    return bool(msg.headers) and msg.headers.get("Status") == "503" and not msg.data


class Bus:
    """A NATS connection plus the subject layout; one per process (or per independent component)."""

    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects

    @classmethod
    async def connect(cls, config: BusConfig, *, name: str) -> Bus:
        async def on_error(exc: Exception) -> None:
            log.warning("nats (%s): %s", name, exc)

        kwargs = config.connect_kwargs()
        # nats-py can wait forever after some failures (a TLS verification error, say): bound the whole attempt.
        deadline = config.connect_timeout_s * config.connect_attempts * len(kwargs["servers"]) + 2.0
        nc = NATS()
        try:
            await asyncio.wait_for(nc.connect(name=name, error_cb=on_error, **kwargs), timeout=deadline)
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            servers = ", ".join(kwargs["servers"])
            raise ConnectionError(
                f"cannot reach NATS at {servers} ({exc or type(exc).__name__}); "
                "start one with `busserve up` or pass --nats URL"
            ) from exc
        # From now on reconnect as configured (nats-py reads these options at each reconnect).
        if config.max_reconnect_attempts == 0:
            nc.options["allow_reconnect"] = False
        nc.options["max_reconnect_attempts"] = config.max_reconnect_attempts
        nc.options["reconnect_time_wait"] = 1.0
        return cls(nc, Subjects(config.subject_prefix))

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def close(self) -> None:
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

    async def subscribe(self, subject: str, handler: Handler, *, queue: str = "") -> Subscription:
        return await self.nc.subscribe(subject, queue=queue, cb=_guarded(handler, subject))

    # ------------------------------------------------------------------ streams

    @contextlib.asynccontextmanager
    async def open_stream(self, subject: str | None = None) -> AsyncIterator[StreamReader]:
        """Subscribe to a stream subject (a fresh inbox by default) before anything is published to it."""
        subject = subject or self.nc.new_inbox()
        sub = await self.nc.subscribe(subject)
        try:
            yield StreamReader(subject, sub)
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
    ) -> AsyncIterator[StreamEvent]:
        """Publish a GenerateRequest (to the router by default) and yield its events up to the terminal one.

        Leaving the loop early (break, exception, task cancelled) cancels the request on the servers.
        """
        if request.request_id is None:
            request.request_id = uuid.uuid4().hex
        target = subject or self.subjects.generate()
        finished = False
        async with self.open_stream() as stream:
            await self.publish(target, request, reply=stream.subject, content_type=content_type)
            try:
                async for event in stream.events(
                    first_event_timeout_s=first_event_timeout_s, idle_timeout_s=idle_timeout_s, target=target
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
                            self.subjects.cancel(), Cancel(request_id=request.request_id, reason="client gone")
                        )


class StreamReader:
    """Reads one request's stream subject until its terminal event."""

    def __init__(self, subject: str, sub: Subscription) -> None:
        self.subject = subject
        self._sub = sub

    async def events(
        self,
        *,
        first_event_timeout_s: float = DEFAULT_FIRST_EVENT_TIMEOUT_S,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        target: str = "",
    ) -> AsyncIterator[StreamEvent]:
        timeout = first_event_timeout_s
        while True:
            try:
                msg = await self._sub.next_msg(timeout=timeout)
            except nats.errors.TimeoutError as exc:
                raise RequestTimeout(target or self.subject, timeout) from exc
            if _is_no_responders(msg):
                raise NoResponders(target or self.subject)
            try:
                event: StreamEvent = codec.decode(msg.data, StreamEvent, msg.headers)
            except MalformedMessage as exc:
                log.warning("undecodable event on %s: %s", self.subject, exc)
                continue
            yield event
            if isinstance(event, (Final, Error)):
                return
            timeout = idle_timeout_s


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
