"""What the router records: one root span per request (continuing the caller's trace), client spans for each
sub-request (from ``busserve.router.cluster``), and the serving histograms — measured where the router already
watches every stream.

Names follow OpenTelemetry's GenAI semantic conventions where they apply (``gen_ai.*``); the rest are
``busserve.*``. Histograms in seconds use bucket boundaries suited to LLM latencies.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from busserve.messages import Error, Final
from busserve.telemetry import attributes as A
from busserve.telemetry.setup import meter, tracer

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   25.0, 50.0, 100.0]


class RouterTelemetry:
    def __init__(self, router_id: str, active_strategy: Any, in_flight: Any) -> None:
        m = meter("busserve.router")
        self.router_id = router_id
        self.ttft = m.create_histogram(A.METRIC_TTFT, unit="s", description="Time to first token, seen at the router",
                                       explicit_bucket_boundaries_advisory=LATENCY_BUCKETS)
        self.tpot = m.create_histogram(A.METRIC_TPOT, unit="s", description="(E2E - TTFT) / (output tokens - 1)",
                                       explicit_bucket_boundaries_advisory=LATENCY_BUCKETS)
        self.itl = m.create_histogram("busserve.inter_token_latency", unit="s",
                                      description="Time between consecutive token events of a stream",
                                      explicit_bucket_boundaries_advisory=LATENCY_BUCKETS)
        self.e2e = m.create_histogram(A.METRIC_E2E, unit="s", description="Request duration, accepted to terminal",
                                      explicit_bucket_boundaries_advisory=LATENCY_BUCKETS)
        self.requests = m.create_counter("busserve.requests", unit="{request}",
                                         description="Requests by outcome and strategy")
        self.tokens = m.create_counter(A.METRIC_TOKENS, unit="{token}", description="Prompt and output tokens")
        self.resumes = m.create_counter("busserve.router.resumes", unit="{request}",
                                        description="Requests resumed on another engine after theirs was lost")

        self.migrations = m.create_counter("busserve.router.migrations", unit="{request}",
                                           description="Live migrations of running requests, by reason and outcome")
        self.migration_pause = m.create_histogram(
            "busserve.router.migration.pause", unit="s", description="How long a migrated request was stopped",
            explicit_bucket_boundaries_advisory=LATENCY_BUCKETS)
        self.migration_bytes = m.create_counter("busserve.router.migration.bytes", unit="By",
                                                description="KV bytes copied by live migrations")

        def strategy_gauge(options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(1, {"busserve.strategy": active_strategy().name, "busserve.router.id": router_id})

        def in_flight_gauge(options: CallbackOptions) -> Iterable[Observation]:
            yield Observation(len(in_flight()), {"busserve.router.id": router_id})

        m.create_observable_gauge("busserve.router.active_strategy", callbacks=[strategy_gauge],
                                  description="1 for the strategy new requests get")
        m.create_observable_gauge("busserve.router.in_flight", callbacks=[in_flight_gauge], unit="{request}")

    @contextmanager
    def request_span(self, req: Any, parent: Context | None, operation: str) -> Iterator[trace.Span]:
        """The request's root span (a child of the caller's span when the request carried ``traceparent``)."""
        model = req.model or "default"
        s = req.sampling
        attrs = {
            A.OPERATION: operation, A.PROVIDER: "busserve", A.REQUEST_MODEL: model, A.REQUEST_ID: req.request_id,
            A.REQUEST_MAX_TOKENS: s.max_tokens, A.REQUEST_TEMPERATURE: s.temperature, A.REQUEST_TOP_P: s.top_p,
            A.STRATEGY: req.strategy, A.USAGE_INPUT_TOKENS: req.prompt_len, A.ROUTER_ID: self.router_id,
        }
        if s.top_k:
            attrs[A.REQUEST_TOP_K] = s.top_k
        if s.seed is not None:
            attrs[A.REQUEST_SEED] = s.seed
        with tracer("busserve.router").start_as_current_span(f"{operation} {model}", context=parent,
                                                             kind=SpanKind.SERVER, attributes=attrs) as span:
            yield span

    def on_tokens(self, flight: Any, n: int) -> None:
        now = time.monotonic()
        last = getattr(flight, "last_token_at", None)
        if last is not None:
            self.itl.record(now - last)
        flight.last_token_at = now

    def on_resume(self, flight: Any, lost: str) -> None:
        self.resumes.add(1, {"busserve.strategy": flight.strategy, A.ENGINE_ID: lost})

    def on_migration(self, moved: Any, reason: str) -> None:
        labels = {"busserve.migration.reason": reason, "busserve.outcome": "ok" if moved.ok else "error"}
        self.migrations.add(1, labels)
        if moved.ok:
            self.migration_pause.record(moved.pause_s, {"busserve.migration.reason": reason})
            self.migration_bytes.add(moved.bytes_sent, {"busserve.migration.reason": reason})

    def on_finish(self, flight: Any, outcome: str, span: trace.Span | None = None) -> None:
        now = time.monotonic()
        event = flight.terminal_event
        cancelled = isinstance(event, Final) and event.finish_reason == "cancelled"
        labels = {"busserve.strategy": flight.strategy, "busserve.outcome": "cancelled" if cancelled else outcome}
        self.requests.add(1, labels)
        self.e2e.record(now - flight.started, labels)
        if flight.first_token_at is not None:
            self.ttft.record(flight.first_token_at - flight.started, labels)
            if flight.tokens > 1:
                self.tpot.record((now - flight.first_token_at) / (flight.tokens - 1), labels)
        self.tokens.add(flight.req.prompt_len - flight.req.output_offset, {A.TOKEN_TYPE: "input"})
        self.tokens.add(flight.tokens, {A.TOKEN_TYPE: "output"})
        if span is not None and span.is_recording():
            span.set_attribute(A.USAGE_OUTPUT_TOKENS, flight.tokens)
            if flight.req.started_on:
                span.set_attribute(A.ENGINE_ID, flight.req.started_on)
            if isinstance(event, Final):
                span.set_attribute(A.RESPONSE_FINISH_REASONS, [event.finish_reason])
                if event.usage is not None:
                    span.set_attribute(A.USAGE_CACHED_INPUT_TOKENS, event.usage.cached_tokens)
            elif isinstance(event, Error):
                span.set_status(Status(StatusCode.ERROR, event.message))
                span.set_attribute(A.ERROR_TYPE, event.code)
            if flight.first_token_at is not None:
                span.set_attribute(A.TTFT, flight.first_token_at - flight.started)


@contextmanager
def sub_request_span(action: str, engine_id: str, request_id: str, **attrs: Any) -> Iterator[trace.Span]:
    """A client span around one sub-request; bus.request injects it into the message's trace context."""
    with tracer("busserve.router").start_as_current_span(
        action, kind=SpanKind.CLIENT,
        attributes={A.ENGINE_ID: engine_id, A.REQUEST_ID: request_id, A.ACTION: action, **attrs},
    ) as span:
        yield span
