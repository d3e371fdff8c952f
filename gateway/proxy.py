"""Forwarding to upstreams: pooled connections, upstream mTLS pinned to a SPIFFE ID, timeouts,
retries for idempotent bodiless requests, a circuit breaker, streaming in both directions.

The upstream leg is the small HTTP/1.1 client in ``gateway.upstream_client``; its errors are
translated here into UpstreamError (502), UpstreamTimeout (504) and CircuitOpen (503).
Small responses (Content-Length up to :data:`BUFFER_LIMIT`) are read whole and sent to the
client in one write; larger, chunked or read-until-close bodies are streamed.
:meth:`Upstream.forward` returns a :class:`ForwardOutcome` (status, upstream, timing, bytes in
and out, and why a committed response broke off) for the pipeline's access log and metrics.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import dataclass

from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict
from svidgate.gateway.config import UpstreamConfig
from svidgate.gateway.errors import CircuitOpen, UpstreamBusy, UpstreamError, UpstreamTimeout
from svidgate.gateway.headers import response_header_pairs
from svidgate.gateway.http1 import Body, BodyError, Request, Responder, ResponseError
from svidgate.gateway.tunnel import Tunnel, UpstreamSide
from svidgate.gateway.upstream_client import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    IdentityMismatch,
    PoolTimeout,
    ReadTimeout,
    UpstreamClientError,
    UpstreamConnection,
    UpstreamPool,
    encode_request_head,
)
from yarl import URL

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
BUFFER_LIMIT = 64 * 1024  # bodies up to this Content-Length go out with the headers in one write
_NO_BODY_STATUS = frozenset({204, 304})

log = logging.getLogger("svidgate.gateway")


@dataclass(frozen=True, slots=True)
class ForwardOutcome:
    """What one forwarded exchange did (its response already went to the client's
    :class:`Responder`): the figures the access log and the metrics report.

    ``error`` is set only when the response was already committed (its status line sent) and
    the exchange then broke off: the client connection was cut, since no error response can
    follow. Failures before that point are raised as gateway errors instead."""

    upstream: str  # the upstream's name in the config
    status: int  # the status the client was sent
    upstream_seconds: float  # request out → the upstream's head (its whole body when buffered)
    bytes_in: int  # request-body bytes sent upstream
    bytes_out: int  # response-body bytes relayed to the client
    error: str | None = None
    streamed: bool = False  # the body was relayed piece by piece (not read whole first)


class CircuitBreaker:
    """Closed → open after ``threshold`` consecutive failures → one probe after ``reset``."""

    __slots__ = ("_failures", "_opened_at", "_probing", "reset", "threshold")

    def __init__(self, threshold: int, reset: float) -> None:
        self.threshold = threshold
        self.reset = reset
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    def before(self, now: float) -> None:
        """Raise :class:`CircuitOpen` unless a request may go through."""
        if self._opened_at is None:
            return
        if now - self._opened_at >= self.reset and not self._probing:
            self._probing = True
            return
        raise CircuitOpen("circuit_open", "the upstream is failing")

    def success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def failure(self, now: float) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.threshold:
            self._opened_at = now
        self._probing = False


class Upstream:
    """One upstream service: a connection pool and its breaker."""

    def __init__(self, name: str, cfg: UpstreamConfig, ssl_context: ssl.SSLContext | None):
        self.name = name
        self.cfg = cfg
        self.breaker = CircuitBreaker(
            cfg.circuit_breaker.failures, cfg.circuit_breaker.reset.total_seconds()
        )
        url = URL(cfg.url)
        assert url.host is not None and url.port is not None  # validated by the config model
        self._host_header = url.raw_authority
        self.pool = UpstreamPool(
            url.host,
            url.port,
            ssl_context=ssl_context,
            expected_id=cfg.tls.spiffe_id if cfg.tls is not None and ssl_context else None,
            connect_timeout=cfg.timeouts.connect.total_seconds(),
            read_timeout=cfg.timeouts.read.total_seconds(),
            idle_timeout=30.0,
            max_connections=cfg.max_connections,
            queue_timeout=cfg.queue_timeout.total_seconds(),
        )

    async def close(self) -> None:
        await self.pool.close()

    async def forward(
        self,
        request: Request,
        body: Body,
        responder: Responder,
        target: str,
        headers: CIMultiDict[str],
    ) -> ForwardOutcome:
        """Send the request upstream and relay the answer to the client; what happened comes
        back as the outcome. Failures before the response is committed are raised; a client
        whose body fails (stalled, too large, cut) gets its :class:`BodyError` raised, never
        counted against the upstream."""
        loop = asyncio.get_running_loop()
        breaker = self.breaker
        breaker.before(loop.time())
        method = request.method
        upload = _Upload(body) if request.has_body else None
        try:
            head, chunked = encode_request_head(
                method, target, headers, default_host=self._host_header, has_body=upload is not None
            )
        except ValueError as exc:
            raise UpstreamError("bad_request_header", str(exc)) from None
        attempts = 1 + (self.cfg.retries if method in IDEMPOTENT and upload is None else 0)
        started = time.perf_counter()
        conn: UpstreamConnection | None = None
        body_task: asyncio.Task[None] | None = None
        try:
            for attempt in range(attempts):
                try:
                    conn, _reused = await self.pool.acquire()
                    waiter = conn.send(head, head_only=method == "HEAD")
                    if upload is not None:
                        body_task = loop.create_task(upload.run(conn, chunked))
                    message, payload = await waiter
                except PoolTimeout:
                    raise UpstreamBusy("upstream_busy", "every connection is in use") from None
                except (ConnectTimeout, ConnectFailed, Disconnected) as exc:
                    if conn is not None:
                        self.pool.discard(conn)
                        conn = None
                    if upload is not None and upload.error is not None:
                        raise upload.error from None
                    retryable = not isinstance(exc, Disconnected) or exc.before_response
                    if retryable and attempt + 1 < attempts:
                        continue
                    breaker.failure(loop.time())
                    if isinstance(exc, ConnectTimeout):
                        raise UpstreamError("connect_timeout") from None
                    if isinstance(exc, Disconnected) and not exc.before_response:
                        raise UpstreamError("bad_upstream_response", str(exc)) from None
                    raise UpstreamError("upstream_unreachable", type(exc).__name__) from None
                except IdentityMismatch as exc:
                    breaker.failure(loop.time())
                    raise UpstreamError("upstream_identity", str(exc)) from None
                except ReadTimeout:
                    if upload is not None and upload.error is not None:
                        raise upload.error from None
                    breaker.failure(loop.time())
                    raise UpstreamTimeout("read_timeout") from None
                except BadResponse:
                    breaker.failure(loop.time())
                    raise UpstreamError("bad_upstream_response") from None
                except UpstreamClientError as exc:
                    breaker.failure(loop.time())
                    raise UpstreamError("upstream_error", type(exc).__name__) from None
                break
            assert conn is not None
            outcome = await self._relay(
                request, responder, message, payload, started=started, upload=upload
            )
            if body_task is not None and not body_task.done():
                # the upstream answered before taking the whole body: never pooled
                self.pool.discard(conn)
            elif outcome.error is None:
                self.pool.release(conn)  # closed instead when anything is left unread
            else:
                self.pool.discard(conn)
            conn = None
            return outcome
        finally:
            if conn is not None:
                self.pool.discard(conn)  # never pooled after an error (a client not reading …)
            if body_task is not None and not body_task.done():
                body_task.cancel()

    async def tunnel(
        self,
        request: Request,
        responder: Responder,
        target: str,
        headers: CIMultiDict[str],
        idle_timeout: float,
    ) -> ForwardOutcome:
        """A WebSocket upgrade: ask the upstream on a fresh connection; on its 101 answer the
        client with 101 and relay bytes both ways until either side closes or goes idle."""
        loop = asyncio.get_running_loop()
        self.breaker.before(loop.time())
        headers["Connection"] = "Upgrade"
        headers["Upgrade"] = "websocket"
        try:
            head, _chunked = encode_request_head(
                request.method, target, headers, default_host=self._host_header, has_body=False
            )
        except ValueError as exc:
            raise UpstreamError("bad_request_header", str(exc)) from None
        started = time.perf_counter()
        try:
            transport = await self.pool.connect()
        except ConnectTimeout:
            self.breaker.failure(loop.time())
            raise UpstreamError("connect_timeout") from None
        except IdentityMismatch as exc:
            self.breaker.failure(loop.time())
            raise UpstreamError("upstream_identity", str(exc)) from None
        except UpstreamClientError as exc:
            self.breaker.failure(loop.time())
            raise UpstreamError("upstream_unreachable", type(exc).__name__) from None
        side = UpstreamSide(transport)
        transport.set_protocol(side)
        transport.write(head)
        try:
            answer = await side.answer(self.cfg.timeouts.read.total_seconds())
        except UpstreamError:
            self.breaker.failure(loop.time())
            raise
        if answer.status != 101:
            transport.close()
            self.breaker.success()
            raise UpstreamError("upgrade_refused", f"the upstream answered {answer.status}")
        self.breaker.success()
        seconds = time.perf_counter() - started
        relay = Tunnel(side, idle_timeout)
        try:
            client, rest = responder.switch_protocols(answer.headers, b"websocket", relay)
        except ResponseError:
            relay.close()
            raise
        relay.start(client, rest)
        if answer.rest:
            relay.from_upstream(answer.rest)
        await relay.done.wait()
        return ForwardOutcome(
            upstream=self.name,
            status=101,
            upstream_seconds=seconds,
            bytes_in=relay.bytes_in,
            bytes_out=relay.bytes_out,
            streamed=True,
        )

    async def _relay(
        self,
        request: Request,
        responder: Responder,
        message: RawResponseMessage,
        payload: StreamReader,
        *,
        started: float,
        upload: _Upload | None,
    ) -> ForwardOutcome:
        loop = asyncio.get_running_loop()
        breaker = self.breaker
        try:
            out_headers = response_header_pairs(message.raw_headers)
        except UpstreamError:
            breaker.failure(loop.time())
            raise
        status = message.code
        reason = message.reason.encode("latin-1", "replace") if message.reason else None
        length = _content_length(message)
        if request.method == "HEAD" or status in _NO_BODY_STATUS:
            breaker.success()
            seconds = time.perf_counter() - started
            responder.start(status, out_headers, content_length=length, reason=reason)
            await responder.end()
            return self._outcome(status, seconds, upload, 0)
        if length is not None and length <= BUFFER_LIMIT:
            # Small body: read it whole, then headers + body leave in one write.
            try:
                data = await payload.read() if length else b""
            except ReadTimeout:
                breaker.failure(loop.time())
                raise UpstreamTimeout("read_timeout") from None
            except UpstreamClientError:
                breaker.failure(loop.time())
                raise UpstreamError("bad_upstream_response") from None
            breaker.success()
            seconds = time.perf_counter() - started
            responder.respond(status, out_headers, data, reason)
            return self._outcome(status, seconds, upload, len(data))
        breaker.success()
        seconds = time.perf_counter() - started
        responder.start(status, out_headers, content_length=length, reason=reason)
        sent, error = await _stream_body(payload, responder)
        if error is not None and error != "internal":
            log.warning(
                "upstream %s broke off mid-body (%s): client connection cut", self.name, error
            )
        return self._outcome(status, seconds, upload, sent, error, streamed=True)

    def _outcome(
        self,
        status: int,
        upstream_seconds: float,
        upload: _Upload | None,
        bytes_out: int,
        error: str | None = None,
        *,
        streamed: bool = False,
    ) -> ForwardOutcome:
        return ForwardOutcome(
            upstream=self.name,
            status=status,
            upstream_seconds=upstream_seconds,
            bytes_in=upload.sent if upload is not None else 0,
            bytes_out=bytes_out,
            error=error,
            streamed=streamed,
        )


async def _stream_body(payload: StreamReader, responder: Responder) -> tuple[int, str | None]:
    """Relay the body of a committed response: (bytes sent, error reason or None), with
    back-pressure (each write waits for a slow client, bounded by the write timeout).

    The status line is out, so no error response can follow: when the upstream breaks off the
    client connection is cut (the only honest signal left) and the reason is returned. The
    client going away or not reading (:class:`ResponseError`) is raised."""
    sent = 0
    try:
        while True:
            chunk = await payload.readany()
            if not chunk:
                break
            await responder.write(chunk)
            sent += len(chunk)
        await responder.end()
        return sent, None
    except ResponseError:
        raise
    except ReadTimeout:
        error = "read_timeout"
    except UpstreamClientError:
        error = "bad_upstream_response"
    except Exception:
        log.exception("unexpected error while relaying a response body")
        error = "internal"
    responder.abort()
    return sent, error


def _content_length(message: RawResponseMessage) -> int | None:
    """The response's Content-Length (validated by the parser), or None when chunked/absent."""
    if message.chunked:
        return None
    value = message.headers.get("Content-Length")
    if value is None:
        return None
    return int(value)


