"""A small pooled HTTP/1.1 client for the upstream leg, on ``asyncio.Protocol``.

One :class:`UpstreamPool` per upstream keeps idle keep-alive connections (bounded, closed after
an idle timeout). Each :class:`UpstreamConnection` writes a pre-encoded request head, streams a
request body if there is one, and parses the answer with aiohttp's compiled response parser
(the same one aiohttp's client uses). Upstream TLS is checked against the pinned SPIFFE ID
right after the handshake, before any request byte is written.

Failures are raised as the flat errors below; ``gateway.proxy`` maps them to HTTP statuses.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpResponseParser, RawResponseMessage
from aiohttp.streams import StreamReader
from multidict import CIMultiDict
from svidgate.gateway.tls import check_peer_id
from svidgate.pki.errors import PkiError

READ_LIMIT = 2**16
MAX_HEAD = 64 * 1024  # response head bytes buffered for the obs-fold check
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
# A header line (after a LF, not the blank line) whose name holds a non-token character before
# its colon; an empty name; or a line that starts with SP/HT (obs-fold).
_BAD_LINE = re.compile(rb"\n(?![\r\n])(?:[" + _TCHAR + rb"]*[^" + _TCHAR + rb":\r\n]|:)")
# Methods that carry "Content-Length: 0" when sent without a body (as aiohttp's client did).
_EMPTY_BODY_LENGTH = frozenset({"POST", "PUT", "PATCH"})


class UpstreamClientError(Exception):
    """Base of the upstream client's errors; ``str(err)`` never holds a header value."""


class ConnectTimeout(UpstreamClientError):
    """TCP connect + TLS handshake did not finish within the connect timeout."""


class ConnectFailed(UpstreamClientError):
    """The connection could not be made (refused, unreachable, TLS handshake failed)."""


class IdentityMismatch(UpstreamClientError):
    """The upstream's certificate does not carry the pinned SPIFFE ID (or is not TLS)."""


