"""One HTTP/2 stream as the request pipeline sees it: the same :class:`Body` and
:class:`Responder` shapes as HTTP/1.1, so ``GatewayApp.handle`` runs unchanged.

:class:`StreamBody` is fed by DATA frames and gives flow-control credit back only as the
handler reads (the client can never have more than its window in flight: a slow upstream
slows the client). :class:`H2Responder` queues response bytes on the stream
(:class:`StreamState`), which the connection sends as the client's windows allow; a writer
waits until its bytes left, bounded by the write timeout. A gRPC request that the gateway
answers itself gets a trailers-only answer (:func:`~svidgate.gateway.errors.grpc_error_headers`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any, Protocol

from svidgate.gateway.errors import grpc_answer_headers, is_grpc
from svidgate.gateway.http1.body import Body
from svidgate.gateway.http1.errors import BodyError, ClientDisconnected, WriteTimeout
from svidgate.gateway.http1.limits import Counters
from svidgate.gateway.http1.message import Request
from svidgate.gateway.http1.respond import SERVER, HeaderPairs, Responder, TunnelEnd, http_date

Trailers = list[tuple[bytes, bytes]]
# Never sent in an HTTP/2 response (RFC 9113 §8.2.2); the HTTP/1.1 names the core owns too.
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)


class StreamOwner(Protocol):
    """What a stream needs from its connection."""

    def consumed(self, stream_id: int, size: int) -> None:
        """``size`` request-body bytes were read (or dropped): give the client its credit."""

    def pump(self, stream: StreamState) -> None:
        """Send what the stream has queued, as far as the windows allow."""

    def reset(self, stream: StreamState, code: int) -> None:
        """Reset the stream (RST_STREAM ``code``)."""

    async def drain(self) -> None:
        """Wait while the client does not read the connection (bounded by the write timeout)."""


class StreamState:
    """The connection's record of one stream: what is queued for the client, and the waits."""

    __slots__ = (
        "_waiter",
        "body",
        "closed",
        "end",
        "ended",
        "headers",
        "owner",
        "pending",
        "stream_id",
        "task",
        "trailers",
        "write_timeout",
    )

    def __init__(self, owner: StreamOwner, stream_id: int, write_timeout: float) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.write_timeout = write_timeout
        self.body: Body | None = None
        self.task: asyncio.Task[None] | None = None
        self.headers: list[tuple[bytes, bytes]] | None = None  # response head not yet sent
        self.pending = bytearray()  # response-body bytes waiting for window
        self.end = False  # the response is complete once pending is sent
        self.trailers: Trailers = []
        self.ended = False  # END_STREAM sent
        self.closed = False  # reset (either side) or the connection is gone
        self._waiter: asyncio.Future[None] | None = None

    @property
    def flushed(self) -> bool:
        return not self.pending and (not self.end or self.ended)

    def wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def sent(self) -> None:
        """Wait until everything queued left (the client's window opened), bounded by the
        write timeout (then the stream is reset); raises :class:`ClientDisconnected` when the
        stream is gone."""
        while not self.flushed:
            if self.closed:
                raise ClientDisconnected("client_disconnected")
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self.write_timeout):
                    await asyncio.shield(waiter)
            except TimeoutError:
                self.owner.reset(self, 0x8)  # CANCEL: the client does not read
                raise WriteTimeout("client_not_reading") from None
        if self.closed and not self.ended:
            raise ClientDisconnected("client_disconnected")


class StreamBody(Body):
    """A request body framed by DATA frames and END_STREAM (no Content-Length needed)."""

    __slots__ = ("_owner", "_stream_id", "trailers")

    def __init__(
        self,
        owner: StreamOwner,
        stream_id: int,
        request: Request,
        *,
        default_limit: int,
        timeout: float,
        buffer_high: int,
        counters: Counters,
    ) -> None:
        super().__init__(
            _NoSource(),
            request,
            default_limit=default_limit,
            timeout=timeout,
            buffer_high=buffer_high,
            max_trailer_bytes=0,
            counters=counters,
        )
        self._decoder = None
        self._complete = False
        self._owner = owner
        self._stream_id = stream_id
        self.trailers: Trailers = []  # request trailers (relayed to an HTTP/2 upstream)

    def push(self, data: bytes) -> bool:
        """One DATA frame's bytes; False when they break the declared Content-Length (the
        stream is malformed). Bytes arriving after a failure are dropped (and credited)."""
        if self._error is not None or self._complete:
            self._owner.consumed(self._stream_id, len(data))
            return True
        self._take([data])
        length = self._length
        return length is None or self._received <= length

    def finish(self, trailers: Trailers | None = None) -> bool:
        """END_STREAM; False when fewer bytes came than the Content-Length said."""
        if trailers:
            self.trailers = trailers
        if self._error is not None or self._complete:
            return True
        self._complete = True
        self._wake()
        length = self._length
        return length is None or self._received == length

    def _pop(self) -> bytes:
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        self._owner.consumed(self._stream_id, len(chunk))
        return chunk

    def _set_error(self, exc: BodyError) -> None:
        dropped = self._buffered
        super()._set_error(exc)
        if dropped:
            self._owner.consumed(self._stream_id, dropped)


