"""Observability end to end: one trace per request across router and engine processes, collected by a real OTLP
receiver; Prometheus endpoints scraped and parsed; ``busserve status``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags
from prometheus_client.parser import text_string_to_metric_families

from busserve.bus.client import Bus
from busserve.bus.embedded import free_port
from busserve.messages import Final, GenerateRequest, SamplingParams, SetStrategy, StrategyState
from busserve.testing import ProcessCluster
from tests.helpers import live_view
from tests.telemetry.otlp_receiver import OTLPReceiver, ReceivedSpan

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def traced(tiny_dir: Path) -> Iterator[tuple[ProcessCluster, OTLPReceiver, int, dict[str, int]]]:
    receiver = OTLPReceiver()
    otlp_port = receiver.start()
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
           "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}", "OTEL_BSP_SCHEDULE_DELAY": "100"}
    http_port = free_port()
    metrics = {"A": free_port(), "B": free_port()}
    with ProcessCluster() as c:
        for eid in ("A", "B"):
            c.start_engine(eid, "--model", str(tiny_dir), "--dtype", "float32", "--kv-pages", "256",
                           "--metrics-port", str(metrics[eid]), threads=1, env=env)
        c.start("router", "router", "--nats", c.url, "--id", "traced-router", "--tokenizer", str(tiny_dir),
                "--http-port", str(http_port), "--strategy", "pd", env=env)
        c.wait_engines({"A", "B"})
        yield c, receiver, http_port, metrics
    receiver.stop()


def _one(spans: list[ReceivedSpan], name: str, service: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and s.service == service]
    assert len(found) == 1, f"{name} in {service}: {[(s.name, s.service) for s in spans]}"
    return found[0]


@pytest.mark.asyncio
async def test_one_trace_across_router_and_engines(traced: tuple[ProcessCluster, OTLPReceiver, int, dict[str, int]]
                                                   ) -> None:
    c, receiver, _, _ = traced
    bus = await Bus.connect(c.bus_config(), name="caller")
    try:
        await live_view(bus, {"A", "B"})
        await bus.request(bus.subjects.control_strategy(), SetStrategy(name="pd"), StrategyState, timeout_s=10)
        # The caller has its own trace: busserve must continue it.
        caller = SpanContext(trace_id=0xC0FFEE << 64 | 0x1234, span_id=0xBEEF, is_remote=False,
                             trace_flags=TraceFlags(TraceFlags.SAMPLED))
        req = GenerateRequest(prompt="Tell me about the sea and the sky. " * 4,
                              sampling=SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        with trace.use_span(NonRecordingSpan(caller)):
            events = [e async for e in bus.generate(req)]
        assert isinstance(events[-1], Final)
    finally:
        await bus.close()
    tid = f"{caller.trace_id:032x}"
    want = {("text_completion default", "busserve-router"), ("prep_recv", "busserve-router"),
            ("remote_send", "busserve-router"), ("start_generate", "busserve-router"),
            ("prep_recv", "busserve-engine"), ("remote_send", "busserve-engine"), ("generate", "busserve-engine"),
            ("queue", "busserve-engine"), ("decode", "busserve-engine"), ("kv_transfer", "busserve-engine")}
    deadline = time.monotonic() + 20
    while not want <= {(s.name, s.service) for s in receiver.of_trace(tid)}:
        assert time.monotonic() < deadline, sorted({(s.name, s.service) for s in receiver.of_trace(tid)})
        await asyncio.sleep(0.2)
    spans = receiver.of_trace(tid)
    root = _one(spans, "text_completion default", "busserve-router")
    assert root.parent_id == f"{caller.span_id:016x}" and root.kind == SpanKind.SERVER.value + 1
    assert root.attributes["gen_ai.operation.name"] == "text_completion"
    assert root.attributes["gen_ai.provider.name"] == "busserve"
    assert root.attributes["gen_ai.usage.output_tokens"] == 6
    assert root.attributes["gen_ai.response.finish_reasons"] == ["length"]
    assert root.attributes["busserve.strategy"] == "pd"
    by_id = {s.span_id: s for s in spans}
    for action in ("prep_recv", "remote_send", "start_generate"):
        client = _one(spans, action, "busserve-router")
        assert client.parent_id == root.span_id, action
    assert _one(spans, "prep_recv", "busserve-engine").parent_id == _one(spans, "prep_recv", "busserve-router").span_id
    send = _one(spans, "remote_send", "busserve-engine")
    assert send.parent_id == _one(spans, "remote_send", "busserve-router").span_id
    gen = _one(spans, "generate", "busserve-engine")
    assert gen.parent_id == _one(spans, "start_generate", "busserve-router").span_id
    kv = _one(spans, "kv_transfer", "busserve-engine")
    assert kv.parent_id == send.span_id
    assert kv.attributes["busserve.kv_transfer.backend"] == "shm" and kv.attributes["busserve.kv_transfer.bytes"] > 0
    assert kv.attributes["busserve.kv_transfer.layers"] == 2
    prefills = [s for s in spans if s.name == "prefill"]
    assert {by_id[p.parent_id].name for p in prefills} == {"generate", "remote_send"}
    on_sender = next(p for p in prefills if by_id[p.parent_id].name == "remote_send")
    assert on_sender.attributes["busserve.prefill.tokens_computed"] > 0
    on_decoder = next(p for p in prefills if by_id[p.parent_id].name == "generate")
    assert on_decoder.attributes["busserve.prefill.tokens_cached"] > 0  # the KV came over from the sender
    decode = _one(spans, "decode", "busserve-engine")
    assert decode.attributes["busserve.decode.tokens"] == 6 and decode.attributes["busserve.finish_reason"] == "length"
    assert all(s.start_ns <= s.end_ns for s in spans)


def _families(url: str) -> list:  # type: ignore[type-arg]
    with urllib.request.urlopen(url, timeout=10) as resp:
        return list(text_string_to_metric_families(resp.read().decode()))


def _scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in _families(url):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


@pytest.mark.asyncio
async def test_metrics_endpoints_move_as_requests_run(
        traced: tuple[ProcessCluster, OTLPReceiver, int, dict[str, int]]) -> None:
    c, _, http_port, metrics = traced
    front = f"http://127.0.0.1:{http_port}/metrics"
    engine_a = f"http://127.0.0.1:{metrics['A']}/metrics"
    before_front, before_a = _scrape(front), _scrape(engine_a)
    bus = await Bus.connect(c.bus_config(), name="caller")
    try:
        await live_view(bus, {"A", "B"})
        await bus.request(bus.subjects.control_strategy(), SetStrategy(name="pd"), StrategyState, timeout_s=10)
        for i in range(4):
            req = GenerateRequest(prompt=f"metrics please {i} " * 8, sampling=SamplingParams(max_tokens=5))
            assert isinstance([e async for e in bus.generate(req)][-1], Final)
    finally:
        await bus.close()
    await asyncio.sleep(0.5)
    after_front, after_a = _scrape(front), _scrape(engine_a)
    assert after_front["busserve_requests_total"] >= before_front.get("busserve_requests_total", 0) + 4
    assert after_front["gen_ai_server_time_to_first_token_seconds_count"] >= 4
    assert after_front["gen_ai_server_time_per_output_token_seconds_count"] >= 4
    assert after_front["gen_ai_server_request_duration_seconds_count"] >= 4
    assert after_front["busserve_inter_token_latency_seconds_count"] >= 4 * 4
    assert after_front["busserve_router_active_strategy"] == 1
    for name in ("busserve_engine_queue_depth", "busserve_engine_running", "busserve_engine_kv_pages_free",
                 "busserve_engine_kv_pages_used", "busserve_engine_prefix_cache_hit_rate"):
        assert name in after_a, name
    assert after_a["busserve_engine_kv_pages_free"] + after_a["busserve_engine_kv_pages_used"] == 256
    moved = sum(after_a.get(k, 0) - before_a.get(k, 0) for k in after_a if k.startswith("busserve_engine_requests"))
    sent = after_a.get("busserve_kv_transfer_bytes_total", 0) - before_a.get("busserve_kv_transfer_bytes_total", 0)
    assert moved + sent > 0  # A either generated or prefilled for B (pd picks by load)


def test_status_once(traced: tuple[ProcessCluster, OTLPReceiver, int, dict[str, int]]) -> None:
    c, _, _, _ = traced
    out = subprocess.run([sys.executable, "-m", "busserve.cli", "status", "--once", "--nats", c.url],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for needle in ("A", "B", "traced-router", "pd", "prefill,decode"):
        assert needle in out.stdout, out.stdout


def test_the_grafana_dashboard_queries_metrics_that_exist(
        traced: tuple[ProcessCluster, OTLPReceiver, int, dict[str, int]]) -> None:
    """Every metric the dashboard plots is one a running cluster exports (so the dashboard cannot drift)."""
    import json
    import re

    _, _, http_port, metrics = traced
    exported: set[str] = set()
    for url in (f"http://127.0.0.1:{http_port}/metrics", *(f"http://127.0.0.1:{p}/metrics" for p in metrics.values())):
        for family in _families(url):
            for sample in family.samples:
                exported.add(sample.name)
                exported.update(sample.labels)  # label names used in by(...) clauses
    dash = json.loads((REPO / "ops" / "grafana" / "busserve-dashboard.json").read_text())
    names = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            names |= set(re.findall(r"\b(?:busserve|gen_ai)_[a-z_]+", target["expr"]))
    assert names, "no metric found in the dashboard"
    missing = sorted(n for n in names if n not in exported)
    assert not missing, f"dashboard queries metrics nobody exports: {missing}"