class Disconnected(UpstreamClientError):
    """The connection closed before a complete response head arrived.

    ``before_response`` is true when not a single response byte was received (a stale pooled
    connection): only then may an idempotent bodiless request be retried."""

    def __init__(self, message: str, *, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class PoolTimeout(UpstreamClientError):
    """Every one of the pool's ``max_connections`` stayed in use for the whole queue timeout."""


class ReadTimeout(UpstreamClientError):
    """No byte from the upstream for longer than the read timeout."""


class BadResponse(UpstreamClientError):
    """The upstream's answer is not valid HTTP/1.x (status line, headers or framing)."""


class PayloadError(UpstreamClientError):
    """The response body ended early or its framing (chunks, length) was invalid."""


def encode_request_head(
    method: str,
    target: str,
    headers: CIMultiDict[str],
    *,
    default_host: str,
    has_body: bool,
) -> tuple[bytes, bool]:
    """The request line and headers, in the given order; returns (head, chunked).

    A body without Content-Length is sent chunked; a POST/PUT/PATCH without a body carries
    ``Content-Length: 0``. Raises :class:`ValueError` for CR, LF or NUL in a name or value."""
    lines = [f"{method} {target} HTTP/1.1"]
    if "Host" not in headers:
        lines.append(f"Host: {default_host}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    has_length = "Content-Length" in headers
    chunked = has_body and not has_length
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    elif not has_body and not has_length and method in _EMPTY_BODY_LENGTH:
        lines.append("Content-Length: 0")
    head = "\r\n".join(lines) + "\r\n\r\n"
    # One pass over the whole head instead of a regex per header: every CR and LF must be one
    # of the separators written above, and no NUL or space may hide in the target.
    breaks = len(lines) + 1
    if head.count("\n") != breaks or head.count("\r") != breaks or "\x00" in head or " " in target:
        raise ValueError("CR, LF or NUL in a request header, or an invalid request target")
    return head.encode("utf-8", "surrogateescape"), chunked


def scan_head(buf: bytes) -> bool | None:
    """Whether the final response head in ``buf`` is unsafe to pass on (None: not complete).

    aiohttp's response parser runs in lenient mode: it silently joins obs-fold lines and takes
    "Name : value" as a header. A proxy must not pass either on (RFC 9112 sections 5.1, 5.2):
    a header line that starts with SP/HT or ":", or whose name has a non-token character, is
    refused here before parsing, in one regex pass over the head."""
    pos = 0
    while True:
        end = _HEAD_END.search(buf, pos)
        if end is None:
            return None
        if _BAD_LINE.search(buf, pos, end.start()) is not None:
            return True
        if buf[pos + 9 : pos + 10] != b"1":  # not a 1xx interim head: this is the final one
            return False
        pos = end.end()


class UpstreamConnection(BaseProtocol):
    """One HTTP/1.1 connection to an upstream; one request at a time."""

    __slots__ = (
        "_active",
        "_deadline_handle",
        "_got_bytes",
        "_head_buf",
        "_head_only",
        "_last_progress",
        "_lost",
        "_payload",
        "_read_timeout",
        "_should_close",
        "_waiter",
        "idle_since",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float) -> None:
        super().__init__(loop)
        self._read_timeout = read_timeout
        self._waiter: asyncio.Future[tuple[RawResponseMessage, StreamReader]] | None = None
        self._payload: StreamReader | None = None
        self._head_only: bool | None = None
        self._got_bytes = False
        self._head_buf: bytes | None = None
        self._should_close = False
        self._lost = False
        self._active = False
        self._last_progress = 0.0
        self._deadline_handle: asyncio.TimerHandle | None = None
        self.idle_since = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if data:
            self._got_bytes = True
            self._last_progress = self._loop.time()
        parser = self._parser
        if not self._active or parser is None:
            # Bytes on an idle connection: the upstream is confused; never reuse it.
            if data:
                self._should_close = True
                if self.transport is not None:
                    self.transport.close()
            return
        if self._head_buf is not None and data:
            buf = self._head_buf + data if self._head_buf else data
            folded = scan_head(buf)
            if folded is None:
                if len(buf) > MAX_HEAD:
                    self._fail(BadResponse("the upstream's response head is too large"))
                    return
                self._head_buf = buf
            else:
                self._head_buf = None
                if folded:
                    self._fail(BadResponse("obs-fold or a bad header name in the response"))
                    return
        try:
            messages, upgraded, _tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._fail(BadResponse(f"invalid upstream response: {exc.message}"))
            return
        except Exception as exc:  # the parser's payload errors are raised into the payload
            self._fail(BadResponse(f"invalid upstream response: {type(exc).__name__}"))
            return
        if upgraded:
            self._fail(BadResponse("the upstream switched protocols"))
            return
        for message, payload in messages:
            if message.should_close:
                self._should_close = True
            code = message.code
            if 100 <= code < 200:
                if code == 101:
                    self._fail(BadResponse("the upstream switched protocols"))
                    return
                continue  # informational responses are skipped, as aiohttp's client did
            waiter = self._waiter
            if waiter is None or waiter.done():
                self._fail(BadResponse("more than one response to one request"))
                return
            self._payload = payload
            waiter.set_result((message, payload))

    def eof_received(self) -> bool | None:
        self._should_close = True
        return None  # close the transport

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = True
        self._should_close = True
        self._cancel_deadline()
        parser = self._parser
        if self._active and parser is not None:
            try:
                parser.feed_eof()
            except Exception as err:
                if self._payload is not None:
                    self._payload.set_exception(PayloadError(f"incomplete body: {err}"))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                Disconnected(
                    "the upstream closed the connection before a response",
                    before_response=not self._got_bytes,
                )
            )
        payload = self._payload
        if payload is not None and not payload.is_eof():
            payload.set_exception(PayloadError("the upstream closed the connection mid-body"))
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("upstream connection lost"))
        self._drain_waiter = None
        self.transport = None

    # -- request cycle ------------------------------------------------------------------------

    @property
    def reusable(self) -> bool:
        """Open, idle-able, and nothing pending: may go back to the pool."""
        payload = self._payload
        return (
            not self._should_close
            and not self._lost
            and self.transport is not None
            and not self.transport.is_closing()
            and (payload is None or payload.is_eof())
        )

    def send(self, head: bytes, *, head_only: bool) -> asyncio.Future[Any]:
        """Write ``head`` and return the future of (message, payload) for its response."""
        assert self.transport is not None and not self._active
        if self._parser is None or self._head_only != head_only:
            self._parser = HttpResponseParser(
                self,
                self._loop,
                READ_LIMIT,
                payload_exception=PayloadError,
                response_with_body=not head_only,
                read_until_eof=True,
                auto_decompress=False,
            )
            self._head_only = head_only
        self._active = True
        self._got_bytes = False
        self._head_buf = b""
        self._payload = None
        waiter: asyncio.Future[tuple[RawResponseMessage, StreamReader]] = self._loop.create_future()
        self._waiter = waiter
        self._last_progress = self._loop.time()
        if self._deadline_handle is None:
            # Armed once and re-armed from _check_deadline while the connection stays busy:
            # no timer is created or cancelled per request on a busy keep-alive connection.
            self._deadline_handle = self._loop.call_later(self._read_timeout, self._check_deadline)
        self.transport.write(head)
        return waiter

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp's StreamReader calls this after every read below its low-water mark; only a
        # real pause (set by pause_reading) has a parser tail and a transport to resume.
        if not self._reading_paused:
            return
        self._last_progress = self._loop.time()
        super().resume_reading(resume_parser)

    def progress(self) -> None:
        """Request-body bytes went out: the read timeout counts from the last progress."""
        self._last_progress = self._loop.time()

    async def drain(self) -> None:
        if self._lost or self.transport is None:
            raise ConnectionResetError("upstream connection lost")
        if self._paused:
            await self._drain_helper()

    async def _drain_helper(self) -> None:
        waiter = self._drain_waiter
        if waiter is None:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
        await asyncio.shield(waiter)

    def finish(self) -> None:
        """The exchange is over (complete or abandoned): stop the read timer."""
        self._active = False
        self._waiter = None
        self._head_buf = None

    def close(self) -> None:
        self._should_close = True
        self.finish()
        self._cancel_deadline()
        if self.transport is not None:
            self.transport.close()

    def discard(self) -> None:
        """Abandon the exchange and drop the connection (nobody waits for its result)."""
        self._should_close = True
        self.finish()
        self._cancel_deadline()
        if self.transport is not None:
            self.transport.abort()

    def break_off(self) -> None:
        """Drop the connection; a pending response waiter sees :class:`Disconnected`."""
        self._should_close = True
        if self.transport is not None:
            self.transport.abort()

    def _cancel_deadline(self) -> None:
        if self._deadline_handle is not None:
            self._deadline_handle.cancel()
            self._deadline_handle = None

    def _check_deadline(self) -> None:
        self._deadline_handle = None
        if not self._active:
            return  # idle in the pool: the next send() arms a fresh timer
        payload = self._payload
        if payload is not None and payload.is_eof():
            return  # the whole response is in: nothing left to wait for
        if self._reading_paused:
            # Our own back-pressure (a slow client) is not the upstream's silence.
            self._last_progress = self._loop.time()
        idle = self._loop.time() - self._last_progress
        remaining = self._read_timeout - idle
        if remaining > 0.001:
            self._deadline_handle = self._loop.call_later(remaining, self._check_deadline)
            return
        self._fail(ReadTimeout("the upstream did not answer in time"))

    def _fail(self, exc: UpstreamClientError) -> None:
        """Deliver ``exc`` to whoever waits (head or body) and drop the connection."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif self._payload is not None and not self._payload.is_eof():
            self._payload.set_exception(exc)
        self._should_close = True
        self._active = False
        self._cancel_deadline()
        if self.transport is not None:
            self.transport.abort()


class UpstreamPool:
    """Connections to one upstream: at most ``max_connections`` in use at once (a caller
    beyond waits up to ``queue_timeout``, then :class:`PoolTimeout`), and idle keep-alive ones
    kept LIFO, at most ``max_idle``, each closed after ``idle_timeout`` seconds unused.

    Every connection :meth:`acquire` hands out goes back exactly once: :meth:`release` (pooled
    when reusable) or :meth:`discard` (dropped)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        expected_id: str | None,
        connect_timeout: float,
        read_timeout: float,
        idle_timeout: float = 30.0,
        max_idle: int = 128,
        max_connections: int = 256,
        queue_timeout: float = 1.0,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._expected_id = expected_id
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle
        self._max_connections = max_connections
        self._queue_timeout = queue_timeout
        self._in_use = 0
        self._queue: deque[asyncio.Future[None]] = deque()
        self._idle: list[UpstreamConnection] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    @property
    def in_use(self) -> int:
        return self._in_use

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused from the pool; waits for a free slot up to
        the queue timeout (:class:`PoolTimeout`)."""
        loop = asyncio.get_running_loop()
        if self._in_use >= self._max_connections or self._queue:
            await self._wait_for_slot(loop)
        self._in_use += 1
        try:
            now = loop.time()
            idle = self._idle
            while idle:
                conn = idle.pop()
                if conn.reusable and now - conn.idle_since < self._idle_timeout:
                    return conn, True
                conn.close()
            return await self._connect(loop), False
        except BaseException:
            self._give_back()
            raise

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop) -> None:
        waiter: asyncio.Future[None] = loop.create_future()
        self._queue.append(waiter)
        try:
            async with asyncio.timeout(self._queue_timeout):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # woken just as the time ran out: the slot is ours
            raise PoolTimeout("every upstream connection stayed busy") from None
        finally:
            if waiter in self._queue:
                self._queue.remove(waiter)

    def _give_back(self) -> None:
        self._in_use -= 1
        while self._queue:
            waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def discard(self, conn: UpstreamConnection) -> None:
        """Drop a connection handed out by :meth:`acquire` (never pooled)."""
        conn.discard()
        self._give_back()

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool when reusable, otherwise closed."""
        self._give_back()
        conn.finish()
        if self._closed or not conn.reusable or len(self._idle) >= self._max_idle:
            conn.close()
            return
        loop = conn._loop
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._idle_timeout, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        if not self._idle:
            return
        loop = self._idle[0]._loop
        now = loop.time()
        keep: list[UpstreamConnection] = []
        for conn in self._idle:
            if conn.reusable and now - conn.idle_since < self._idle_timeout:
                keep.append(conn)
            else:
                conn.close()
        self._idle = keep
        if keep:
            oldest = min(c.idle_since for c in keep)
            delay = max(oldest + self._idle_timeout - now, 0.01)
            self._sweeper = loop.call_later(delay, self._sweep)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    async def connect(self) -> asyncio.Transport:
        """A new connection of its own (connect timeout, TLS identity pinned), outside the
        pool and its bound: for a tunnel, which never comes back. The caller sets its
        protocol."""
        conn = await self._connect(asyncio.get_running_loop())
        assert conn.transport is not None
        return conn.transport

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> UpstreamConnection:
        read_timeout = self._read_timeout

        def factory() -> UpstreamConnection:
            return UpstreamConnection(loop, read_timeout)

        transport, conn = await dial(
            loop,
            factory,
            self.host,
            self.port,
            ssl_context=self._ssl,
            seconds=self._connect_timeout,
        )
        if self._expected_id is not None:
            pin_upstream_id(transport, self._expected_id)
        return conn


