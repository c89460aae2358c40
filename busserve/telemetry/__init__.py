"""Observability: W3C trace context on the bus, OpenTelemetry tracing and metrics."""
