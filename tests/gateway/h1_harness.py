"""Helpers for the HTTP/1.1 core tests: a test PKI made with pki.ca, the listener + core running
in a background thread on its own event loop (uvloop or asyncio) with an echo handler, and
blocking raw TLS clients that send exactly the bytes a test writes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import uvloop
from svidgate.gateway.http1 import (
    Admission,
    Body,
    BodyError,
    ConnectionInfo,
    Limits,
    Refused,
    Request,
    Responder,
    ResponseError,
)
from svidgate.gateway.listener import Listener
from svidgate.gateway.server import listening_socket
from svidgate.gateway.tls import build_server_context, verify_peer
from svidgate.pki.bundle import BundleSet, marshal_pem
from svidgate.pki.ca import CertificateAuthority
from svidgate.pki.errors import PkiError

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/gateway"
ALICE = f"spiffe://{TD}/ns/shop/sa/alice"
BOB = f"spiffe://{TD}/ns/shop/sa/bob"
T = TypeVar("T")


@dataclass
class Pki:
    dir: Path
    ca: CertificateAuthority

    @classmethod
    def make(cls, directory: Path) -> Pki:
        ca = CertificateAuthority.create(TD)
        (directory / "bundle.pem").write_bytes(marshal_pem(ca.bundle()))
        ca.save(directory / "ca")  # for a server in another process (CertificateAuthority.load)
        pki = cls(directory, ca)
        ca.issue(SERVER_ID, dns=["localhost"], ips=["127.0.0.1"]).write(directory / "server")
        for name, sid in (("alice", ALICE), ("bob", BOB)):
            ca.issue(sid).write(directory / name)
        return pki

    @property
    def bundles(self) -> BundleSet:
        return BundleSet.from_bundles([self.ca.bundle()])

    def server_context(self) -> ssl.SSLContext:
        return build_server_context(
            self.dir / "server.crt", self.dir / "server.key", self.bundles, min_version="1.2"
        )

    def client_context(self, name: str | None = "alice") -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(cafile=str(self.dir / "bundle.pem"))
        ctx.check_hostname = False
        if name is not None:
            ctx.load_cert_chain(str(self.dir / f"{name}.crt"), str(self.dir / f"{name}.key"))
        return ctx


@dataclass
class Seen:
    """What the echo handler saw, per request (appended on the server's loop)."""

    requests: list[Request] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (path, what happened)

    @property
    def paths(self) -> list[str]:
        return [r.path for r in self.requests]


def identify_with(bundles: BundleSet) -> Callable[[asyncio.BaseTransport], Admission[str]]:
    """The real per-connection check: the peer's SVID against its trust domain's bundle."""

    def identify(transport: asyncio.BaseTransport) -> Admission[str]:
        ssl_object = transport.get_extra_info("ssl_object")
        now = datetime.now(UTC)
        try:
            svid = verify_peer(ssl_object, bundles, now=now)
        except PkiError as exc:
            raise Refused(str(exc)) from None
        sid = str(svid.spiffe_id)
        lifetime = (svid.leaf.not_valid_after_utc - now).total_seconds()
        return Admission(peer=sid, key=sid, expires_in=lifetime)

    return identify


def echo_handler(seen: Seen) -> Callable[..., Coroutine[Any, Any, None]]:
    """Answers what it parsed; a few paths behave differently (see the branches)."""

    async def handler(
        conn: ConnectionInfo[str], request: Request, body: Body, responder: Responder
    ) -> None:
        seen.requests.append(request)
        path = request.path
        seen.events.append((path, "start"))
        try:
            await _echo(seen, conn, request, body, responder)
        finally:
            seen.events.append((path, "done"))

    return handler


async def _echo(
    seen: Seen, conn: ConnectionInfo[str], request: Request, body: Body, responder: Responder
) -> None:
    path = request.path
    if path.startswith("/boom"):
        raise RuntimeError("a bug in the handler")
    if path.startswith("/slow"):
        await asyncio.sleep(0.3)
    if path.startswith("/refuse"):  # answers without reading the body
        responder.simple(403, {"error": "forbidden"})
        return
    if path.startswith("/drip"):  # a slow consumer: what piles up before it reads?
        await asyncio.sleep(0.3)
        seen.events.append((path, f"buffered={body.buffered}"))
    if path.startswith(("/limit", "/drip")):
        body.set_limit(int(request.query or "0"))
    if path.startswith("/big"):
        await _big(seen, request, responder)
        return
    try:
        data = await body.read_all()
    except BodyError as err:
        seen.events.append((path, type(err).__name__))
        raise
    doc = {
        "method": request.method,
        "target": request.target.decode("latin-1"),
        "path": path,
        "query": request.query,
        "version": list(request.version),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers],
        "body": data.decode("latin-1"),
        "peer": conn.peer,
    }
    payload = json.dumps(doc).encode()
    if path.startswith("/stream"):
        responder.start(200, [(b"Content-Type", b"application/json")])
        await responder.write(payload[:10])
        await responder.write(payload[10:])
        await responder.end()
        return
    responder.respond(200, [(b"Content-Type", b"application/json")], payload)


