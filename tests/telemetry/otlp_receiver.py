"""A real OTLP/HTTP trace receiver for tests: accepts ``POST /v1/traces`` (protobuf), keeps every span."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]
    service: str
    start_ns: int
    end_ns: int


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


@dataclass
class OTLPReceiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> int:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = ExportTraceServiceRequest()
                req.ParseFromString(body)
                found = []
                for rs in req.resource_spans:
                    res = {a.key: _value(a.value) for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            found.append(ReceivedSpan(
                                name=s.name, trace_id=s.trace_id.hex(), span_id=s.span_id.hex(),
                                parent_id=s.parent_span_id.hex(), kind=s.kind,
                                attributes={a.key: _value(a.value) for a in s.attributes},
                                service=str(res.get("service.name")), start_ns=s.start_time_unix_nano,
                                end_ns=s.end_time_unix_nano))
                with receiver.lock:
                    receiver.spans.extend(found)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return int(self.server.server_address[1])

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]


if __name__ == "__main__":  # a stand-alone receiver for benchmarks: python -m tests.telemetry.otlp_receiver
    import sys
    import time

    r = OTLPReceiver()
    print(r.start(), flush=True)
    while True:
        time.sleep(5)
        with r.lock:
            n = len(r.spans)
            r.spans.clear()
        print(f"{n} spans", file=sys.stderr, flush=True)
