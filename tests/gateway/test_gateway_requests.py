"""Steps 3 to 6 over real TLS: routing, policy, path normalization, header hygiene, proxying."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from gateway_harness import (
    BUNDLE_A,
    GATEWAY_ID,
    WEB_ID,
    Echo,
    Harness,
    LabPki,
    gateway_config,
    start_echo,
)
from support.ports import free_port


def _xfcc_values(record: dict[str, Any]) -> list[str]:
    return [v for k, v in record["headers"] if k.lower() == "x-forwarded-client-cert"]


async def test_allowed_by_pattern(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("GET", "/orders/42?verbose=1")
    assert resp is not None and resp.status == 200
    assert resp.header("X-Upstream") == "echo"
    assert echo.targets == ["/orders/42?verbose=1"]


async def test_denied_identity_403_json(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("GET", "/admin/users")
    assert resp is not None and resp.status == 403
    assert resp.json() == {"error": "forbidden", "route": "admin", "reason": "identity_not_allowed"}
    assert echo.seen == []


async def test_denied_method_403(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("DELETE", "/orders/1")
    assert resp is not None and resp.status == 403
    assert resp.json()["route"] == "orders-read"
    assert resp.json()["reason"] == "method_not_allowed"
    assert echo.seen == []


async def test_method_specific_route(gw: Harness, echo: Echo) -> None:
    denied = await gw.request("POST", "/orders", body=b"{}")
    allowed = await gw.request("POST", "/orders", body=b'{"n": 1}', client="writer")
    assert denied is not None and denied.status == 403
    assert allowed is not None and allowed.status == 200
    assert [r["body"] for r in echo.seen] == ['{"n": 1}']


async def test_rest_pattern_allows_ops(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("DELETE", "/admin/users/7", client="ops")
    assert resp is not None and resp.status == 200
    assert echo.targets == ["/admin/users/7"]


async def test_no_route_404(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("GET", "/ordersx")
    assert resp is not None and resp.status == 404
    assert echo.seen == []


@pytest.mark.parametrize(
    "target",
    [
        "//admin",
        "/./admin",
        "/x/../admin",
        "/%2e%2e/admin",
        "/%2E%2E/admin",
        "/%61dmin",
        "/admin;x",
        "/x%2F..%2Fadmin",
        "/orders/../admin",
        "/orders/%2e%2e/admin",
        "/orders/..%2Fadmin",
        "/admin%00",
        "/admin\\x",
        "/%ff/../admin",
        "/\xffadmin",
        "/%c0%afadmin",
    ],
)
async def test_path_bypass_never_reaches_upstream(gw: Harness, echo: Echo, target: str) -> None:
    resp = await gw.request("GET", target)
    assert resp is not None and resp.status in (400, 403)
    assert echo.seen == []


async def test_authorized_bytes_forwarded_exactly(gw: Harness, echo: Echo) -> None:
    target = "/orders/a%20b/caf%C3%A9/~x?q=%2e%2e/../&y=%2F"
    resp = await gw.request("GET", target)
    assert resp is not None and resp.status == 200
    assert echo.targets == [target]


async def test_non_canonical_target_forwarded_canonical(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("GET", "/orders/./x/../%7Ey//z?a=%2e")
    assert resp is not None and resp.status == 200
    assert echo.targets == ["/orders/~y/z?a=%2e"]


@pytest.mark.parametrize(
    "spoof",
    [
        "X-Forwarded-Client-Cert",
        "x-forwarded-client-cert",
        "X_Forwarded_Client_Cert",
        "X.Forwarded.Client.Cert",
        "X-SPIFFE-ID",
        "x_spiffe_id",
        "X.Spiffe.Id",
        "Client-Cert",
        "client_cert",
    ],
)
async def test_spoofed_identity_headers_stripped(gw: Harness, echo: Echo, spoof: str) -> None:
    evil = "By=spiffe://example.org/gateway;Hash=00;URI=spiffe://example.org/ops/alice"
    resp = await gw.request("GET", "/orders/1", [(spoof, evil)])
    assert resp is not None and resp.status == 200
    record = echo.seen[0]
    assert all(v != evil for _, v in record["headers"])
    xfcc = _xfcc_values(record)
    assert len(xfcc) == 1
    assert xfcc[0].startswith(f"By={GATEWAY_ID};Hash=")
    assert xfcc[0].endswith(f";URI={WEB_ID}")
    client_cert = [v for k, v in record["headers"] if k.lower() == "client-cert"]
    assert len(client_cert) == 1 and client_cert[0].startswith(":") and client_cert[0].endswith(":")


async def test_connection_header_cannot_remove_gateway_xfcc(gw: Harness, echo: Echo) -> None:
    resp = await gw.request(
        "GET",
        "/orders/1",
        [("Connection", "X-Forwarded-Client-Cert, X-Custom"), ("X-Custom", "1"), ("X-Kept", "2")],
    )
    assert resp is not None and resp.status == 200
    names = [k.lower() for k, _ in echo.seen[0]["headers"]]
    assert len(_xfcc_values(echo.seen[0])) == 1
    assert "x-custom" not in names
    assert "x-kept" in names
    assert "connection" not in names


@pytest.mark.parametrize(("method", "target"), [("CONNECT", "localhost:443"), ("TRACE", "/orders")])
async def test_connect_and_trace_405(gw: Harness, echo: Echo, method: str, target: str) -> None:
    resp = await gw.request(method, target)
    assert resp is not None and resp.status == 405
    assert echo.seen == []


async def test_duplicate_host_400(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("GET", "/orders/1", [("Host", "evil.example")])
    assert resp is not None and resp.status == 400
    assert echo.seen == []


async def test_absolute_form_mismatch_400(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("GET", "https://evil.example/orders/1")
    assert resp is not None and resp.status == 400
    assert echo.seen == []


async def test_absolute_form_matching_host_is_canonicalized(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("GET", "https://localhost/x/../orders/1")
    assert resp is not None and resp.status == 200
    assert echo.targets == ["/orders/1"]


async def test_streaming_large_body(gw: Harness, echo: Echo) -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    resp = await gw.request("POST", "/orders/bulk", body=body, client="writer")
    assert resp is not None and resp.status == 200
    assert echo.seen[0]["body"].encode("latin-1") == body


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A plain-HTTP upstream that answers with a header containing a bare CR."""
    received: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(
            b"HTTP/1.1 200 OK\r\nX-Evil: a\rSet-Cookie: x=1\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], received
    server.close()
    await server.wait_closed()


def _with_upstream(pki: LabPki, echo: Echo, name: str, upstream: dict[str, Any]) -> dict[str, Any]:
    doc = gateway_config(pki, echo.port)
    doc["upstreams"][name] = upstream
    doc["routes"].append(
        {"name": name, "match": {"path_prefix": f"/{name}"}, "upstream": name, "allow": [WEB_ID]}
    )
    return doc


async def test_upstream_crlf_header_502(
    test_pki: LabPki,
    echo: Echo,
    start_gateway: Callable[..., Any],
    raw_upstream: tuple[int, list[bytes]],
) -> None:
    port, received = raw_upstream
    doc = _with_upstream(test_pki, echo, "raw", {"url": f"http://127.0.0.1:{port}"})
    gw: Harness = await start_gateway(doc)
    resp = await gw.request("GET", "/raw/x")
    assert received, "the upstream was called"
    assert resp is not None and resp.status == 502
    assert resp.header("Set-Cookie") is None


async def test_upstream_down_502(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    port = free_port()  # nothing listens there
    doc = _with_upstream(test_pki, echo, "down", {"url": f"http://127.0.0.1:{port}"})
    gw: Harness = await start_gateway(doc)
    resp = await gw.request("GET", "/down/x")
    assert resp is not None and resp.status == 502


async def test_upstream_read_timeout_504(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    slow, runner = await start_echo(test_pki, server_id="spiffe://example.org/slow")
    slow.hold = asyncio.Event()  # the upstream never answers while the gateway waits
    try:
        doc = _with_upstream(
            test_pki,
            echo,
            "slow",
            {
                "url": f"https://127.0.0.1:{slow.port}",
                "tls": {
                    "cert": "gateway.crt",
                    "key": "gateway.key",
                    "bundle": BUNDLE_A,
                    "spiffe_id": "spiffe://example.org/slow",
                },
                "timeouts": {"connect": "1s", "read": "300ms"},
                "retries": 0,
            },
        )
        gw: Harness = await start_gateway(doc)
        resp = await gw.request("GET", "/slow/x")
        assert resp is not None and resp.status == 504
    finally:
        slow.hold.set()
        with contextlib.suppress(Exception):
            await runner.cleanup()


async def test_upstream_wrong_spiffe_id_502_never_reached(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    impostor, runner = await start_echo(test_pki, server_id="spiffe://example.org/impostor")
    try:
        doc = _with_upstream(
            test_pki,
            echo,
            "pinned",
            {
                "url": f"https://127.0.0.1:{impostor.port}",
                "tls": {
                    "cert": "gateway.crt",
                    "key": "gateway.key",
                    "bundle": BUNDLE_A,
                    "spiffe_id": "spiffe://example.org/orders",
                },
            },
        )
        gw: Harness = await start_gateway(doc)
        resp = await gw.request("GET", "/pinned/x")
        assert resp is not None and resp.status == 502
        assert impostor.seen == []
    finally:
        await runner.cleanup()


async def test_circuit_breaker_opens(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    port = free_port()  # nothing listens there
    doc = _with_upstream(
        test_pki,
        echo,
        "flaky",
        {
            "url": f"http://127.0.0.1:{port}",
            "retries": 0,
            "circuit_breaker": {"failures": 2, "reset": "1m"},
        },
    )
    gw: Harness = await start_gateway(doc)
    statuses = [(await gw.request("GET", "/flaky/x")) for _ in range(3)]
    assert [r.status if r else None for r in statuses] == [502, 502, 503]
    assert statuses[2] is not None and statuses[2].header("Retry-After") == "1"
