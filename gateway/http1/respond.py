"""Writing one response: the head encoded once and checked for header injection, small
responses in one ``transport.write`` (one TLS record), streamed ones with Content-Length,
chunked (HTTP/1.1) or close-delimited (HTTP/1.0) framing, and the wait for a slow client
bounded by the write timeout.

The core owns ``Connection``, ``Content-Length`` and ``Transfer-Encoding``: a handler passes
its headers (names must be tokens: they are not re-checked) and, when it knows it, the length.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol

from svidgate.gateway.errors import grpc_answer_headers, is_grpc
from svidgate.gateway.http1.message import Request

SERVER = b"svidgate"
HeaderPairs = Iterable[tuple[bytes, bytes]]
_REASONS = {s.value: s.phrase.encode("ascii") for s in HTTPStatus}
_KEEP_ALIVE_10 = b"Connection: keep-alive\r\n"
_CLOSE = b"Connection: close\r\n"
_CHUNKED = b"Transfer-Encoding: chunked\r\n"
_OWNED = frozenset({b"connection", b"content-length", b"transfer-encoding", b"keep-alive"})
_NEW, _STARTED, _DONE = "new", "started", "done"
_date_cache: list[Any] = [0, b""]


def http_date() -> bytes:
    """The current IMF-fixdate, formatted at most once a second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0] = now
        _date_cache[1] = formatdate(now, usegmt=True).encode("ascii")
    date: bytes = _date_cache[1]
    return date


def encode_head(
    status: int, headers: HeaderPairs, framing: bytes, reason: bytes | None = None
) -> bytes:
    """Status line, headers, the core's framing lines, blank line. Raises :class:`ValueError`
    when a name or value holds CR, LF or NUL, or names a header the core owns."""
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or _REASONS.get(status, b"Unknown"))]
    for name, value in headers:
        if name.lower() in _OWNED:
            raise ValueError("the core sets Connection, Content-Length and Transfer-Encoding")
        lines.append(name + b": " + value + b"\r\n")
    lines.append(framing)
    lines.append(b"\r\n")
    head = b"".join(lines)
    breaks = len(lines) - 1 + framing.count(b"\n")
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\x00" in head:
        raise ValueError("CR, LF or NUL in a response header")
    return head


def error_response(status: int, body: bytes, headers: HeaderPairs = ()) -> bytes:
    """A complete JSON answer of the core's own, closing the connection."""
    framing = b"Content-Length: %d\r\n%s" % (len(body), _CLOSE)
    return encode_head(status, [*_own_headers(bool(body)), *headers], framing) + body


def _own_headers(json_body: bool) -> list[tuple[bytes, bytes]]:
    headers = [(b"Server", SERVER), (b"Date", http_date())]
    if json_body:
        headers.append((b"Content-Type", b"application/json"))
    return headers


def _encode_trailers(trailers: HeaderPairs) -> bytes:
    """Trailer lines; a field with CR, LF or NUL (or a framing name) is left out."""
    lines = []
    for name, value in trailers:
        if name.lower() in _OWNED or any(c in name + value for c in (13, 10, 0)):
            continue
        lines.append(name + b": " + value + b"\r\n")
    return b"".join(lines)


class TunnelEnd(Protocol):
    """The handler's side of a connection that switched protocols (101)."""

    def from_client(self, data: bytes) -> None:
        """Bytes from the client."""

    def client_paused(self, paused: bool) -> None:
        """The client stopped (True) or resumed (False) reading what is written to it."""

    def client_lost(self) -> None:
        """The client connection is gone."""


class ResponseSink(Protocol):
    """What a responder needs from its connection."""

    def may_keep_alive(self) -> bool:
        """Whether the connection may stay open after this response (body complete, not
        draining)."""

    def send(self, data: bytes) -> None:
        """Write to the client; raises :class:`ClientDisconnected` when it is gone."""

    async def drain(self) -> None:
        """Wait while the client is slow; raises :class:`WriteTimeout` / ClientDisconnected."""

    def cut(self) -> None:
        """Abort the connection (a response that cannot be completed)."""

    def upgrade(self, tunnel: TunnelEnd) -> tuple[Any, bytes]:
        """Switch the connection to a byte tunnel (after a 101)."""


