"""Issue 13 item 3: W3C trace context is propagated through the gateway on every request, and
with ``tracing:`` both services export their spans over OTLP to a real OpenTelemetry
Collector (tests/support/otel.py). The span tree crosses processes: the client's span →
the gateway's ``request`` → ``policy``, ``jwt_verify`` (→ the signer's ``Verify`` RPC, through
the gRPC metadata) and ``upstream``, whose id is the parent the upstream sees. With tracing
off, nothing of OpenTelemetry is imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import (
    Echo,
    GatewayProcess,
    LabPki,
    build_request,
    gateway_config,
    raw_exchange,
    write_config,
)
from support.otel import Collector, Span
from support.pki import WEB_ID
from support.signer_process import AUDIENCE, SignerProcess
from support.waiting import wait_for

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
VERIFY_SPAN = "svidgate.signer.v1.Signer/Verify"


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = Collector(tmp_path)
    c.start()
    yield c
    c.stop()


def _jwt_doc(pki: LabPki, echo: Echo, signer: SignerProcess) -> dict[str, Any]:
    doc = gateway_config(pki, echo.port)
    doc["signer"] = {"address": f"unix:{signer.socket}", "timeout": "2s"}
    doc["routes"].append(
        {
            "name": "jwt-remote",
            "match": {"path_prefix": "/jwt/remote"},
            "upstream": "echo",
            "allow": [WEB_ID],
            "jwt": {"audience": AUDIENCE, "bind": "subject", "verify": "remote"},
        }
    )
    return doc


@pytest.fixture
async def traced(
    test_pki: LabPki, echo: Echo, collector: Collector
) -> AsyncIterator[tuple[GatewayProcess, SignerProcess]]:
    tracing = {"otlp_endpoint": collector.endpoint, "sample_ratio": 1.0}
    signer = SignerProcess.file_keys(test_pki.dir / "signer", {"tracing": tracing})
    await signer.start()
    doc = {**_jwt_doc(test_pki, echo, signer), "tracing": tracing}
    gw = GatewayProcess(test_pki, doc, "gateway-traced")
    try:
        await gw.start()
        yield gw, signer
    finally:
        gw.kill()
        signer.stop()


def _ctx(pki: LabPki) -> Any:
    return pki.client_context(pki.dir / "web.crt", pki.dir / "web.key")


def _header(record: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in record["headers"] if k.lower() == name]


async def test_a_trace_crosses_gateway_signer_and_upstream(
    test_pki: LabPki,
    echo: Echo,
    collector: Collector,
    traced: tuple[GatewayProcess, SignerProcess],
) -> None:
    gw, signer = traced
    token = await signer.sign_async(WEB_ID, AUDIENCE)
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),
        ("tracestate", "vendor=opaque"),
    ]
    resp = await raw_exchange(
        gw.port, _ctx(test_pki), build_request("GET", "/jwt/remote/1", headers)
    )
    assert resp is not None and resp.status == 200, resp
    (parent,) = _header(echo.seen[-1], "traceparent")
    version, trace_id, upstream_parent, flags = parent.split("-")
    assert (version, trace_id, flags) == ("00", CLIENT_TRACE, "01")
    assert _header(echo.seen[-1], "tracestate") == ["vendor=opaque"]

    def tree() -> dict[str, Span]:
        spans = {s.name: s for s in collector.spans() if s.trace_id == CLIENT_TRACE}
        return (
            spans
            if {"request", "policy", "jwt_verify", "upstream", VERIFY_SPAN} <= set(spans)
            else {}
        )

    await wait_for(lambda: bool(tree()), 30, "the five spans of the request in the collector")
    spans = tree()
    request = spans["request"]
    assert request.service == "svidgate-gateway" and request.parent_id == CLIENT_SPAN
    assert request.attributes["http.response.status_code"] == 200
    assert request.attributes["http.route"] == "jwt-remote"
    for child in ("policy", "jwt_verify", "upstream"):
        assert spans[child].parent_id == request.span_id, child
    assert spans["upstream"].span_id == upstream_parent  # the upstream's parent is that span
    verify = spans[VERIFY_SPAN]
    assert verify.service == "svidgate-signer" and verify.parent_id == spans["jwt_verify"].span_id
    # the access line names the trace
    access = [e for e in gw.events() if e["event"] == "access"]
    assert access and access[-1]["trace_id"] == CLIENT_TRACE


async def test_an_invalid_traceparent_starts_a_new_trace(
    test_pki: LabPki,
    echo: Echo,
    collector: Collector,
    traced: tuple[GatewayProcess, SignerProcess],
) -> None:
    gw, _signer = traced
    headers = [("traceparent", f"00-{'0' * 32}-{CLIENT_SPAN}-01"), ("tracestate", "vendor=x")]
    resp = await raw_exchange(gw.port, _ctx(test_pki), build_request("GET", "/orders/1", headers))
    assert resp is not None and resp.status == 200
    (parent,) = _header(echo.seen[-1], "traceparent")
    _, trace_id, _, _ = parent.split("-")
    assert trace_id != "0" * 32 and len(trace_id) == 32
    assert _header(echo.seen[-1], "tracestate") == []

    def request_span() -> list[Span]:
        return [s for s in collector.spans() if s.trace_id == trace_id and s.name == "request"]

    await wait_for(lambda: bool(request_span()), 30, "the new trace's request span")
    assert request_span()[0].parent_id == ""  # a root: the invalid parent was not continued


async def test_propagation_without_tracing(
    test_pki: LabPki, echo: Echo, start_gateway: Any
) -> None:
    gw = await start_gateway(gateway_config(test_pki, echo.port))
    assert gw.server.app.tracing is None
    ctx = gw.ctx("web")
    given = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    for headers in (
        [("traceparent", given), ("tracestate", "a=1")],
        [("traceparent", "garbage"), ("tracestate", "a=1")],
        [("traceparent", given), ("traceparent", given)],  # two: invalid
        [],
    ):
        resp = await raw_exchange(gw.port, ctx, build_request("GET", "/orders/1", headers))
        assert resp is not None and resp.status == 200
    first, garbage, twice, none = (_header(r, "traceparent") for r in echo.seen[-4:])
    assert first == [given] and _header(echo.seen[-4], "tracestate") == ["a=1"]
    for got in (garbage, twice, none):
        (value,) = got
        version, trace_id, span_id, flags = value.split("-")
        assert version == "00" and trace_id != CLIENT_TRACE and len(span_id) == 16
        assert flags == "00"  # not sampled: nobody records this trace
    assert _header(echo.seen[-3], "tracestate") == []


NO_OTEL_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from svidgate.gateway.server import GatewayServer
from svidgate.signer.config import load_config
from svidgate.signer.server import SignerServer

async def main():
    gateway = GatewayServer(Path(sys.argv[1]))
    await gateway.start()
    signer = SignerServer(load_config(Path(sys.argv[2])))
    await signer.start()
    await signer.stop(0)
    await gateway.stop(0.1)
    print(json.dumps(sorted(m for m in sys.modules if m.startswith("opentelemetry"))))

asyncio.run(main())
"""


