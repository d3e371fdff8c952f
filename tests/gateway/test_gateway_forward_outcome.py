"""``Upstream.forward`` returns its outcome (a frozen ForwardOutcome: status, upstream, timing,
bytes in and out, why a committed response broke off) and the pipeline's access line and
metrics are built from it. Real sockets on 127.0.0.1: a scripted plain-HTTP upstream, and
either the bare HTTP/1.1 core (plain TCP) whose handler calls ``forward`` itself, or the whole
gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import WEB_ID, Echo, Harness, LabPki, build_request, gateway_config
from multidict import CIMultiDict
from prometheus_client.exposition import generate_latest
from support.waiting import wait_for
from svidgate.gateway.config import parse_config
from svidgate.gateway.http1 import (
    Admission,
    Body,
    ConnectionInfo,
    Counters,
    H1Connection,
    Limits,
    Request,
    Responder,
)
from svidgate.gateway.proxy import ForwardOutcome, Upstream

BIG = 200_000  # above the proxy's buffer limit: streamed
Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]


async def _read_request(reader: asyncio.StreamReader) -> bytes:
    """One request with a Content-Length body (or none); returns the body."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return await reader.readexactly(int(line.split(b":")[1]))
    return b""


def _answer(response: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(response)
        await writer.drain()

    return script


def _big(declared: int, sent: int) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared + b"x" * sent


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[Script], Any]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await script(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything until EOF, or until the connection is cut (reset)."""
    data = b""
    while True:
        try:
            chunk = await reader.read(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# -- forward itself --------------------------------------------------------------------------


async def _forward_once(
    tmp_path: Path, port: int, method: str, body: bytes
) -> tuple[ForwardOutcome, bytes]:
    """Run one request through ``Upstream.forward`` from a bare aiohttp server; returns the
    outcome and every byte the client received."""
    doc = {
        "listen": "127.0.0.1:8443",
        "tls": {"cert": "g.crt", "key": "g.key"},
        "trust_domains": {"example.org": {"bundle": "b.pem"}},
        "upstreams": {"raw": {"url": f"http://127.0.0.1:{port}", "retries": 0}},
        "routes": [{"name": "raw", "match": {"path_prefix": "/"}, "upstream": "raw"}],
    }
    upstream = Upstream("raw", parse_config(doc, base_dir=tmp_path).upstreams["raw"], None)
    outcomes: list[ForwardOutcome] = []

    async def handler(
        _conn: ConnectionInfo[None], request: Request, body: Body, responder: Responder
    ) -> None:
        headers = CIMultiDict((k.decode(), v.decode()) for k, v in request.headers)
        outcomes.append(await upstream.forward(request, body, responder, "/x", headers))

    owner = _PlainOwner(handler)
    server = await asyncio.get_running_loop().create_server(
        lambda: H1Connection(owner), "127.0.0.1", 0
    )
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1]
        )
        writer.write(build_request(method, "/x", None, body, host="localhost"))
        received = await asyncio.wait_for(_read_all(reader), 10)
        writer.close()
    finally:
        server.close()
        await upstream.close()
    assert len(outcomes) == 1
    return outcomes[0], received


class _PlainOwner:
    """The core's connection owner for plain TCP: every peer admitted, default limits."""

    def __init__(self, handler: Callable[..., Any]) -> None:
        self.limits = Limits()
        self.counters = Counters()
        self.handler = handler

    def admit(self, conn: H1Connection[None], transport: asyncio.BaseTransport) -> Admission[None]:
        return Admission(None, "plain")

    def forget(self, conn: H1Connection[None]) -> None:
        return None


async def test_small_response_outcome(tmp_path: Path, upstream: Callable[..., Any]) -> None:
    port = await upstream(_answer(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"))
    outcome, received = await _forward_once(tmp_path, port, "POST", b"0123456789")
    assert received.startswith(b"HTTP/1.1 201") and received.endswith(b"ok")
    assert (outcome.upstream, outcome.status, outcome.error) == ("raw", 201, None)
    assert (outcome.bytes_in, outcome.bytes_out) == (10, 2)
    assert outcome.upstream_seconds > 0
    assert not outcome.streamed  # read whole, sent in one write
    with pytest.raises(dataclasses.FrozenInstanceError):
        outcome.status = 500  # type: ignore[misc]


async def test_streamed_response_outcome(tmp_path: Path, upstream: Callable[..., Any]) -> None:
    port = await upstream(_answer(_big(BIG, BIG)))
    outcome, received = await _forward_once(tmp_path, port, "GET", b"")
    assert received.endswith(b"x" * 1000) and len(received) > BIG
    assert outcome.streamed
    assert (outcome.status, outcome.bytes_in, outcome.bytes_out, outcome.error) == (
        200,
        0,
        BIG,
        None,
    )


async def test_head_outcome_has_no_body(tmp_path: Path, upstream: Callable[..., Any]) -> None:
    port = await upstream(_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"))
    outcome, received = await _forward_once(tmp_path, port, "HEAD", b"")
    assert received.startswith(b"HTTP/1.1 200")
    assert (outcome.status, outcome.bytes_out, outcome.error) == (200, 0, None)


async def test_broken_off_body_is_an_outcome_not_an_exception(
    tmp_path: Path, upstream: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    # The status line is out when the upstream dies mid-body: forward cuts the client
    # connection and says why in the outcome (no error response can follow, no traceback).
    caplog.set_level(logging.DEBUG)
    port = await upstream(_answer(_big(BIG, 70_000)))
    outcome, received = await _forward_once(tmp_path, port, "GET", b"")
    assert received.startswith(b"HTTP/1.1 200") and len(received) < BIG
    assert outcome.status == 200 and outcome.error == "bad_upstream_response"
    assert 0 < outcome.bytes_out < BIG
    warned = [r for r in caplog.records if "broke off mid-body" in r.getMessage()]
    assert len(warned) == 1 and warned[0].exc_info is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


# -- the pipeline's access line and metrics ----------------------------------------------------


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "svidgate.access"]


def _metrics(gw: Harness) -> str:
    return generate_latest(gw.server.metrics.registry).decode()


async def test_access_line_carries_the_outcome(
    gw: Harness, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="svidgate.access")
    resp = await gw.request("POST", "/orders", body=b'{"n": 1}', client="writer")
    assert resp is not None and resp.status == 200
    (line,) = _access_lines(caplog)
    assert line["status"] == 200 and line["route"] == "orders-write"
    assert line["upstream"] == "echo" and line["error"] is None
    assert line["bytes_in"] == 8 and line["bytes_out"] == len(resp.body)
    assert 'svidgate_gateway_upstream_seconds_count{upstream="echo"} 1.0' in _metrics(gw)


async def test_access_line_of_a_denial_names_the_reason(
    gw: Harness, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="svidgate.access")
    resp = await gw.request("GET", "/admin/users")
    assert resp is not None and resp.status == 403
    (line,) = _access_lines(caplog)
    assert line["spiffe_id"] == WEB_ID and line["route"] == "admin"
    assert line["error"] == "identity_not_allowed"
    assert line["upstream"] is None and line["bytes_in"] is None and line["bytes_out"] is None
    assert 'svidgate_gateway_upstream_seconds_count{upstream="echo"}' not in _metrics(gw)


async def test_broken_off_body_is_counted_and_logged(
    test_pki: LabPki,
    echo: Echo,
    start_gateway: Callable[..., Any],
    upstream: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = await upstream(_answer(_big(BIG, 70_000)))
    doc = gateway_config(test_pki, echo.port)
    doc["upstreams"]["raw"] = {"url": f"http://127.0.0.1:{port}", "retries": 0}
    doc["routes"].append(
        {"name": "raw", "match": {"path_prefix": "/raw"}, "upstream": "raw", "allow": [WEB_ID]}
    )
    gw: Harness = await start_gateway(doc)
    caplog.set_level(logging.INFO)
    resp = await gw.request("GET", "/raw/x")
    assert resp is None or len(resp.body) < BIG  # cut, never completed
    await wait_for(lambda: bool(_access_lines(caplog)), 2, "the access log line")
    (line,) = _access_lines(caplog)
    assert (line["status"], line["upstream"], line["error"]) == (
        200,
        "raw",
        "bad_upstream_response",
    )
    assert 0 < line["bytes_out"] < BIG
    counted = 'svidgate_gateway_requests_total{code="200",method="GET",route="raw"} 1.0'
    assert counted in _metrics(gw)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
