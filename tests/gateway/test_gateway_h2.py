"""Downstream HTTP/2 over real TLS (ALPN h2) to the HTTP/1.1 echo upstream: each stream goes
through the same identity → route → policy → headers → forward steps; malformed requests
(RFC 9113 §8) are reset and never forwarded; request bodies stream with flow control."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from gateway_harness import WEB_ID, Echo, Harness, LabPki, gateway_config, raw_exchange
from h2_client import H2Client

PROTOCOL_ERROR = 0x1


async def _client(gw: Harness, name: str = "web") -> H2Client:
    return await H2Client.connect(gw.port, gw.ctx(name))


def _echoed(resp: Any) -> dict[str, Any]:
    assert resp.status == 200, (resp.status, resp.body[:300], resp.reset)
    doc: dict[str, Any] = json.loads(resp.body)
    return doc


async def test_alpn_offers_h2_and_http11(gw: Harness) -> None:
    for protocols, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        ctx = gw.ctx()
        ctx.set_alpn_protocols(protocols)
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=ctx, server_hostname="localhost"
        )
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == chosen
        writer.close()


async def test_http2_false_offers_only_http11(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    gw = await start_gateway(gateway_config(test_pki, echo.port, http2=False))
    ctx = gw.ctx()
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=ctx, server_hostname="localhost"
    )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
    writer.close()


async def test_streams_go_through_the_pipeline(gw: Harness, echo: Echo) -> None:
    client = await _client(gw)
    try:
        ok, denied, missing = await asyncio.gather(
            client.request("GET", "/orders/42?verbose=1", [(b"x-request-id", b"abc-1")]),
            client.request("GET", "/admin/users"),
            client.request("GET", "/nowhere"),
        )
    finally:
        await client.close()
    record = _echoed(ok)
    assert record["target"] == "/orders/42?verbose=1"
    headers = {k.lower(): v for k, v in record["headers"]}
    assert f"URI={WEB_ID}" in headers["x-forwarded-client-cert"]
    assert headers["x-request-id"] == "abc-1"
    assert headers["host"] == f"127.0.0.1:{echo.port}"
    assert ok.header(b"x-upstream") == b"echo"
    assert denied.status == 403
    assert json.loads(denied.body) == {
        "error": "forbidden",
        "route": "admin",
        "reason": "identity_not_allowed",
    }
    assert missing.status == 404
    assert echo.targets == ["/orders/42?verbose=1"]


async def test_path_is_canonicalized_like_http11(gw: Harness, echo: Echo) -> None:
    client = await _client(gw)
    try:
        dotted = await client.request("GET", "/orders/../admin/users")
        encoded = await client.request("GET", "/public/%2e%2e/admin/x")
    finally:
        await client.close()
    assert dotted.status in (400, 403), dotted.status
    assert encoded.status in (400, 403), encoded.status
    assert not any("admin" in t for t in echo.targets)


async def test_request_body_streams_upstream(gw: Harness, echo: Echo) -> None:
    client = await _client(gw, "writer")
    body = bytes(range(256)) * 4096  # 1 MiB: several windows' worth
    try:
        resp = await client.request(
            "POST", "/orders", [(b"content-type", b"application/octet-stream")], body, timeout=30
        )
    finally:
        await client.close()
    record = _echoed(resp)
    assert record["body"].encode("latin-1") == body


async def test_body_over_the_limit_is_413(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    doc = gateway_config(test_pki, echo.port)
    doc["limits"] = {"max_body_bytes": 1000}
    gw = await start_gateway(doc)
    client = await _client(gw, "writer")
    try:
        declared = await client.request(
            "POST", "/orders", [(b"content-length", b"5000")], b"x" * 5000
        )
        undeclared = await client.request("POST", "/orders", [], b"y" * 5000)
    finally:
        await client.close()
    assert declared.status == 413
    assert undeclared.status == 413
    assert echo.seen == []


MALFORMED: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("connection header", [(b"connection", b"keep-alive")]),
    ("transfer-encoding", [(b"transfer-encoding", b"chunked")]),
    ("upgrade", [(b"upgrade", b"websocket")]),
    ("te other than trailers", [(b"te", b"gzip")]),
    ("uppercase name", [(b"X-Upper", b"1")]),
    ("authority/host conflict", [(b"host", b"evil.example")]),
    ("value with a leading space", [(b"x-a", b" padded")]),
]


@pytest.mark.parametrize(("what", "extra"), MALFORMED, ids=[m[0] for m in MALFORMED])
async def test_malformed_streams_are_reset(
    gw: Harness, echo: Echo, what: str, extra: list[tuple[bytes, bytes]]
) -> None:
    client = await _client(gw)
    try:
        resp = await client.request("GET", "/orders/1", extra)
        # the connection stays usable for well-formed streams
        after = await client.request("GET", "/orders/2")
    finally:
        await client.close()
    assert resp.reset == PROTOCOL_ERROR, (what, resp.status)
    assert after.status == 200
    assert echo.targets == ["/orders/2"]


PSEUDO: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("missing :path", [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"h")]),
    (
        "duplicate :path",
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"h"),
            (b":path", b"/orders/1"),
            (b":path", b"/admin/x"),
        ],
    ),
    (
        "pseudo after regular",
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b"x-a", b"1"),
            (b":authority", b"h"),
            (b":path", b"/orders/1"),
        ],
    ),
    (
        "unknown pseudo",
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"h"),
            (b":path", b"/orders/1"),
            (b":protocol", b"websocket"),
        ],
    ),
    ("no authority nor host", [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/o")]),
]


@pytest.mark.parametrize(("what", "block"), PSEUDO, ids=[m[0] for m in PSEUDO])
async def test_bad_pseudo_headers_are_reset(
    gw: Harness, echo: Echo, what: str, block: list[tuple[bytes, bytes]]
) -> None:
    client = await _client(gw)
    try:
        stream_id = client.start(block)
        resp = client.streams[stream_id]
        await asyncio.wait_for(resp.done.wait(), 10)
    finally:
        await client.close()
    assert resp.reset == PROTOCOL_ERROR, what
    assert echo.seen == []


async def test_connect_is_refused_405(gw: Harness, echo: Echo) -> None:
    client = await _client(gw)
    try:
        stream_id = client.start([(b":method", b"CONNECT"), (b":authority", b"example.org:443")])
        resp = client.streams[stream_id]
        await asyncio.wait_for(resp.done.wait(), 10)
    finally:
        await client.close()
    assert resp.status == 405
    assert echo.seen == []


async def test_http11_keeps_working_next_to_h2(gw: Harness, echo: Echo) -> None:
    ctx: ssl.SSLContext = gw.ctx()
    ctx.set_alpn_protocols(["http/1.1"])
    resp = await raw_exchange(
        gw.port, ctx, b"GET /orders/7 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    assert resp is not None and resp.status == 200
    assert echo.targets == ["/orders/7"]


async def test_settings_advertise_the_limits(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    doc = gateway_config(test_pki, echo.port)
    doc["limits"] = {"h2": {"max_concurrent_streams": 7, "max_header_list_bytes": 4096}}
    gw = await start_gateway(doc)
    client = await _client(gw)
    try:
        settings = client.remote_settings
    finally:
        await client.close()
    assert settings[0x3] == 7  # MAX_CONCURRENT_STREAMS
    assert settings[0x6] == 4096  # MAX_HEADER_LIST_SIZE


# -- gRPC answers the gateway gives itself -----------------------------------------------------

GRPC = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]


@pytest.mark.parametrize(
    ("path", "grpc_status", "reason"),
    [
        ("/admin/svc.Admin/Delete", b"7", "identity_not_allowed"),
        ("/nowhere.Svc/Call", b"12", "no_route"),
    ],
)
async def test_grpc_denials_are_trailers_only(
    gw: Harness, echo: Echo, path: str, grpc_status: bytes, reason: str
) -> None:
    client = await _client(gw)
    try:
        resp = await client.request("POST", path, GRPC, b"\x00\x00\x00\x00\x00")
    finally:
        await client.close()
    assert resp.status == 200 and resp.body == b"" and resp.trailers == []
    assert resp.header(b"content-type") == b"application/grpc"
    assert resp.header(b"grpc-status") == grpc_status
    message = resp.header(b"grpc-message") or b""
    assert message.startswith(reason.encode()), message
    assert echo.seen == []


async def test_grpc_denial_over_http11(gw: Harness, echo: Echo) -> None:
    resp = await gw.request(
        "POST", "/admin/svc.Admin/Delete", [("Content-Type", "application/grpc+proto")], b"x"
    )
    assert resp is not None and resp.status == 200 and resp.body == b""
    assert resp.header("grpc-status") == "7"
    assert (resp.header("grpc-message") or "").startswith("identity_not_allowed")
    assert echo.seen == []


def test_grpc_status_mapping_and_message_encoding() -> None:
    from svidgate.gateway.errors import grpc_answer_headers, grpc_status

    assert [grpc_status(s) for s in (400, 401, 403, 404, 429, 502, 503, 504, 500)] == [
        13,
        16,
        7,
        12,
        14,
        14,
        14,
        14,
        2,
    ]
    headers = dict(
        grpc_answer_headers(
            503,
            {"error": "upstream_busy", "route": "r é%", "reason": "upstream_busy"},
            [(b"Retry-After", b"1")],
        )
    )
    assert headers[b"grpc-status"] == b"14"
    assert headers[b"grpc-message"] == b"upstream_busy: upstream_busy (route r %C3%A9%25)"
    assert headers[b"retry-after"] == b"1"


async def test_idle_connection_gets_goaway(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    doc = gateway_config(test_pki, echo.port)
    doc["limits"] = {"idle_timeout": "1s"}
    gw = await start_gateway(doc)
    client = await _client(gw)
    try:
        assert (await client.request("GET", "/orders/1")).status == 200
        await asyncio.wait_for(client.closed.wait(), 10)  # no open stream for 1 s
        assert client.goaway == 0  # NO_ERROR
    finally:
        await client.close()


async def test_stalled_request_body_is_408(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    doc = gateway_config(test_pki, echo.port)
    doc["limits"] = {"body_timeout": "1s"}
    gw = await start_gateway(doc)
    client = await _client(gw, "writer")
    try:
        stream_id = client.start(
            [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", b"localhost"),
                (b":path", b"/orders"),
                (b"content-length", b"100"),
            ],
            end_stream=False,
        )
        await client.send_body(stream_id, b"x" * 10, end_stream=False)  # then nothing
        resp = client.streams[stream_id]
        await asyncio.wait_for(resp.done.wait(), 15)
        other = await client.request("GET", "/orders/ok")  # the connection still serves
    finally:
        await client.close()
    assert resp.status == 408
    assert other.status == 200
