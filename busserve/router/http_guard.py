"""What stands between the internet and the OpenAI front: API keys, a body-size limit, per-key rate and
concurrency limits. An ASGI middleware, so streamed responses pass through untouched and a refused request costs
no JSON parsing, no tokenization and nothing on the bus.

* **Keys** (``Authorization: Bearer <key>``, as OpenAI's clients send them): from a file (one key per line,
  optionally ``name key``; ``#`` comments) and/or ``BUSSERVE_API_KEYS`` (comma-separated). With none configured
  the front is open and says so once at start-up. ``/health`` is always open (load balancers probe it).
  Keys are compared in constant time.
* **Body limit**: a declared ``Content-Length`` over it is refused before reading; a chunked body is counted as it
  arrives and refused once it passes the limit (413).
* **Rate**: a token bucket per key (``rate`` requests per second, ``burst`` at once) and a bound on the key's
  requests in progress, streams included; over either, 429 with ``Retry-After``.

Every refusal is OpenAI-shaped JSON, like the front's own errors.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # a 128k-token prompt as token ids is ~1 MB of JSON
OPEN_PATHS = frozenset({"/health"})


def load_api_keys(path: str | None, env: str | None = None) -> dict[str, str]:
    """``key → name`` from the keys file and the ``BUSSERVE_API_KEYS`` value (``env``)."""
    keys: dict[str, str] = {}
    if path:
        for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) > 2:
                raise ValueError(f"{path}:{n}: expected 'KEY' or 'NAME KEY'")
            name, key = (parts[0], parts[1]) if len(parts) == 2 else (f"key-{len(keys) + 1}", parts[0])
            keys[key] = name
    for i, key in enumerate(k.strip() for k in (env or "").split(",")):
        if key:
            keys[key] = f"env-{i + 1}"
    return keys


@dataclass
class Limits:
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    rate_per_s: float = 0.0  # requests per second per key; 0: no rate limit
    burst: int = 0  # requests a key may send at once (default: one second's worth, at least 1)
    max_concurrent: int = 0  # requests in progress per key; 0: no bound


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    in_progress: int = 0


@dataclass
class Guard:
    """The middleware. ``keys``: key → name (empty: open)."""

    app: ASGIApp
    keys: dict[str, str] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    refused: dict[int, int] = field(default_factory=dict)  # status → count

    def __post_init__(self) -> None:
        if not self.keys:
            log.warning("the HTTP front has no API keys: anyone who reaches its port may use it "
                        "(--api-keys-file FILE or BUSSERVE_API_KEYS)")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        who = "anonymous"
        if self.keys:
            name = self._authenticate(headers.get("authorization", ""))
            if name is None:
                await self._refuse(send, 401, "invalid_api_key", "a valid API key is needed: send it as "
                                   "'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"})
                return
            who = name
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            await self._refuse(send, 413, "payload_too_large", f"the body has {declared} bytes; the limit is "
                               f"{self.limits.max_body_bytes}")
            return
        wait_s = self._admit(who)
        if wait_s is not None:
            await self._refuse(send, 429, "rate_limited", f"too many requests for {who}: try again in "
                               f"{wait_s:.1f}s", {"Retry-After": str(max(1, math.ceil(wait_s)))})
            return
        bucket = self._buckets.get(who)
        if bucket is not None:
            bucket.in_progress += 1
        try:
            await self._pass(scope, receive, send)
        finally:
            if bucket is not None:
                bucket.in_progress -= 1

    def _authenticate(self, header: str) -> str | None:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        found = None
        for key, name in self.keys.items():  # every key compared: the time taken says nothing of which matched
            if hmac.compare_digest(key.encode(), token.strip().encode()):
                found = name
        return found

    def _admit(self, who: str) -> float | None:
        """None if ``who`` may send one more request now, else seconds until it may."""
        lim = self.limits
        if lim.rate_per_s <= 0 and lim.max_concurrent <= 0:
            return None
        now = self.clock()
        burst = float(lim.burst or max(1, math.ceil(lim.rate_per_s)))
        bucket = self._buckets.setdefault(who, _Bucket(tokens=burst, stamp=now))
        if lim.max_concurrent > 0 and bucket.in_progress >= lim.max_concurrent:
            return 1.0  # a slot frees when one of its requests ends; no better estimate
        if lim.rate_per_s > 0:
            bucket.tokens = min(burst, bucket.tokens + (now - bucket.stamp) * lim.rate_per_s)
            bucket.stamp = now
            if bucket.tokens < 1.0:
                return (1.0 - bucket.tokens) / lim.rate_per_s
            bucket.tokens -= 1.0
        return None

    async def _pass(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Call the app, counting the body as it arrives; past the limit it gets an empty, finished body and
        the client a 413 (unless the app already started answering)."""
        seen = 0
        over = False
        started = False

        async def counted_receive() -> Message:
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limits.max_body_bytes:
                    over = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if over:
                return  # the app answered a truncated body: the 413 below goes out instead
            started = True
            await send(msg)

        await self.app(scope, counted_receive, guarded_send)
        if over and not started:
            await self._refuse(send, 413, "payload_too_large",
                               f"the body passed the limit of {self.limits.max_body_bytes} bytes")

    async def _refuse(self, send: Send, status: int, code: str, message: str,
                      extra: dict[str, str] | None = None) -> None:
        self.refused[status] = self.refused.get(status, 0) + 1
        kind = {401: "authentication_error", 413: "invalid_request_error", 429: "rate_limit_error"}[status]
        body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

