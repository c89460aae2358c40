"""Typed exceptions. Each carries an :class:`Error` message so that it can be put on a stream as data.

Code that talks to the bus catches these, never nats-py's own exceptions: ``busserve.bus.client`` translates
no-responders, time-outs and oversized payloads into them. :data:`HTTP_STATUS` is what each error code means in
HTTP terms: the OpenAI front's status codes and the NATS services protocol's ``Nats-Service-Error-Code``.
"""

from __future__ import annotations

from busserve.messages import Error, ErrorCode

HTTP_STATUS: dict[str, int] = {
    "invalid_request": 400, "malformed": 400, "payload_too_large": 413, "prompt_too_long": 400, "conflict": 409,
    "unknown_model": 404, "unknown_request": 404, "no_engine": 503, "overloaded": 429, "timeout": 504,
    "engine_failure": 503, "router_failure": 503, "stream_gap": 502, "lease_expired": 503, "transfer_failed": 503,
}


def http_status(code: str) -> int:
    """The HTTP status of an error code (500 for ``internal`` and anything unknown)."""
    return HTTP_STATUS.get(code, 500)


class BusserveError(Exception):
    """Base class: a failure that has a wire form."""

    code: ErrorCode = "internal"

    def __init__(self, message: str, *, field: str | None = None, request_id: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.request_id = request_id

    def to_error(self, request_id: str | None = None) -> Error:
        return Error(
            code=self.code,
            message=self.message,
            field=self.field,
            request_id=request_id if request_id is not None else self.request_id,
        )


class NoResponders(BusserveError):
    """Nobody is subscribed to the subject a request was sent to."""

    code: ErrorCode = "no_engine"

    def __init__(self, subject: str) -> None:
        super().__init__(f"no responders on {subject}")
        self.subject = subject


class RequestTimeout(BusserveError):
    code: ErrorCode = "timeout"

    def __init__(self, subject: str, timeout_s: float) -> None:
        super().__init__(f"no reply on {subject} within {timeout_s:g}s")
        self.subject = subject
        self.timeout_s = timeout_s


class PayloadTooLarge(BusserveError):
    code: ErrorCode = "payload_too_large"

    def __init__(self, size: int, max_payload: int, subject: str = "") -> None:
        super().__init__(f"payload of {size} bytes exceeds the server's max_payload of {max_payload} bytes")
        self.size = size
        self.max_payload = max_payload
        self.subject = subject


class MalformedMessage(BusserveError):
    """A payload that does not decode, or decodes to values out of range."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message, field=error.field, request_id=error.request_id)
        self.error = error
        self.code = error.code

    @classmethod
    def of(cls, message: str) -> MalformedMessage:
        return cls(Error(code="malformed", message=message))


class RemoteError(BusserveError):
    """The other side answered with an Error."""

    def __init__(self, error: Error) -> None:
        super().__init__(error.message, field=error.field, request_id=error.request_id)
        self.error = error
        self.code = error.code

    def to_error(self, request_id: str | None = None) -> Error:
        if request_id is None or request_id == self.error.request_id:
            return self.error
        return Error(code=self.error.code, message=self.error.message, field=self.error.field, request_id=request_id)
