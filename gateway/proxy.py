"""Forwarding to upstreams: pooled connections, upstream mTLS pinned to a SPIFFE ID, timeouts,
retries for idempotent bodiless requests, a circuit breaker, streaming in both directions.

aiohttp errors are translated here, where they enter, into UpstreamError (502),
UpstreamTimeout (504) and CircuitOpen (503).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from gateway.config import UpstreamConfig
from gateway.context import STREAMING, UPSTREAM_SECONDS
from gateway.errors import CircuitOpen, UpstreamError, UpstreamTimeout
from gateway.headers import downstream_response_headers
from gateway.tls import check_peer_id
from pki.errors import PkiError

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class UpstreamIdentityError(aiohttp.ClientConnectionError):
    """The upstream's certificate does not carry the pinned SPIFFE ID."""


class PinnedConnector(aiohttp.TCPConnector):
    """A TCP connector that checks the upstream's SPIFFE ID right after each TLS handshake,
    before any request byte is written."""

    def __init__(self, *, expected_id: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._expected_id = expected_id

    async def _wrap_create_connection(
        self, *args: Any, **kwargs: Any
    ) -> tuple[asyncio.Transport, aiohttp.client_proto.ResponseHandler]:
        transport, proto = await super()._wrap_create_connection(*args, **kwargs)
        if self._expected_id is not None:
            ssl_object = transport.get_extra_info("ssl_object")
            try:
                if ssl_object is None:
                    raise UpstreamIdentityError("upstream connection is not TLS")
                check_peer_id(ssl_object, self._expected_id)
            except (PkiError, UpstreamIdentityError) as exc:
                transport.abort()
                raise UpstreamIdentityError(str(exc)) from None
        return transport, proto


class CircuitBreaker:
    """Closed → open after ``threshold`` consecutive failures → one probe after ``reset``."""

    __slots__ = ("_failures", "_opened_at", "_probing", "reset", "threshold")

    def __init__(self, threshold: int, reset: float) -> None:
        self.threshold = threshold
        self.reset = reset
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

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
        self.base = cfg.url
        self.breaker = CircuitBreaker(
            cfg.circuit_breaker.failures, cfg.circuit_breaker.reset.total_seconds()
        )
        connector = PinnedConnector(
            expected_id=cfg.tls.spiffe_id if cfg.tls is not None and ssl_context else None,
            ssl=ssl_context if ssl_context is not None else False,
            limit=0,
            limit_per_host=0,
            keepalive_timeout=30,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=_NO_AUTO_HEADERS,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=cfg.timeouts.connect.total_seconds(),
                sock_read=cfg.timeouts.read.total_seconds(),
            ),
        )

    async def close(self) -> None:
        await self.session.close()

    async def forward(
        self,
        request: web.BaseRequest,
        target: str,
        headers: CIMultiDict[str],
    ) -> web.StreamResponse:
        """Send the request upstream and stream the answer back to the client."""
        loop = asyncio.get_running_loop()
        self.breaker.before(loop.time())
        url = URL(self.base + target, encoded=True)
        has_body = request.body_exists
        attempts = 1 + (self.cfg.retries if request.method in IDEMPOTENT and not has_body else 0)
        data = request.content if has_body else None
        started = time.perf_counter()
        for attempt in range(attempts):
            try:
                resp = await self.session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    compress=None,
                    chunked=None,
                )
            except UpstreamIdentityError as exc:
                self.breaker.failure(loop.time())
                raise UpstreamError("upstream_identity", str(exc)) from None
            except aiohttp.ConnectionTimeoutError:
                if attempt + 1 < attempts:
                    continue
                self.breaker.failure(loop.time())
                raise UpstreamError("connect_timeout") from None
            except aiohttp.SocketTimeoutError:
                self.breaker.failure(loop.time())
                raise UpstreamTimeout("read_timeout") from None
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
                if attempt + 1 < attempts:
                    continue
                self.breaker.failure(loop.time())
                raise UpstreamError("upstream_unreachable", type(exc).__name__) from None
            except aiohttp.ClientResponseError:
                self.breaker.failure(loop.time())
                raise UpstreamError("bad_upstream_response") from None
            except aiohttp.ClientError as exc:
                self.breaker.failure(loop.time())
                raise UpstreamError("upstream_error", type(exc).__name__) from None
            break
        try:
            return await self._relay(request, resp, started)
        finally:
            resp.release()

    async def _relay(
        self, request: web.BaseRequest, resp: aiohttp.ClientResponse, started: float
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        try:
            out_headers = downstream_response_headers(resp.raw_headers)
        except UpstreamError:
            self.breaker.failure(loop.time())
            raise
        self.breaker.success()
        request[UPSTREAM_SECONDS] = time.perf_counter() - started
        out = web.StreamResponse(status=resp.status, reason=resp.reason, headers=out_headers)
        request[STREAMING] = True
        if request.method == "HEAD" or resp.status in (204, 304) or resp.status < 200:
            await out.prepare(request)
            await out.write_eof()
            return out
        if "Content-Length" not in out_headers and request.version >= (1, 1):
            out.enable_chunked_encoding()
        await out.prepare(request)
        try:
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
        except (TimeoutError, aiohttp.ClientError):
            # Headers are out: the only honest signal left is to cut the connection.
            if request.transport is not None:
                request.transport.abort()
            raise
        await out.write_eof()
        return out