class _Upload:
    """The client's request body on its way upstream (re-chunked when it had no
    Content-Length): how many bytes went out, and the client's :class:`BodyError` when the body
    failed on its side (stalled, too large, cut: not the upstream's fault, so never counted
    against its circuit breaker)."""

    __slots__ = ("body", "error", "sent")

    def __init__(self, body: Body) -> None:
        self.body = body
        self.sent = 0
        self.error: BodyError | None = None

    async def run(self, conn: UpstreamConnection, chunked: bool) -> None:
        """Stream the body with back-pressure (the next chunk is read only once the upstream
        took the last); on any failure drop the upstream connection, so the response waiter
        fails instead of waiting for the read timeout."""
        transport = conn.transport
        body = self.body
        while True:
            try:
                chunk = await body.read()
            except asyncio.CancelledError:
                raise
            except BodyError as exc:
                self.error = exc
                conn.break_off()
                return
            try:
                if transport is None or transport.is_closing():
                    raise ConnectionResetError("upstream connection closed")
                if not chunk:
                    break
                if chunked:
                    transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                else:
                    transport.write(chunk)
                self.sent += len(chunk)
                conn.progress()
                await conn.drain()
            except asyncio.CancelledError:
                raise
            except Exception:
                conn.break_off()
                return
        if chunked:
            transport.write(b"0\r\n\r\n")
        conn.progress()
