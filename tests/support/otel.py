"""A real OpenTelemetry Collector for the tracing tests.

The binary is build/tools/otelcol, built from tools/otelcol (collector v0.165.0 from the Go
module proxy: OTLP receiver, OTLP/HTTP exporter) by ``bash .ci/otelcol``. It receives OTLP/gRPC
on a free loopback port — what svidgate exports to — and forwards every span with its
OTLP/HTTP exporter, JSON-encoded, to a small recording HTTP server in the test process, where
tests read them (:meth:`Collector.spans`). The spans a test sees have crossed a real OTLP
receiver and pipeline.
"""

from __future__ import annotations

import json
import subprocess
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from support.ports import free_port
from support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
COLLECTOR = REPO / "build" / "tools" / "otelcol"

CONFIG = """\
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:{grpc_port}
exporters:
  otlp_http:
    endpoint: http://127.0.0.1:{record_port}
    encoding: json
    compression: none
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [otlp_http]
"""


@dataclass(frozen=True)
class Span:
    """One exported span, as the collector forwarded it (ids in hex)."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    attributes: dict[str, Any]


def _value(v: dict[str, Any]) -> Any:
    for key in ("stringValue", "boolValue", "doubleValue"):
        if key in v:
            return v[key]
    if "intValue" in v:
        return int(v["intValue"])
    return v


def parse_export(doc: dict[str, Any]) -> list[Span]:
    """The spans of one OTLP/JSON ExportTraceServiceRequest."""
    spans: list[Span] = []
    for rs in doc.get("resourceSpans", []):
        resource = {
            a["key"]: _value(a["value"]) for a in rs.get("resource", {}).get("attributes", [])
        }
        for ss in rs.get("scopeSpans", []):
            for s in ss.get("spans", []):
                spans.append(
                    Span(
                        service=str(resource.get("service.name", "")),
                        name=s["name"],
                        trace_id=s["traceId"],
                        span_id=s["spanId"],
                        parent_id=s.get("parentSpanId", ""),
                        kind=int(s.get("kind", 0)),
                        attributes={a["key"]: _value(a["value"]) for a in s.get("attributes", [])},
                    )
                )
    return spans


class _Recorder(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Span] = []
        self.lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    server: _Recorder

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/v1/traces":
            with self.server.lock:
                self.server.spans.extend(parse_export(json.loads(body)))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Collector:
    """The collector as a child process, and the recorder it forwards spans to."""

    def __init__(self, directory: Path) -> None:
        if not COLLECTOR.exists():
            raise AssertionError(
                f"{COLLECTOR} is missing: build the test OpenTelemetry Collector with "
                "`bash .ci/otelcol` (needs the Go toolchain; .ci/run does it)"
            )
        self.dir = directory
        self.grpc_port = free_port()
        self.recorder = _Recorder()
        self.log = directory / "otelcol.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self.recorder.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        """What ``tracing.otlp_endpoint`` names."""
        return f"http://127.0.0.1:{self.grpc_port}"

    def start(self, timeout: float = 30.0) -> None:
        self._thread.start()
        config = self.dir / "otelcol.yaml"
        record_port = self.recorder.server_address[1]
        config.write_text(CONFIG.format(grpc_port=self.grpc_port, record_port=record_port))
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(COLLECTOR), "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        def ready() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            return "Everything is ready" in self.log.read_text(errors="replace")

        wait_until(ready, timeout, f"the collector to start: {self.log_tail()}", interval=0.05)

    def spans(self) -> list[Span]:
        with self.recorder.lock:
            return list(self.recorder.spans)

    def log_tail(self, size: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.recorder.shutdown()
        self.recorder.server_close()
