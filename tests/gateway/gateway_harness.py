"""Helpers for gateway integration tests: a recording echo upstream over real mTLS, the gateway
in-process on 127.0.0.1 or as a real `svidgate gateway serve` child process (GatewayProcess, the
one gateway launcher of the suite), and a raw HTTP/1.1 client that sends exactly the bytes a test
writes (no URL normalization on the client side). The PKI and identities are
tests/support/pki.py's."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web
from support.logschema import read_events
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
from support.ports import free_port
from support.waiting import wait_for
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


async def start_echo(
    pki: LabPki, *, server_id: str = UPSTREAM_ID, context: ssl.SSLContext | None = None
) -> tuple[Echo, web.BaseRunner]:
    """The echo upstream with a ``server_id`` SVID from ``pki`` (or the given server
    ``context``, e.g. an SVID from SPIRE)."""
    if context is None:
        name = "echo-" + server_id.rsplit("/", 1)[1]
        cert, key = pki.issue(server_id, name, dns=["localhost"], ips=["127.0.0.1"])
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(cert), str(key))
        context.load_verify_locations(cafile=str(pki.bundle(A)))
        context.verify_mode = ssl.CERT_REQUIRED
    ctx = context
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


class GatewayProcess:
    """`svidgate gateway serve` as a child process on two free loopback ports: ``doc`` with
    ``listen`` / ``admin_listen`` set, written to ``pki.dir``/NAME.yaml; stderr (JSON lines)
    goes to NAME.log, or with ``stderr_pipe`` to a pipe the test reads (or leaves unread:
    ``proc.stderr``). ``group``: run it with that primary group ID (still as root), which is
    how a SPIRE agent tells it from the test process (``unix:gid`` selectors)."""

    def __init__(
        self,
        pki: LabPki,
        doc: dict[str, Any],
        name: str = "gateway",
        *,
        stderr_pipe: bool = False,
        group: int | None = None,
    ) -> None:
        self.pki = pki
        self.stderr_pipe = stderr_pipe
        self.group = group
        self.port, self.admin = free_port(), free_port()
        doc = {**doc, "listen": f"127.0.0.1:{self.port}", "admin_listen": f"127.0.0.1:{self.admin}"}
        self.config = pki.dir / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.log = pki.dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, ready: str = "/readyz", timeout: float = 20.0) -> None:
        """Start and wait until the admin endpoint ``ready`` answers 200 (``/healthz`` for a
        gateway whose signer is meant to be refused: it never becomes ready)."""
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "svidgate.cli",
                    "gateway",
                    "serve",
                    "--config",
                    str(self.config),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE if self.stderr_pipe else err,
                group=self.group,
            )

        async def up() -> bool:
            assert self.running, f"the gateway exited early: {self.log_tail()}"
            return await self.admin_get(ready) == 200

        await wait_for(up, timeout, f"the gateway's {ready}", interval=0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a graceful drain), SIGKILL after ``timeout``."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)

    def log_tail(self, size: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """The log lines written so far (a line still being written is left out), each
        checked against the shared schema."""
        return read_events(self.log, "gateway")

    def messages(self) -> list[str]:
        return [str(e.get("message", "")) for e in self.events()]

    def logged(self, event: str) -> bool:
        return any(e.get("event") == event for e in self.events())

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    async def admin_get(self, path: str) -> int | None:
        """The status of GET ``path`` on the admin listener; None when nothing answers."""
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{self.admin}{path}") as resp,
            ):
                return resp.status
        except aiohttp.ClientError:
            return None

    async def readyz(self) -> int | None:
        return await self.admin_get("/readyz")

    async def get(self, path: str, token: str, client: str = "web") -> tuple[int, str | None]:
        """GET ``path`` with a bearer token over a fresh mTLS connection as ``client``:
        (status, Retry-After)."""
        ctx = self.pki.client_context(*self.pki.files(client))
        data = build_request("GET", path, [("Authorization", f"Bearer {token}")])
        resp = await raw_exchange(self.port, ctx, data, timeout=20)
        assert resp is not None, f"the gateway closed the connection for GET {path}"
        return resp.status, resp.header("Retry-After")


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
    "GatewayProcess",
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
