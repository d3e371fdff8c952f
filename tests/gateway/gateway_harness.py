"""Helpers for gateway integration tests: a recording echo upstream over real mTLS, the gateway
in-process on 127.0.0.1, and a raw HTTP/1.1 client that sends exactly the bytes a test writes
(no URL normalization on the client side). The PKI and identities are tests/support/pki.py's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from support.pki import (
    B_ID,
    BUNDLES,
    GATEWAY_ID,
    OPS_ID,
    UPSTREAM_ID,
    WEB_ID,
    WRITER_ID,
    A,
    B,
    Pki,
)
from svidgate.gateway.server import GatewayServer

BUNDLE_A = BUNDLES[A]
BUNDLE_B = BUNDLES[B]
LabPki = Pki  # the gateway tests' name for the shared test PKI


@dataclass
class Echo:
    """A recording upstream: every request's method, raw target, raw headers, body and the
    caller's SPIFFE ID (from its client certificate). With ``hold`` set to an Event, each
    request is recorded and then answered only once the test sets that Event."""

    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)
    hold: asyncio.Event | None = None

    @property
    def targets(self) -> list[str]:
        return [r["target"] for r in self.seen]


async def start_echo(pki: LabPki, *, server_id: str = UPSTREAM_ID) -> tuple[Echo, web.BaseRunner]:
    name = "echo-" + server_id.rsplit("/", 1)[1]
    cert, key = pki.issue(server_id, name, dns=["localhost"], ips=["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(pki.bundle(A)))
    ctx.verify_mode = ssl.CERT_REQUIRED
    echo = Echo(0)

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        body = await request.read()
        peer = None
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        if ssl_object is not None:
            sans = ssl_object.getpeercert().get("subjectAltName", ())
            peer = next((v for k, v in sans if k == "URI"), None)
        record = {
            "method": request.method,
            "target": request.raw_path,
            "headers": [[k.decode(), v.decode()] for k, v in request.raw_headers],
            "body": body.decode("latin-1"),
            "peer": peer,
        }
        echo.seen.append(record)
        if echo.hold is not None:
            await echo.hold.wait()
        return web.json_response(record, headers={"X-Upstream": "echo"})

    runner = web.ServerRunner(web.Server(handler, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    echo.port = runner.addresses[0][1]
    return echo, runner


def gateway_config(pki: LabPki, echo_port: int, **overrides: Any) -> dict[str, Any]:
    upstream_tls = {
        "cert": "gateway.crt",
        "key": "gateway.key",
        "bundle": BUNDLE_A,
        "spiffe_id": UPSTREAM_ID,
    }
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "tls": {"cert": "gateway.crt", "key": "gateway.key"},
        "trust_domains": {A: {"bundle": BUNDLE_A}, B: {"bundle": BUNDLE_B}},
        "upstreams": {
            "echo": {
                "url": f"https://127.0.0.1:{echo_port}",
                "tls": upstream_tls,
                "timeouts": {"connect": "1s", "read": "2s"},
            }
        },
        "routes": [
            {
                "name": "orders-read",
                "match": {"path_prefix": "/orders", "methods": ["GET", "HEAD"]},
                "upstream": "echo",
                "allow": [f"spiffe://{A}/ns/shop/sa/*"],
            },
            {
                "name": "orders-write",
                "match": {"path_prefix": "/orders", "methods": ["POST"]},
                "upstream": "echo",
                "allow": [WRITER_ID],
            },
            {
                "name": "admin",
                "match": {"path_prefix": "/admin"},
                "upstream": "echo",
                "allow": [f"spiffe://{A}/ops/**"],
            },
            {
                "name": "public",
                "match": {"path_prefix": "/public"},
                "upstream": "echo",
                "allow": [f"spiffe://{A}/**", f"spiffe://{B}/**"],
            },
        ],
        "identity_headers": {"xfcc": True, "client_cert": True, "claims": {}},
        "reload_interval": "0s",
        "drain_timeout": "5s",
    }
    doc.update(overrides)
    return doc


def write_config(pki: LabPki, doc: dict[str, Any]) -> Path:
    path = pki.dir / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return out


def parse_response(data: bytes) -> Response:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = [tuple(line.split(": ", 1)) for line in lines[1:] if ": " in line]
    resp = Response(status, headers, body)  # type: ignore[arg-type]
    if (resp.header("Transfer-Encoding") or "").lower() == "chunked":
        resp.body = _dechunk(body)
    return resp


async def raw_exchange(
    port: int, ctx: ssl.SSLContext, data: bytes, *, timeout: float = 10.0
) -> Response | None:
    """Send ``data`` verbatim over TLS and read until the server closes; None if the server
    refused the connection (handshake alert, reset, or closed without an HTTP response)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"),
            timeout,
        )
    except (ssl.SSLError, ConnectionError, OSError):
        return None
    try:
        writer.write(data)
        await writer.drain()
        received = await asyncio.wait_for(reader.read(), timeout)
    except (ssl.SSLError, ConnectionError, OSError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if not received:
        return None
    return parse_response(received)


def build_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    host: str | None = "localhost",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    for name, value in headers or []:
        lines.append(f"{name}: {value}")
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class Harness:
    pki: LabPki
    server: GatewayServer
    config_path: Path

    @property
    def port(self) -> int:
        return self.server.port

    def ctx(self, name: str | None = "web", *, tls13: bool = True) -> ssl.SSLContext:
        if name is None:
            return self.pki.client_context(None, None, tls13=tls13)
        return self.pki.client_context(
            self.pki.dir / f"{name}.crt", self.pki.dir / f"{name}.key", tls13=tls13
        )

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]] | None = None,
        body: bytes = b"",
        *,
        client: str | None = "web",
        host: str | None = "localhost",
    ) -> Response | None:
        data = build_request(method, target, headers, body, host=host)
        return await raw_exchange(self.port, self.ctx(client), data)


__all__ = [
    "BUNDLE_A",
    "BUNDLE_B",
    "B_ID",
    "GATEWAY_ID",
    "OPS_ID",
    "UPSTREAM_ID",
    "WEB_ID",
    "WRITER_ID",
    "A",
    "B",
    "Echo",
    "Harness",
    "LabPki",
    "Response",
    "build_request",
    "gateway_config",
    "parse_response",
    "raw_exchange",
    "start_echo",
    "write_config",
]
