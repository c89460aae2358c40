"""W3C trace context in NATS headers.

Outgoing messages carry ``traceparent``/``tracestate`` of the current span (nothing when no span is active), and
handlers continue the trace found on an incoming message — including a caller's own ``traceparent``, so a
service that calls busserve sees busserve's spans inside its trace.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current trace context to ``headers`` (in place) and return them."""
    propagate.inject(headers)
    return headers


def extract(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context carried by an incoming message's headers (empty context if none)."""
    if not headers:
        return otel_context.Context()
    # NATS header names keep the sender's case; the W3C propagator looks up lower-case keys.
    return propagate.extract({k.lower(): v for k, v in headers.items()})