def test_nothing_of_opentelemetry_is_imported_when_tracing_is_off(
    test_pki: LabPki, tmp_path: Path
) -> None:
    gateway_yaml = write_config(test_pki, gateway_config(test_pki, 9))
    signer = SignerProcess.file_keys(tmp_path / "signer")
    out = subprocess.run(
        [sys.executable, "-c", NO_OTEL_SCRIPT, str(gateway_yaml), str(signer.config)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path / "signer",
        env={**os.environ},
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


MISSING_OTEL_SCRIPT = """
import sys
sys.modules["opentelemetry"] = None  # as if the svidgate[otel] extra were not installed
from svidgate.cli import main
sys.argv = ["svidgate", "gateway", "serve", "--config", sys.argv[1]]
sys.exit(main())
"""


def test_tracing_without_the_extra_is_one_clear_error(test_pki: LabPki) -> None:
    doc = {**gateway_config(test_pki, 9), "tracing": {"otlp_endpoint": "http://127.0.0.1:4317"}}
    out = subprocess.run(
        [sys.executable, "-c", MISSING_OTEL_SCRIPT, str(write_config(test_pki, doc))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out.stderr
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("svidgate:")]
    assert "tracing: needs the svidgate[otel] extra" in line
    assert "Traceback" not in out.stderr