class _NoSource:
    """Flow control of a stream is its window (credited on read), not the transport."""

    def want_body(self) -> None:
        return None

    def body_consumed(self) -> None:
        return None


class H2Responder(Responder):
    """The response of one stream; same calls as the HTTP/1.1 responder, plus trailers."""

    __slots__ = ("_grpc", "_stream")

    def __init__(self, stream: StreamState, request: Request) -> None:
        super().__init__(_StreamSink(stream), request)
        self._stream = stream
        self._grpc = is_grpc(request.header(b"content-type"))
        self.keep_alive = True

    def simple(
        self, status: int, body: Mapping[str, Any] | bytes = b"", headers: HeaderPairs = ()
    ) -> None:
        """One of the gateway's own answers: JSON, or for a gRPC request trailers-only with
        ``grpc-status`` / ``grpc-message`` (reason code first)."""
        if not self._grpc:
            payload = body if isinstance(body, bytes) else json.dumps(body).encode("ascii")
            own = [(b"server", SERVER), (b"date", http_date())]
            if payload:
                own.append((b"content-type", b"application/json"))
            self.respond(status, [*own, *headers], payload)
            return
        self.respond(200, grpc_answer_headers(status, body, headers))
        self.status = status  # for the access log: what the gateway decided

    def respond(
        self, status: int, headers: HeaderPairs, body: bytes = b"", reason: bytes | None = None
    ) -> None:
        self._begin(status, headers, len(body), reason)
        stream = self._stream
        if body and not self._no_body:
            stream.pending += body
            self.bytes_sent = len(body)
        stream.end = True
        self.state = "done"
        stream.owner.pump(stream)

    def start(
        self,
        status: int,
        headers: HeaderPairs,
        *,
        content_length: int | None = None,
        reason: bytes | None = None,
    ) -> None:
        self._begin(status, headers, content_length, reason)
        self._stream.owner.pump(self._stream)  # the head leaves now (gRPC initial metadata)

    async def write(self, chunk: bytes) -> None:
        if self.state != "started":
            raise RuntimeError(f"write() on a response that is {self.state}")
        if not chunk:
            return
        if self._no_body:
            raise RuntimeError("this response has no body (HEAD, 204 or 304)")
        stream = self._stream
        stream.pending += chunk
        self.bytes_sent += len(chunk)
        stream.owner.pump(stream)
        await stream.sent()
        await stream.owner.drain()

    async def end(self, trailers: HeaderPairs = ()) -> None:
        """Finish the response; ``trailers`` go in a last HEADERS frame (gRPC status)."""
        if self.state != "started":
            raise RuntimeError(f"end() on a response that is {self.state}")
        self.state = "done"
        stream = self._stream
        stream.trailers = [(n.lower(), v) for n, v in trailers if n.lower() not in _NO_TRAILER]
        stream.end = True
        stream.owner.pump(stream)
        await stream.sent()

    def switch_protocols(
        self, headers: HeaderPairs, protocol: bytes, tunnel: TunnelEnd
    ) -> tuple[Any, bytes]:
        raise RuntimeError("no protocol switch on HTTP/2")

    def abort(self) -> None:
        """Reset the stream (INTERNAL_ERROR): the honest end of a response broken off."""
        self.state = "done"
        self._stream.owner.reset(self._stream, 0x2)

    def _begin(
        self, status: int, headers: HeaderPairs, length: int | None, reason: bytes | None
    ) -> None:
        if self.state != "new":
            raise RuntimeError("a response was already started")
        if not 200 <= status <= 999:
            raise ValueError(f"not a final status: {status}")
        no_body = self._request.method == "HEAD" or status in (204, 304)
        head = [(b":status", b"%d" % status)]
        for name, value in headers:
            lower = name.lower()
            if lower in _CONNECTION_SPECIFIC or lower == b"content-length":
                continue
            head.append((lower, value))
        if length is not None and status != 204:
            head.append((b"content-length", b"%d" % length))
        self._stream.headers = head
        self.status = status
        self._no_body = no_body
        self.state = "started"


_NO_TRAILER = _CONNECTION_SPECIFIC | {b"content-length", b"host"}


class _StreamSink:
    """The ResponseSink the base class keeps (only its abort path is reachable)."""

    __slots__ = ("_stream",)

    def __init__(self, stream: StreamState) -> None:
        self._stream = stream

    def may_keep_alive(self) -> bool:
        return True

    def send(self, data: bytes) -> None:
        raise RuntimeError("an HTTP/2 stream takes frames, not bytes")

    async def drain(self) -> None:
        await self._stream.sent()

    def cut(self) -> None:
        self._stream.owner.reset(self._stream, 0x2)

    def upgrade(self, tunnel: TunnelEnd) -> tuple[Any, bytes]:
        raise RuntimeError("no protocol switch on HTTP/2")
