"""What an engine records. Metrics are read from the core's own state (observable gauges) or counted at a
request's end; spans are built at the end too, from timestamps the compute thread stores as plain integers —
so the step loop itself pays nothing for tracing.

Spans (children of the sub-request span that reached the engine, via the message's ``traceparent``):
  * ``generate``   — the request on this engine: ``queue`` → ``prefill`` (tokens computed / from cache)
                     → ``decode`` (tokens, finish reason);
  * ``prep_recv``  — matched prefix, pages reserved;
  * ``remote_send``— ``prefill`` on the sender, and ``kv_transfer`` (backend, bytes, layers, busy time).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import SpanKind, Status, StatusCode

from busserve.engine.requests import GenerateCtx, SendCtx
from busserve.engine.sequence import SeqKind, Sequence
from busserve.telemetry import attributes as A
from busserve.telemetry.router_telemetry import LATENCY_BUCKETS
from busserve.telemetry.setup import meter, tracer

if TYPE_CHECKING:
    from busserve.engine.engine_core import EngineCore


class EngineTelemetry:
    def __init__(self, core: EngineCore, *, tracing: bool) -> None:
        self.core = core
        self.tracing = tracing
        self.labels = {A.ENGINE_ID: core.config.engine_id}
        m = meter("busserve.engine")
        self.requests = m.create_counter("busserve.engine.requests", unit="{request}",
                                         description="Requests ended on this engine, by outcome")
        self.prompt_tokens = m.create_counter("busserve.engine.prompt_tokens", unit="{token}",
                                              description="Prompt tokens computed here or taken from cache/transfer")
        self.output_tokens = m.create_counter("busserve.engine.output_tokens", unit="{token}")
        self.kv_bytes = m.create_counter("busserve.kv_transfer.bytes", unit="By", description="KV bytes sent")
        self.kv_seconds = m.create_histogram("busserve.kv_transfer.duration", unit="s",
                                             description="remote_send, received to last byte landed",
                                             explicit_bucket_boundaries_advisory=LATENCY_BUCKETS)
        sched, alloc, cache = core.scheduler, core.allocator, core.cache

        def make(fn: Any) -> Any:
            def cb(options: CallbackOptions) -> Iterable[Observation]:
                yield Observation(fn(), self.labels)
            return cb

        m.create_observable_gauge("busserve.engine.queue_depth", [make(lambda: len(sched.waiting))],
                                  unit="{request}", description="Requests waiting to be scheduled")
        m.create_observable_gauge("busserve.engine.running", [make(lambda: len(sched.running))],
                                  unit="{request}", description="Requests in the running batch")
        m.create_observable_gauge("busserve.engine.parked", [make(lambda: len(sched.parked))],
                                  unit="{request}", description="Requests parked by prep_recv")
        m.create_observable_gauge("busserve.engine.kv_pages_free", [make(lambda: alloc.free_count)], unit="{page}")
        m.create_observable_gauge("busserve.engine.kv_pages_used",
                                  [make(lambda: alloc.num_pages - alloc.free_count)], unit="{page}")
        m.create_observable_gauge("busserve.engine.kv_pages_cached", [make(lambda: cache.num_pages)], unit="{page}")
        m.create_observable_gauge("busserve.engine.prefix_cache_hit_rate", [make(lambda: cache.hit_rate)],
                                  unit="1", description="Prompt tokens found in the prefix cache / tokens looked up")
        core.on_finish = self.on_finish
        core.protocol.on_prep_recv = self.on_prep_recv

    # ------------------------------------------------------------------ hooks (compute thread)

    def on_finish(self, seq: Sequence, outcome: str) -> None:
        now = time.time_ns()
        if seq.kind is SeqKind.SEND:
            self._sent(seq, outcome, now)
            return
        ctx: GenerateCtx = seq.ctx
        self.requests.add(1, {**self.labels, "busserve.outcome": outcome})
        self.output_tokens.add(seq.num_output, self.labels)
        self.prompt_tokens.add(ctx.cached_tokens, {**self.labels, "busserve.source": "cache"})
        self.prompt_tokens.add(max(0, seq.prompt_len - ctx.cached_tokens), {**self.labels, "busserve.source": "computed"})
        if not self.tracing:
            return
        t = tracer("busserve.engine")
        root = t.start_span("generate", context=ctx.trace, kind=SpanKind.SERVER, start_time=ctx.t_arrival_ns,
                            attributes={**self.labels, A.REQUEST_ID: seq.request_id,
                                        A.USAGE_INPUT_TOKENS: seq.prompt_len, A.USAGE_OUTPUT_TOKENS: seq.num_output,
                                        A.FINISH_REASON: outcome})
        inner = trace.set_span_in_context(root)
        scheduled = ctx.t_scheduled_ns or now
        first = ctx.t_first_token_ns or now
        t.start_span("queue", context=inner, start_time=ctx.t_arrival_ns).end(end_time=scheduled)
        t.start_span("prefill", context=inner, start_time=scheduled, attributes={
            A.TOKENS_COMPUTED: max(0, seq.prompt_len - ctx.cached_tokens), A.TOKENS_CACHED: ctx.cached_tokens,
        }).end(end_time=first)
        if ctx.t_first_token_ns:
            t.start_span("decode", context=inner, start_time=first, attributes={
                A.DECODE_TOKENS: seq.num_output, A.FINISH_REASON: outcome,
            }).end(end_time=now)
        if outcome == "error":
            root.set_status(Status(StatusCode.ERROR))
        root.end(end_time=now)

    def _sent(self, seq: Sequence, outcome: str, now: int) -> None:
        ctx: SendCtx = seq.ctx
        writer = ctx.writer
        backend = writer.addr.transport if writer is not None else "none"
        nbytes = writer.bytes_written if writer is not None else 0
        self.kv_bytes.add(nbytes, {**self.labels, A.KV_BACKEND: backend})
        self.kv_seconds.record((now - ctx.t_start_ns) / 1e9, {**self.labels, A.KV_BACKEND: backend})
        if not self.tracing:
            return
        t = tracer("busserve.engine")
        root = t.start_span("remote_send", context=ctx.trace, kind=SpanKind.SERVER, start_time=ctx.t_start_ns,
                            attributes={**self.labels, A.REQUEST_ID: ctx.request_id, A.RANGE_BEGIN: ctx.begin,
                                        A.RANGE_END: ctx.end})
        inner = trace.set_span_in_context(root)
        computed = ctx.t_computed_ns or now
        t.start_span("prefill", context=inner, start_time=ctx.t_scheduled_ns or ctx.t_start_ns, attributes={
            A.TOKENS_COMPUTED: ctx.end - min(seq.num_cached, ctx.end), A.TOKENS_CACHED: min(seq.num_cached, ctx.end),
        }).end(end_time=computed)
        if writer is not None:
            t.start_span("kv_transfer", context=inner, start_time=ctx.t_scheduled_ns or ctx.t_start_ns, attributes={
                A.KV_BACKEND: backend, A.KV_BYTES: nbytes, A.KV_LAYERS: len(writer.layers_written),
                A.KV_DURATION: (now - ctx.t_start_ns) / 1e9, A.KV_BUSY: writer.busy_s,
            }).end(end_time=now)
        if outcome == "error":
            root.set_status(Status(StatusCode.ERROR))
        root.end(end_time=now)

    def on_prep_recv(self, seq: Sequence, matched: int, reserved: int, trace_ctx: Any, started_ns: int) -> None:
        if not self.tracing:
            return
        tracer("busserve.engine").start_span(
            "prep_recv", context=trace_ctx, kind=SpanKind.SERVER, start_time=started_ns,
            attributes={**self.labels, A.REQUEST_ID: seq.request_id, A.MATCHED: matched, A.RESERVED_PAGES: reserved,
                        A.RANGE_END: seq.parked_end},
        ).end()