def pin_upstream_id(transport: asyncio.Transport, expected_id: str) -> None:
    """The upstream's certificate must name ``expected_id`` (the pinned SPIFFE ID); otherwise
    the connection is aborted and :class:`IdentityMismatch` raised (both HTTP/1.1 and HTTP/2
    upstreams pin through here)."""
    ssl_object = transport.get_extra_info("ssl_object")
    try:
        if ssl_object is None:
            raise IdentityMismatch("upstream connection is not TLS")
        check_peer_id(ssl_object, expected_id)
    except (PkiError, IdentityMismatch) as exc:
        transport.abort()
        raise IdentityMismatch(str(exc)) from None


ProtocolT = TypeVar("ProtocolT", bound=asyncio.BaseProtocol)


async def dial(
    loop: asyncio.AbstractEventLoop,
    factory: Callable[[], ProtocolT],
    host: str,
    port: int,
    *,
    ssl_context: ssl.SSLContext | None,
    seconds: float,
    ready: Callable[[asyncio.Transport, ProtocolT], Awaitable[None]] | None = None,
) -> tuple[asyncio.Transport, ProtocolT]:
    """One upstream connection (TLS with ``ssl_context``), and ``ready`` when given, within
    ``seconds``; the one mapping of what can fail: :class:`ConnectTimeout`, else
    :class:`ConnectFailed` (both HTTP/1.1 and HTTP/2 upstreams dial through here)."""
    try:
        async with asyncio.timeout(seconds):
            if ssl_context is not None:
                transport, conn = await loop.create_connection(
                    factory,
                    host,
                    port,
                    ssl=ssl_context,
                    server_hostname=host,
                    ssl_handshake_timeout=seconds,
                )
            else:
                transport, conn = await loop.create_connection(factory, host, port)
            if ready is not None:
                await ready(transport, conn)
    except TimeoutError:
        raise ConnectTimeout("connecting to the upstream timed out") from None
    except ssl.SSLError as exc:
        raise ConnectFailed(f"TLS handshake with the upstream failed: {exc.reason}") from None
    except OSError as exc:
        raise ConnectFailed(f"cannot connect to the upstream: {type(exc).__name__}") from None
    return transport, conn
