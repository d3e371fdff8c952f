"""Forwarding to an upstream with ``protocol: h2`` (gRPC services): the same contract as
:class:`~svidgate.gateway.proxy.Upstream` (breaker, errors, :class:`ForwardOutcome`) over
multiplexed HTTP/2 streams (:mod:`svidgate.gateway.http2.pool`).

The request body and the response relay run at once (bidirectional streaming); each side
moves only as fast as the other end reads (windows credited on read, the client's write
waits). Response trailers (``grpc-status``) are relayed; the client's request trailers too.
``grpc-timeout`` bounds the whole upstream call; a client that goes away (its stream reset,
its connection lost) cancels the upstream stream (RST_STREAM CANCEL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

from multidict import CIMultiDict
from svidgate.gateway.config import UpstreamConfig
from svidgate.gateway.errors import UpstreamBusy, UpstreamError, UpstreamTimeout
from svidgate.gateway.headers import response_header_pairs
from svidgate.gateway.http1 import Body, BodyError, Request, Responder, ResponseError
from svidgate.gateway.http2.client import ClientStream, H2ClientConnection, Headers, StreamReset
from svidgate.gateway.http2.pool import H2Pool
from svidgate.gateway.http2.stream import StreamBody
from svidgate.gateway.proxy import ForwardOutcome, Upstream
from svidgate.gateway.upstream_client import (
    ConnectFailed,
    ConnectTimeout,
    IdentityMismatch,
    PoolTimeout,
    UpstreamClientError,
)
from yarl import URL

log = logging.getLogger("svidgate.gateway")

_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_NOT_FORWARDED = frozenset({"host", "te", "content-length"})
_TRAILER_DROP = frozenset({b"content-length", b"transfer-encoding", b"connection", b"host"})


def grpc_timeout(value: str | None) -> float | None:
    """Seconds from a ``grpc-timeout`` header (``1S``, ``250m``, at most 8 digits), or None."""
    if not value or len(value) > 9 or value[-1] not in _UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * _UNITS[value[-1]]


class H2Upstream(Upstream):
    """One upstream spoken to over HTTP/2."""

    def __init__(self, name: str, cfg: UpstreamConfig, ssl_context: ssl.SSLContext | None):
        super().__init__(name, cfg, ssl_context)
        url = URL(cfg.url)
        assert url.host is not None and url.port is not None
        self._scheme = b"https" if url.scheme == "https" else b"http"
        self._authority = url.raw_authority.encode("ascii")
        self.h2pool = H2Pool(
            url.host,
            url.port,
            ssl_context=ssl_context,
            expected_id=cfg.tls.spiffe_id if cfg.tls is not None and ssl_context else None,
            connect_timeout=cfg.timeouts.connect.total_seconds(),
            max_connections=cfg.max_connections,
            queue_timeout=cfg.queue_timeout.total_seconds(),
        )

    async def close(self) -> None:
        await self.h2pool.close()
        await super().close()

    async def tunnel(self, *args: object, **kwargs: object) -> ForwardOutcome:
        raise UpstreamError("upgrade_refused", "no WebSocket over an HTTP/2 upstream")

    async def forward(
        self,
        request: Request,
        body: Body,
        responder: Responder,
        target: str,
        headers: CIMultiDict[str],
    ) -> ForwardOutcome:
        loop = asyncio.get_running_loop()
        self.breaker.before(loop.time())
        block = self._head(request, target, headers)
        deadline = grpc_timeout(headers.get("grpc-timeout"))
        started = time.perf_counter()
        exchange = _Exchange(self, request, body, responder, started)
        try:
            async with asyncio.timeout(deadline):
                return await exchange.run(block)
        except TimeoutError:
            exchange.cancel()
            if not responder.started:
                raise UpstreamTimeout("deadline_exceeded", "grpc-timeout reached") from None
            if not responder.done:
                with contextlib.suppress(ResponseError, RuntimeError):
                    await responder.end(
                        [(b"grpc-status", b"4"), (b"grpc-message", b"deadline_exceeded")]
                    )
            return exchange.outcome("deadline_exceeded")
        finally:
            exchange.cancel()

    def _head(self, request: Request, target: str, headers: CIMultiDict[str]) -> Headers:
        authority = headers.get("Host")
        block: Headers = [
            (b":method", request.method.encode("ascii")),
            (b":scheme", self._scheme),
            (b":authority", authority.encode("latin-1") if authority else self._authority),
            (b":path", target.encode("latin-1")),
        ]
        if request.header(b"te") == b"trailers" or _is_grpc(headers):
            block.append((b"te", b"trailers"))
        for name, value in headers.items():
            lower = name.lower()
            if lower in _NOT_FORWARDED:
                continue
            block.append((lower.encode("latin-1"), value.encode("latin-1")))
        if request.content_length is not None:
            block.append((b"content-length", b"%d" % request.content_length))
        flat = b"".join(name + value for name, value in block)
        if b"\r" in flat or b"\n" in flat or b"\x00" in flat:
            raise UpstreamError("bad_request_header", "CR, LF or NUL in a request header")
        return block

    def failed(self, exc: UpstreamClientError) -> UpstreamError | UpstreamBusy:
        """An upstream-client error before the response: counted, mapped to a gateway error."""
        self.breaker.failure(asyncio.get_running_loop().time())
        if isinstance(exc, PoolTimeout):
            return UpstreamBusy("upstream_busy", "every stream is in use")
        if isinstance(exc, ConnectTimeout):
            return UpstreamError("connect_timeout")
        if isinstance(exc, IdentityMismatch):
            return UpstreamError("upstream_identity", str(exc))
        if isinstance(exc, ConnectFailed):
            return UpstreamError("upstream_unreachable", str(exc))
        if isinstance(exc, StreamReset):
            return UpstreamError("upstream_reset", str(exc))
        return UpstreamError("bad_upstream_response", type(exc).__name__)


class _Exchange:
    """One request on one upstream stream."""

    def __init__(
        self, upstream: H2Upstream, request: Request, body: Body, responder: Responder, t0: float
    ) -> None:
        self.upstream = upstream
        self.request = request
        self.body = body
        self.responder = responder
        self.started = t0
        self.seconds = 0.0
        self.conn: H2ClientConnection | None = None
        self.stream: ClientStream | None = None
        self.upload: asyncio.Task[None] | None = None
        self.body_error: BodyError | None = None
        self.sent = 0
        self.relayed = 0

    async def run(self, block: Headers) -> ForwardOutcome:
        upstream = self.upstream
        has_body = self.request.has_body
        read_timeout = upstream.cfg.timeouts.read.total_seconds()
        try:
            self.conn, self.stream = await upstream.h2pool.open(block, end_stream=not has_body)
        except PoolTimeout as exc:
            raise upstream.failed(exc) from None
        except ValueError as exc:
            raise UpstreamError("bad_request_header", str(exc)) from None
        except UpstreamClientError as exc:
            raise upstream.failed(exc) from None
        stream = self.stream
        if has_body:
            self.upload = asyncio.get_running_loop().create_task(self._send_body(stream))
        try:
            async with asyncio.timeout(read_timeout):
                status, raw = await stream.response()
        except TimeoutError:
            if self.body_error is not None:
                raise self.body_error from None
            upstream.breaker.failure(asyncio.get_running_loop().time())
            raise UpstreamTimeout("read_timeout") from None
        except UpstreamClientError as exc:
            if self.body_error is not None:
                raise self.body_error from None
            raise upstream.failed(exc) from None
        upstream.breaker.success()
        self.seconds = time.perf_counter() - self.started
        return await self._relay(stream, status, raw, read_timeout)

    async def _relay(
        self, stream: ClientStream, status: int, raw: Headers, read_timeout: float
    ) -> ForwardOutcome:
        responder = self.responder
        out = response_header_pairs(raw)
        length = _length(raw)
        if stream.ended and not stream.trailers:
            # a whole answer in one HEADERS frame (a gRPC trailers-only status, a 204 …)
            responder.respond(status, out, b"")
            return self.outcome()
        responder.start(status, out, content_length=length)
        try:
            while True:
                async with asyncio.timeout(read_timeout):
                    chunk = await stream.read()
                if not chunk:
                    break
                await responder.write(chunk)
                self.relayed += len(chunk)
        except ResponseError:
            raise
        except (TimeoutError, UpstreamClientError) as exc:
            reason = "read_timeout" if isinstance(exc, TimeoutError) else "upstream_reset"
            log.warning("upstream %s broke off mid-response (%s)", self.upstream.name, reason)
            responder.abort()
            return self.outcome(reason)
        trailers = [(n, v) for n, v in stream.trailers if n.lower() not in _TRAILER_DROP]
        await responder.end(trailers)
        return self.outcome()

    async def _send_body(self, stream: ClientStream) -> None:
        """The client's body to the upstream stream; a client body failure resets it."""
        body = self.body
        try:
            while chunk := await body.read():
                await stream.send(chunk)
                self.sent += len(chunk)
        except BodyError as exc:
            self.body_error = exc
            stream.cancel()
            return
        except UpstreamClientError:
            return  # the response side sees the same failure
        trailers = body.trailers if isinstance(body, StreamBody) else None
        stream.end(_request_trailers(trailers))

    def cancel(self) -> None:
        """The exchange is over (or abandoned): stop the upload, release the stream (RST
        CANCEL when the upstream still expects more of it)."""
        if self.upload is not None and not self.upload.done():
            self.upload.cancel()
        if self.conn is not None and self.stream is not None:
            self.conn.stream_done(self.stream)
            self.stream = None

    def outcome(self, error: str | None = None) -> ForwardOutcome:
        return ForwardOutcome(
            upstream=self.upstream.name,
            status=self.responder.status,
            upstream_seconds=self.seconds,
            bytes_in=self.sent,
            bytes_out=self.relayed,
            error=error,
            streamed=True,
        )


def _is_grpc(headers: CIMultiDict[str]) -> bool:
    return headers.get("Content-Type", "").lower().startswith("application/grpc")


def _length(raw: Headers) -> int | None:
    value = next((v for k, v in raw if k.lower() == b"content-length"), None)
    return int(value) if value is not None and value.isdigit() else None


def _request_trailers(trailers: Headers | None) -> Headers | None:
    if not trailers:
        return None
    return [(n, v) for n, v in trailers if n.lower() not in _TRAILER_DROP]
