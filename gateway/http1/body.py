"""The request body as the handler reads it: an async iterator of chunks, with back-pressure
(reading pauses while too much is unread), the body timeout, and the size limit.

The limit is final once the handler sets it (:meth:`Body.set_limit`, e.g. from its route) or
first reads (the listener's default). A Content-Length over the limit fails at once, before a
byte is read; a chunked body fails when its count passes it. Every failure is a
:class:`BodyError` (the client's fault); the connection then closes after the response.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from svidgate.gateway.http1.chunked import ChunkedDecoder
from svidgate.gateway.http1.errors import BadBody, BodyError, BodyTimeout, BodyTooLarge
from svidgate.gateway.http1.limits import Counters
from svidgate.gateway.http1.message import Request


class BodySource(Protocol):
    """What a body needs from its connection."""

    def want_body(self) -> None:
        """The handler waits for body bytes: send 100 Continue if asked for, resume reading."""

    def body_consumed(self) -> None:
        """Buffered body bytes were taken: reading may resume."""


class Body:
    """One request's body. Fed by the connection, read by the handler."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_counters",
        "_decoder",
        "_default_limit",
        "_error",
        "_length",
        "_limit",
        "_low_water",
        "_received",
        "_remaining",
        "_source",
        "_timeout",
        "_waiter",
    )

    def __init__(
        self,
        source: BodySource | None,
        request: Request,
        *,
        default_limit: int,
        timeout: float,
        buffer_high: int,
        max_trailer_bytes: int,
        counters: Counters,
    ) -> None:
        self._source = source
        self._length = request.content_length
        self._remaining = request.content_length or 0
        self._decoder = ChunkedDecoder(max_trailer_bytes) if request.chunked else None
        self._complete = not request.has_body
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._received = 0
        self._limit: int | None = None
        self._default_limit = default_limit
        self._timeout = timeout
        self._low_water = buffer_high // 2
        self._error: BodyError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._counters = counters

    # -- what the connection and the handler may ask -------------------------------------------

    @property
    def complete(self) -> bool:
        """Every body byte was received from the client (not necessarily read yet)."""
        return self._complete

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Received and not yet read."""
        return self._buffered

    @property
    def received(self) -> int:
        return self._received

    def set_limit(self, max_bytes: int) -> None:
        """This request's body limit (a route's own); raises :class:`BodyTooLarge` at once when
        the Content-Length (or what already arrived) is over it."""
        self._limit = max_bytes
        if self._error is None:
            if self._length is not None and self._length > max_bytes:
                self._fail_too_large("content_length_over_limit")
            elif self._received > max_bytes:
                self._fail_too_large("body_over_limit")
        if self._error is not None:
            raise self._error

    # -- reading (the handler) -----------------------------------------------------------------

    async def read(self) -> bytes:
        """The next chunk; ``b""`` once the whole body was read. Raises :class:`BodyError`."""
        if self._limit is None:
            self.set_limit(self._default_limit)
        while True:
            if self._chunks:
                return self._pop()
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            await self._wait()

    async def read_all(self) -> bytes:
        """The whole body (bounded by the limit)."""
        parts = []
        while chunk := await self.read():
            parts.append(chunk)
        return b"".join(parts)

    def __aiter__(self) -> Body:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    def _pop(self) -> bytes:
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= self._low_water and self._source is not None:
            self._source.body_consumed()
        return chunk

    async def _wait(self) -> None:
        source = self._source
        assert source is not None  # a body that is not complete always has its connection
        source.want_body()
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(self._timeout, self._timed_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _timed_out(self, waiter: asyncio.Future[None]) -> None:
        if waiter is self._waiter and not waiter.done():
            self._counters.body_timeouts += 1
            self.fail(BodyTimeout("body_stalled"))

    # -- feeding (the connection) --------------------------------------------------------------

    def feed(self, data: bytes) -> bytes:
        """Take the body's part of ``data``; returns what follows the body (a pipelined next
        request). After a failure nothing more is taken."""
        if self._complete or self._error is not None:
            return data
        decoder = self._decoder
        if decoder is None:
            take = min(self._remaining, len(data))
            chunks = [data[:take] if take < len(data) else data]
            rest = data[take:]
            self._remaining -= take
            self._complete = not self._remaining
        else:
            try:
                chunks, used = decoder.feed(data)
            except BadBody as exc:
                self.fail(exc)
                return b""
            rest = data[used:]
            self._complete = decoder.done
        self._take(chunks)
        return rest

    def _take(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            if chunk:
                self._chunks.append(chunk)
                self._buffered += len(chunk)
                self._received += len(chunk)
        limit = self._limit
        if limit is not None and self._received > limit:
            self._fail_too_large("body_over_limit")
        self._wake()

    def fail(self, exc: BodyError) -> None:
        """The body cannot complete (client error, timeout, disconnect); a body that already
        arrived whole is not failed by what happens to the connection afterwards."""
        if not self._complete:
            self._set_error(exc)

    def _fail_too_large(self, reason: str) -> None:
        """Over the limit: refused even when it arrived whole (what is buffered is dropped)."""
        self._counters.body_too_large += 1
        self._set_error(BodyTooLarge(reason))

    def _set_error(self, exc: BodyError) -> None:
        if self._error is not None:
            return
        self._error = exc
        self._chunks.clear()
        self._buffered = 0
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


_NO_BODY = Request("GET", b"/", "/", None, (1, 1), (), None, None, False, True, False)

# The body of every request without one: always complete, reads b"". Shared: nothing in it
# changes (its limit is never checked against anything).
EMPTY_BODY = Body(
    None,
    _NO_BODY,
    default_limit=0,
    timeout=1.0,
    buffer_high=2,
    max_trailer_bytes=0,
    counters=Counters(),
)