class Responder:
    """The response to one request: either one whole answer (:meth:`simple`,
    :meth:`respond`) or a stream (:meth:`start`, :meth:`write`, :meth:`end`)."""

    __slots__ = (
        "_chunked",
        "_head",
        "_no_body",
        "_remaining",
        "_request",
        "_sink",
        "bytes_sent",
        "keep_alive",
        "state",
        "status",
    )

    def __init__(self, sink: ResponseSink, request: Request) -> None:
        self._sink = sink
        self._request = request
        self.state = _NEW
        self.status = 0
        self.keep_alive = False
        self.bytes_sent = 0  # body bytes (framing excluded)
        self._head: bytes | None = None  # a started head not yet written (goes with the data)
        self._chunked = False
        self._no_body = False
        self._remaining: int | None = None

    @property
    def started(self) -> bool:
        return self.state != _NEW

    @property
    def done(self) -> bool:
        return self.state == _DONE

    def simple(
        self, status: int, body: Mapping[str, Any] | bytes = b"", headers: HeaderPairs = ()
    ) -> None:
        """One of the gateway's own answers: JSON (a mapping, or bytes already JSON),
        ``Server: svidgate`` and ``Date``, in one write. A gRPC request gets it as a
        trailers-only answer (HTTP 200, ``grpc-status`` / ``grpc-message`` headers)."""
        if is_grpc(self._request.header(b"content-type")):
            self.respond(200, grpc_answer_headers(status, body, headers))
            self.status = status  # for the access log: what the gateway decided
            return
        payload = body if isinstance(body, bytes) else json.dumps(body).encode("ascii")
        self.respond(status, [*_own_headers(bool(payload)), *headers], payload)

    def respond(
        self, status: int, headers: HeaderPairs, body: bytes = b"", reason: bytes | None = None
    ) -> None:
        """A whole response with a known body, head and body in one write."""
        self._begin(status, headers, len(body), reason)
        data = self._head or b""
        self._head = None
        if body and not self._no_body:
            data += body
            self.bytes_sent = len(body)
        self.state = _DONE
        self._sink.send(data)

    def start(
        self,
        status: int,
        headers: HeaderPairs,
        *,
        content_length: int | None = None,
        reason: bytes | None = None,
    ) -> None:
        """Begin a streamed response; the head leaves with the first :meth:`write` or
        :meth:`end` (one write for a small response)."""
        self._begin(status, headers, content_length, reason)

    async def write(self, chunk: bytes) -> None:
        """Send a piece of the body; waits (bounded by the write timeout) for a slow client."""
        if self.state != _STARTED:
            raise RuntimeError(f"write() on a response that is {self.state}")
        if not chunk:
            return
        if self._no_body:
            raise RuntimeError("this response has no body (HEAD, 1xx, 204 or 304)")
        if self._remaining is not None:
            if len(chunk) > self._remaining:
                raise RuntimeError("more body than the response's Content-Length")
            self._remaining -= len(chunk)
        data = b"%x\r\n%s\r\n" % (len(chunk), chunk) if self._chunked else chunk
        if self._head is not None:
            data = self._head + data
            self._head = None
        self.bytes_sent += len(chunk)
        self._sink.send(data)
        await self._sink.drain()

    async def end(self, trailers: HeaderPairs = ()) -> None:
        """Finish the response. Ending short of the Content-Length cuts the connection.
        ``trailers`` (an upstream's, e.g. gRPC's) go after a chunked body; with other framing
        HTTP/1.1 has no place for them and they are dropped."""
        if self.state != _STARTED:
            raise RuntimeError(f"end() on a response that is {self.state}")
        self.state = _DONE
        if self._remaining:
            self.abort()
            raise RuntimeError("the response ended before its Content-Length")
        data = self._head or b""
        self._head = None
        if self._chunked:
            data += b"0\r\n" + _encode_trailers(trailers) + b"\r\n"
        if data:
            self._sink.send(data)
        await self._sink.drain()

    def switch_protocols(
        self, headers: HeaderPairs, protocol: bytes, tunnel: TunnelEnd
    ) -> tuple[Any, bytes]:
        """Answer ``101 Switching Protocols`` (``Upgrade: protocol``) and hand the connection
        to ``tunnel``: returns the transport and the client's bytes already read past the head.
        The response is done; the connection never serves another HTTP request."""
        if self.state != _NEW:
            raise RuntimeError("a response was already started")
        framing = b"Connection: Upgrade\r\nUpgrade: " + protocol + b"\r\n"
        head = encode_head(101, headers, framing)
        self.state = _DONE
        self.status = 101
        self.keep_alive = False
        self._sink.send(head)
        return self._sink.upgrade(tunnel)

    def abort(self) -> None:
        """Cut the connection: the only honest end of a response that broke off mid-way."""
        self.state = _DONE
        self.keep_alive = False
        self._sink.cut()

    def _begin(
        self, status: int, headers: HeaderPairs, length: int | None, reason: bytes | None
    ) -> None:
        if self.state != _NEW:
            raise RuntimeError("a response was already started")
        if not 200 <= status <= 999:
            raise ValueError(f"not a final status: {status}")
        request = self._request
        no_body = request.method == "HEAD" or status in (204, 304)
        keep = request.keep_alive and self._sink.may_keep_alive()
        framing = b""
        if status != 204 and length is not None:
            framing = b"Content-Length: %d\r\n" % length
            self._remaining = None if no_body else length
        elif not no_body and request.version == (1, 1):
            framing, self._chunked = _CHUNKED, True
        elif not no_body:
            keep = False  # HTTP/1.0 without a length: the body ends when the connection does
        if not keep:
            framing += _CLOSE
        elif request.version == (1, 0):
            framing += _KEEP_ALIVE_10
        self._head = encode_head(status, headers, framing, reason)
        self.status = status
        self.keep_alive = keep
        self._no_body = no_body
        self.state = _STARTED
