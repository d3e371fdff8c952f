"""The data plane on the lean HTTP/1.1 core, over real TLS: forwarded headers, limits from
``gateway.yaml`` (each one trips while other clients keep being served), pipelining, an upstream
with stray bytes, and a client that never reads its response."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from gateway_harness import Echo, Harness, LabPki, gateway_config, parse_response, raw_exchange
from prometheus_client.exposition import generate_latest

StartGateway = Callable[..., Any]


def _headers(record: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in record["headers"] if k.lower() == name.lower()]


async def _open(gw: Harness, client: str = "web") -> tuple[asyncio.StreamReader, Any]:
    return await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=gw.ctx(client), server_hostname="localhost"
    )


async def _still_served(gw: Harness) -> None:
    resp = await gw.request("GET", "/public/ok")
    assert resp is not None and resp.status == 200


# -- forwarded headers ----------------------------------------------------------------------


STRIPPED = [
    "Forwarded",
    "X-Forwarded-Host",
    "X-Forwarded-Port",
    "X-Forwarded-Prefix",
    "X-Real-IP",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-HTTP-Method-Override",
    "X-HTTP-Method",
    "X-Method-Override",
]


async def test_forwarded_headers_are_the_gateways(gw: Harness, echo: Echo) -> None:
    spoofed = [(name, "/admin") for name in STRIPPED] + [
        ("X-Forwarded-For", "10.9.9.9"),
        ("X-Forwarded-Proto", "http"),
        ("x_forwarded_host", "evil"),
        ("X-Request-Id", "abc-123.X_y"),
    ]
    resp = await gw.request("GET", "/orders/1", headers=spoofed, host="client.example")
    assert resp is not None and resp.status == 200
    (seen,) = echo.seen
    for name in [*STRIPPED, "x_forwarded_host"]:
        assert _headers(seen, name) == [], name
    assert _headers(seen, "X-Forwarded-For") == ["127.0.0.1"]
    assert _headers(seen, "X-Forwarded-Proto") == ["https"]
    assert _headers(seen, "X-Request-Id") == ["abc-123.X_y"]
    assert _headers(seen, "Host") == [f"127.0.0.1:{echo.port}"]  # the upstream's authority


@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "é", "a;b"])
async def test_bad_request_id_is_replaced(gw: Harness, echo: Echo, bad: str) -> None:
    resp = await gw.request("GET", "/orders/1", headers=[("X-Request-Id", bad)])
    assert resp is not None and resp.status == 200
    (value,) = _headers(echo.seen[0], "X-Request-Id")
    assert value != bad and len(value) == 32 and int(value, 16) >= 0


async def test_two_request_ids_are_replaced(gw: Harness, echo: Echo) -> None:
    headers = [("X-Request-Id", "a"), ("X-Request-Id", "b")]
    resp = await gw.request("GET", "/orders/1", headers=headers)
    assert resp is not None and resp.status == 200
    (value,) = _headers(echo.seen[0], "X-Request-Id")
    assert value not in ("a", "b")


async def test_preserve_host_keeps_the_clients(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    doc = gateway_config(test_pki, echo.port)
    doc["routes"][0]["preserve_host"] = True
    gw: Harness = await start_gateway(doc)
    resp = await gw.request("GET", "/orders/1", host="orders.example")
    assert resp is not None and resp.status == 200
    assert _headers(echo.seen[0], "Host") == ["orders.example"]


async def test_server_header_names_no_software(gw: Harness, echo: Echo) -> None:
    denied = await gw.request("GET", "/admin/x")
    assert denied is not None and denied.status == 403
    assert denied.header("Server") == "svidgate"
    allowed = await gw.request("GET", "/orders/1")
    assert allowed is not None and allowed.status == 200
    upstream_server = allowed.header("Server") or ""
    assert "aiohttp" in upstream_server  # the echo upstream's own, passed through
    assert "python" not in (denied.header("Server") or "").lower()


async def test_error_body_never_echoes_the_request_line(gw: Harness, echo: Echo) -> None:
    marker = "MARKER<script>"
    for data in (
        f"GET /orders/{marker} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode(),
        f"GET /orders/x{marker} HTTP/9.9\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode(),
        f"BR{marker} /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode(),
    ):
        resp = await raw_exchange(gw.port, gw.ctx("web"), data)
        assert resp is not None and resp.status >= 400
        assert b"MARKER" not in resp.body and b"script" not in resp.body
        assert resp.header("Server") == "svidgate"
    assert echo.seen == []


# -- pipelining -----------------------------------------------------------------------------


async def test_pipelined_denied_request_never_reaches_the_upstream(gw: Harness, echo: Echo) -> None:
    reader, writer = await _open(gw)
    writer.write(
        b"GET /orders/1 HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /admin/users HTTP/1.1\r\nHost: localhost\r\n\r\n"
        b"GET /orders/2 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    statuses = [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]
    assert statuses == [200, 403, 200]
    assert echo.targets == ["/orders/1", "/orders/2"]


# -- limits ---------------------------------------------------------------------------------


def _limited(pki: LabPki, echo_port: int, **limits: Any) -> dict[str, Any]:
    doc = gateway_config(pki, echo_port)
    doc["limits"] = limits
    return doc


async def test_oversized_head_and_too_many_headers_431(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    gw: Harness = await start_gateway(
        _limited(test_pki, echo.port, max_header_bytes=2048, max_headers=10)
    )
    big = await gw.request("GET", "/orders/1", headers=[("X-Big", "a" * 3000)])
    assert big is not None and big.status == 431
    many = await gw.request("GET", "/orders/1", headers=[(f"X-{i}", "1") for i in range(12)])
    assert many is not None and many.status == 431
    assert echo.seen == []
    await _still_served(gw)


async def test_oversized_body_413_global_and_per_route(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    doc = _limited(test_pki, echo.port, max_body_bytes=1000)
    doc["routes"][1]["max_body_bytes"] = 10  # orders-write
    gw: Harness = await start_gateway(doc)
    over_route = await gw.request("POST", "/orders", body=b"x" * 11, client="writer")
    assert over_route is not None and over_route.status == 413
    over_global = await gw.request("PUT", "/public/x", body=b"x" * 1001)
    assert over_global is not None and over_global.status == 413
    chunked = (
        b"PUT /public/c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
        b"Connection: close\r\n\r\n" + (b"3e8\r\n" + b"y" * 1000 + b"\r\n") * 2 + b"0\r\n\r\n"
    )
    resp = await raw_exchange(gw.port, gw.ctx("web"), chunked)
    assert resp is not None and resp.status == 413
    ok = await gw.request("POST", "/orders", body=b"x" * 10, client="writer")
    assert ok is not None and ok.status == 200
    fits = await gw.request("PUT", "/public/x", body=b"x" * 1000)
    assert fits is not None and fits.status == 200
    assert [len(r["body"]) for r in echo.seen if r["body"]] == [10, 1000]


async def test_slowloris_head_408_while_others_are_served(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    gw: Harness = await start_gateway(_limited(test_pki, echo.port, header_timeout="1s"))
    reader, writer = await _open(gw)
    writer.write(b"GET /orders/1 HTTP/1.1\r\nHost: loc")
    await _still_served(gw)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert data.startswith(b"HTTP/1.1 408")
    assert echo.targets == ["/public/ok"]


async def test_slowloris_body_408_never_counts_against_the_upstream(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    doc = _limited(test_pki, echo.port, body_timeout="1s")
    doc["upstreams"]["echo"]["circuit_breaker"] = {"failures": 1, "reset": "60s"}
    gw: Harness = await start_gateway(doc)
    reader, writer = await _open(gw, "writer")
    writer.write(b"POST /orders HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc")
    await _still_served(gw)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert parse_response(data).status == 408
    # the breaker opens after one upstream failure: still closed, so it was not counted
    await _still_served(gw)
    assert gw.server.app.upstreams["echo"].breaker._failures == 0


async def test_idle_connections_past_max_connections(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    gw: Harness = await start_gateway(_limited(test_pki, echo.port, max_connections=2))
    held = [await _open(gw), await _open(gw)]
    listener = gw.server.listener
    assert listener is not None
    for _ in range(50):
        if listener.open_connections == 2:
            break
        await asyncio.sleep(0.02)
    refused = await gw.request("GET", "/public/x")
    assert refused is None  # closed before the handshake
    held[0][1].close()
    for _ in range(100):
        if listener.open_connections < 2:
            break
        await asyncio.sleep(0.02)
    await _still_served(gw)
    held[1][1].close()
    metrics = generate_latest(gw.server.metrics.registry).decode()
    assert 'svidgate_gateway_connections_refused_total{limit="max_connections"} 1.0' in metrics
    assert "svidgate_gateway_connections_open " in metrics


async def test_connections_per_identity(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    gw: Harness = await start_gateway(_limited(test_pki, echo.port, max_connections_per_identity=1))
    _reader, writer = await _open(gw)
    writer.write(b"GET /orders/1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await asyncio.wait_for(_reader.readuntil(b"\r\n\r\n"), 5)
    assert await gw.request("GET", "/public/x") is None  # web: its one connection is open
    other = await gw.request("GET", "/public/x", client="writer")
    assert other is not None and other.status == 200
    writer.close()


async def test_limits_are_validated(test_pki: LabPki, echo: Echo) -> None:
    from svidgate.gateway.config import parse_config

    from svidgate.config import ConfigError

    doc = _limited(test_pki, echo.port, body_timeout="0s")
    with pytest.raises(ConfigError, match=r"limits\.body_timeout"):
        parse_config(doc, base_dir=test_pki.dir)
    doc = _limited(test_pki, echo.port, max_headers=0)
    with pytest.raises(ConfigError, match=r"limits\.max_headers"):
        parse_config(doc, base_dir=test_pki.dir)
    doc = _limited(test_pki, echo.port, nope=1)
    with pytest.raises(ConfigError, match=r"limits\.nope"):
        parse_config(doc, base_dir=test_pki.dir)


# -- upstream connections -------------------------------------------------------------------


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[..., Any]]:
    servers: list[asyncio.Server] = []

    async def start(handle: Callable[..., Any]) -> int:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()


def _raw_route(pki: LabPki, echo_port: int, port: int, **upstream: Any) -> dict[str, Any]:
    doc = gateway_config(pki, echo_port)
    doc["upstreams"]["raw"] = {"url": f"http://127.0.0.1:{port}", "retries": 0, **upstream}
    doc["routes"].append(
        {"name": "raw", "match": {"path_prefix": "/raw"}, "upstream": "raw", "allow": ["*"]}
    )
    doc["routes"][-1]["allow"] = ["spiffe://example.org/**"]
    return doc


async def test_stray_bytes_after_a_response_never_reach_the_next_client(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway, raw_upstream: Callable[..., Any]
) -> None:
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"
                )
                await writer.drain()
        writer.close()

    port = await raw_upstream(handle)
    gw: Harness = await start_gateway(_raw_route(test_pki, echo.port, port))
    for _ in range(3):
        resp = await gw.request("GET", "/raw/x")
        assert resp is not None and resp.status in (200, 502)
        assert b"EVIL" not in resp.body
    assert connections == 3  # never pooled after stray bytes


async def test_a_client_that_never_reads_frees_the_upstream_connection(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway, raw_upstream: Callable[..., Any]
) -> None:
    closed = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (64 * 2**20))
        try:
            for _ in range(1024):
                writer.write(b"x" * 65536)
                await writer.drain()
            await reader.read()
        except ConnectionError:
            pass
        closed.set()

    port = await raw_upstream(handle)
    doc = _raw_route(test_pki, echo.port, port, timeouts={"write": "1s", "read": "30s"})
    gw: Harness = await start_gateway(doc)
    _reader, writer = await _open(gw)
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    writer.write(b"GET /raw/big HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await asyncio.wait_for(closed.wait(), 15)  # the upstream saw its connection closed
    writer.transport.abort()
    await _still_served(gw)
    assert gw.server.app.upstreams["raw"].pool.idle_count == 0
    metrics = generate_latest(gw.server.metrics.registry).decode()
    assert 'svidgate_gateway_limit_trips_total{limit="write_timeout"} 1.0' in metrics


async def test_pool_bound_waits_then_503(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway, raw_upstream: Callable[..., Any]
) -> None:
    release = asyncio.Event()
    concurrent = peak = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal concurrent, peak
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                concurrent += 1
                peak = max(peak, concurrent)
                if b"/raw/hold" in head:
                    await release.wait()
                concurrent -= 1
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    port = await raw_upstream(handle)
    doc = _raw_route(test_pki, echo.port, port, max_connections=1, queue_timeout="300ms")
    gw: Harness = await start_gateway(doc)
    held = asyncio.create_task(gw.request("GET", "/raw/hold"))
    await asyncio.sleep(0.3)
    busy = await gw.request("GET", "/raw/other")
    assert busy is not None and busy.status == 503
    assert busy.json()["reason"] == "upstream_busy" and busy.header("Retry-After") == "1"
    queued = asyncio.create_task(gw.request("GET", "/raw/queued"))
    await asyncio.sleep(0.1)
    release.set()  # the held one finishes within the queued one's queue_timeout
    first, second = await held, await queued
    assert first is not None and first.status == 200
    assert second is not None and second.status == 200
    assert peak == 1  # never more than max_connections at the upstream
    assert gw.server.app.upstreams["raw"].pool.in_use == 0


async def test_access_line_names_request_id_and_client(
    gw: Harness, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="svidgate.access")
    resp = await gw.request("GET", "/orders/1", headers=[("X-Request-Id", "req-1")])
    assert resp is not None and resp.status == 200
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "svidgate.access"]
    assert line["request_id"] == "req-1" and line["client"] == "127.0.0.1"


async def test_failed_handshakes_and_refused_identities_are_counted(
    gw: Harness, echo: Echo
) -> None:
    assert await gw.request("GET", "/public/x", client=None) is None  # no client certificate
    listener = gw.server.listener
    assert listener is not None
    for _ in range(100):
        if listener.counters.handshake_failed:
            break
        await asyncio.sleep(0.02)
    metrics = generate_latest(gw.server.metrics.registry).decode()
    reason = 'reason="no_client_certificate"'
    assert f"svidgate_gateway_handshake_failures_total{{{reason}}} 1.0" in metrics
    await _still_served(gw)


async def test_upgrade_is_never_forwarded(gw: Harness, echo: Echo) -> None:
    headers = [
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]
    resp = await gw.request("GET", "/orders/ws", headers=headers)
    assert resp is not None and resp.status == 200  # a plain request: no 101
    (seen,) = echo.seen
    assert _headers(seen, "Upgrade") == [] and _headers(seen, "Connection") == []


async def test_silent_tcp_client_is_reset_after_the_handshake_timeout(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    gw: Harness = await start_gateway(_limited(test_pki, echo.port, handshake_timeout="1s"))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)  # no ClientHello
    await _still_served(gw)
    started = asyncio.get_running_loop().time()
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    assert asyncio.get_running_loop().time() - started < 3
    writer.close()
    metrics = generate_latest(gw.server.metrics.registry).decode()
    assert 'svidgate_gateway_handshake_failures_total{reason="timeout"} 1.0' in metrics


async def test_idle_keep_alive_connection_is_closed_after_idle_timeout(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    gw: Harness = await start_gateway(_limited(test_pki, echo.port, idle_timeout="1s"))
    reader, writer = await _open(gw)
    writer.write(b"GET /orders/1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    length = int(parse_response(head).header("Content-Length") or 0)
    await reader.readexactly(length)
    await _still_served(gw)
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the gateway
    writer.close()
    metrics = generate_latest(gw.server.metrics.registry).decode()
    assert 'svidgate_gateway_limit_trips_total{limit="idle_timeout"} 1.0' in metrics
