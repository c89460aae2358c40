"""Turning OpenTelemetry on, from the standard ``OTEL_*`` variables. Off unless asked for.

Traces: ``OTEL_TRACES_EXPORTER`` = ``otlp`` / ``console`` / ``none`` (comma-separated); when unset, ``otlp`` if an
OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``), else none. The OTLP
protocol comes from ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL`` (``grpc`` or
``http/protobuf``, the default); endpoints, headers and batching follow the exporters' own ``OTEL_*`` variables.

Metrics: OpenTelemetry instruments, read by a Prometheus reader whenever a process serves a ``/metrics`` endpoint,
and pushed over OTLP too if ``OTEL_METRICS_EXPORTER=otlp``. ``BUSSERVE_TELEMETRY=off`` disables everything.

With nothing configured, the API's no-op tracer and meter are used: a span costs a few hundred nanoseconds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from opentelemetry import metrics, trace

log = logging.getLogger(__name__)

_configured: Telemetry | None = None


@dataclass
class Telemetry:
    tracing: bool
    metrics: bool
    prometheus_registry: Any = None  # a prometheus_client CollectorRegistry when /metrics is served
    tracer_provider: Any = None
    meter_provider: Any = None

    def shutdown(self) -> None:
        for provider in (self.tracer_provider, self.meter_provider):
            if provider is not None:
                try:
                    provider.shutdown()
                except Exception as exc:  # exporting at exit must never fail a shutdown
                    log.debug("telemetry shutdown: %s", exc)


def _env_list(name: str) -> list[str]:
    return [v.strip().lower() for v in os.environ.get(name, "").split(",") if v.strip()]


def _traces_exporters() -> list[str]:
    chosen = _env_list("OTEL_TRACES_EXPORTER")
    if not chosen and (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                       or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
        chosen = ["otlp"]
    return [c for c in chosen if c != "none"]


def _protocol(signal: str) -> str:
    return (os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf").lower()


def configure(service_name: str, instance_id: str, *, serve_metrics: bool = False) -> Telemetry:
    """Set the global tracer and meter providers for this process (once). ``serve_metrics`` adds a Prometheus
    reader whose registry the caller exposes on ``/metrics``."""
    global _configured
    if _configured is not None:
        return _configured
    if os.environ.get("BUSSERVE_TELEMETRY", "").lower() in ("off", "0", "false"):
        _configured = Telemetry(tracing=False, metrics=False)
        return _configured
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", service_name),
                                "service.instance.id": instance_id, "service.namespace": "busserve"})
    tel = Telemetry(tracing=False, metrics=False)
    exporters = _traces_exporters()
    if exporters:
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        provider = TracerProvider(resource=resource)
        for name in exporters:
            if name == "console":
                provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
            elif name == "otlp":
                provider.add_span_processor(BatchSpanProcessor(_otlp_span_exporter()))
            else:
                log.warning("unknown OTEL_TRACES_EXPORTER %r ignored (use otlp, console or none)", name)
        trace.set_tracer_provider(provider)
        tel.tracing, tel.tracer_provider = True, provider
    readers = []
    if serve_metrics:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry

        tel.prometheus_registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=tel.prometheus_registry))
    if "otlp" in _env_list("OTEL_METRICS_EXPORTER"):
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(_otlp_metric_exporter()))
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        tel.metrics, tel.meter_provider = True, meter_provider
    _configured = tel
    return tel


def _otlp_span_exporter() -> Any:
    if _protocol("TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # type: ignore[assignment]
    return OTLPSpanExporter()


def _otlp_metric_exporter() -> Any:
    if _protocol("METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    else:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # type: ignore[assignment]
    return OTLPMetricExporter()


def tracer(name: str = "busserve") -> trace.Tracer:
    return trace.get_tracer(name)


def meter(name: str = "busserve") -> metrics.Meter:
    return metrics.get_meter(name)