async def _big(seen: Seen, request: Request, responder: Responder) -> None:
    total = int(request.query or "0")
    chunk = b"x" * 65536
    responder.start(200, [], content_length=total)
    sent = 0
    try:
        while sent < total:
            piece = chunk[: total - sent]
            await responder.write(piece)
            sent += len(piece)
        await responder.end()
    except ResponseError as err:
        seen.events.append((request.path, type(err).__name__))
        raise
    seen.events.append((request.path, "sent"))


class Server:
    """The listener and core on their own loop in a background thread."""

    def __init__(
        self,
        pki: Pki,
        limits: Limits,
        *,
        loop_kind: str = "uvloop",
        handler: Callable[..., Coroutine[Any, Any, None]] | None = None,
        identify: Callable[[asyncio.BaseTransport], Admission[str]] | None = None,
    ) -> None:
        self.pki = pki
        self._identify = identify or identify_with(pki.bundles)
        self.limits = limits
        self.seen = Seen()
        self._handler = handler or echo_handler(self.seen)
        self._loop = uvloop.new_event_loop() if loop_kind == "uvloop" else asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.listener: Listener[str] | None = None
        self.port = 0

    def start(self) -> Server:
        self._thread.start()

        async def begin() -> None:
            sock = listening_socket("127.0.0.1:0")
            self.listener = Listener(
                sock,
                self.pki.server_context(),
                self._handler,
                self._identify,
                self.limits,
            )
            self.listener.start()
            self.port = self.listener.port

        self.run(begin())
        return self

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return self.submit(coro).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def call(self, fn: Callable[[], T]) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper())

    def counters(self) -> dict[str, int]:
        assert self.listener is not None
        listener = self.listener
        return self.call(listener.counters.snapshot)

    def open_connections(self) -> int:
        assert self.listener is not None
        listener = self.listener
        return self.call(lambda: listener.open_connections)

    def stop(self) -> None:
        if self.listener is not None:
            self.run(self.listener.shutdown(1.0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


# -- the raw client --------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A blocking TLS connection that writes raw bytes and reads responses one by one."""

    def __init__(self, port: int, ctx: ssl.SSLContext, *, timeout: float = 5.0) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ctx.wrap_socket(raw, server_hostname="localhost")
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ssl.SSLError, ConnectionError):
            return False
        if not data:
            return False
        self.buf += data
        return True

    def read_response(self, *, head_only: bool = False) -> Response | None:
        """The next response (None when the server closed without one)."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                return None
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = [tuple(line.split(": ", 1)) for line in lines[1:]]
        resp = Response(status, headers, b"")  # type: ignore[arg-type]
        if head_only or status in (100, 204, 304):
            return resp
        length = resp.header("Content-Length")
        if length is not None:
            while len(self.buf) < int(length):
                if not self._fill():
                    raise AssertionError("connection closed inside a response body")
            resp.body, self.buf = self.buf[: int(length)], self.buf[int(length) :]
        elif (resp.header("Transfer-Encoding") or "").lower() == "chunked":
            resp.body = self._read_chunked()
        else:
            while self._fill():
                pass
            resp.body, self.buf = self.buf, b""
        return resp

    def _read_chunked(self) -> bytes:
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                assert self._fill(), "closed inside a chunked body"
            line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(line, 16)
            while len(self.buf) < size + 2:
                assert self._fill(), "closed inside a chunk"
            out += self.buf[:size]
            self.buf = self.buf[size + 2 :]
            if size == 0:
                return out

    def closed(self) -> bool:
        """True when the server has closed (EOF or reset) and nothing is left unread."""
        return not self.buf and not self._fill()

    def exchange(self, data: bytes) -> Response | None:
        self.send(data)
        return self.read_response()


def get(path: str = "/", *, version: str = "1.1", headers: str = "") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: localhost\r\n{headers}\r\n".encode()
