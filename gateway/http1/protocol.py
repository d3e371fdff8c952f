"""One HTTP/1.1 server connection (``asyncio.Protocol``): framing, timeouts, flow control, and
one request at a time handed to the pipeline's handler.

Created at accept with two fields set (owner, state); the parser and buffers come only after
the TLS handshake and the owner's identity check admitted the peer (``connection_made``).
Requests are answered strictly in order: while one is in flight the connection reads only
its body, then pauses; bytes of a pipelined next request wait in one buffer (one read at
most, since reading is paused) until the response is done. The state moves only along
:data:`.state.TRANSITIONS`.

Timeouts: ``header_timeout`` for a request head (408), ``idle_timeout`` between requests
(closed silently), both on one :class:`.flow.Deadline`; ``body_timeout`` while the handler
waits for body bytes (:mod:`.body`); ``write_timeout`` while a response waits for a client
that does not read (:class:`.flow.WriteFlow`: cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, Protocol, TypeVar

from svidgate.gateway.http1.body import EMPTY_BODY, Body
from svidgate.gateway.http1.errors import (
    BodyIncomplete,
    ClientDisconnected,
    HeadTimeout,
    HeadTooLarge,
    HttpError,
    ResponseError,
)
from svidgate.gateway.http1.flow import Deadline, WriteFlow
from svidgate.gateway.http1.limits import Counters, Limits
from svidgate.gateway.http1.message import Admission, ConnectionInfo, Request
from svidgate.gateway.http1.parse import HeadParser, check_partial_head
from svidgate.gateway.http1.respond import HeaderPairs, Responder, TunnelEnd, error_response
from svidgate.gateway.http1.state import Event, State, transition

log = logging.getLogger("svidgate.gateway.http1")

P = TypeVar("P")
Handler = Callable[[ConnectionInfo[P], Request, Body, Responder], Awaitable[None]]
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ConnectionOwner(Protocol[P]):
    """What a connection needs from whoever accepted it (the listener)."""

    @property
    def limits(self) -> Limits: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def handler(self) -> Handler[P]: ...

    def admit(self, conn: H1Connection[P], transport: asyncio.BaseTransport) -> Admission[P] | None:
        """The identity check and per-identity cap; None refuses (already counted)."""

    def forget(self, conn: H1Connection[P]) -> None:
        """The connection is gone (idempotent)."""


class H1Connection(asyncio.Protocol, Generic[P]):
    """The server side of one HTTP/1.1 connection."""

    __slots__ = (
        "_body",
        "_buf",
        "_continue",
        "_deadline",
        "_draining",
        "_expiry",
        "_info",
        "_limits",
        "_loop",
        "_owner",
        "_parser",
        "_reading",
        "_responder",
        "_served",
        "_state",
        "_task",
        "_transport",
        "_tunnel",
        "_writes",
    )

    def __init__(self, owner: ConnectionOwner[P]) -> None:
        # Only these two until the handshake is done and the peer admitted (memory per
        # half-open connection stays small).
        self._owner = owner
        self._state = State.HANDSHAKE

    # -- admission --------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport: asyncio.Transport = transport  # type: ignore[assignment]
        admission = self._owner.admit(self, transport)
        if admission is None:
            self._to(Event.REFUSE)
            self._transport.abort()
            return
        limits = self._owner.limits
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._limits = limits
        self._info = ConnectionInfo(
            admission.peer, admission.key, transport.get_extra_info("peername")
        )
        self._parser = HeadParser(limits.max_headers)
        self._buf = b""
        self._body: Body = EMPTY_BODY
        self._responder: Responder | None = None
        self._task: asyncio.Task[None] | None = None
        self._reading = True
        self._writes = WriteFlow(loop, limits.write_timeout, self._write_timed_out)
        self._draining = False
        self._tunnel: TunnelEnd | None = None
        self._continue = False
        self._served = 0
        self._deadline = Deadline(loop, self._on_deadline)
        self._expiry = (
            loop.call_later(admission.expires_in, self._close)
            if admission.expires_in is not None
            else None
        )
        self._transport.set_write_buffer_limits(high=limits.write_buffer_high)
        self._to(Event.ADMITTED)
        self._deadline.set(limits.header_timeout)  # the first head: from the handshake's end

    @property
    def info(self) -> ConnectionInfo[P] | None:
        """Per-connection data once admitted."""
        return getattr(self, "_info", None)

    @property
    def state(self) -> State:
        return self._state

    def _to(self, event: Event) -> None:
        self._state = transition(self._state, event)

    # -- reading ----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state is State.BUSY:
            self._busy_bytes(data)
        elif state is State.IDLE or state is State.HEAD:
            buf = self._buf + data if self._buf else data
            self._buf = b""
            self._process(buf)
        elif state is State.TUNNEL and self._tunnel is not None:
            self._tunnel.from_client(data)
        # HANDSHAKE / REFUSED / CLOSING / CLOSED: nothing is read any more

    def eof_received(self) -> bool | None:
        return None  # TLS closes the connection on the peer's close_notify either way

    def _process(self, buf: bytes) -> None:
        """Look for one complete head in ``buf`` (IDLE/HEAD) and dispatch it."""
        limits = self._limits
        start = 0
        while buf.startswith(b"\r\n", start):  # empty lines before a request line are ignored
            start += 2
        end = buf.find(b"\r\n\r\n", start)
        if end < 0:
            if len(buf) > limits.max_header_bytes:
                self._refuse(HeadTooLarge("head_too_large"))
                return
            if b"\n" in buf:  # an incomplete head: refuse what can never become valid now
                try:
                    check_partial_head(buf, start)
                except HttpError as err:
                    self._refuse(err)
                    return
            self._buf = buf
            if buf and self._state is State.IDLE:
                self._to(Event.BYTES)
                if self._served:  # later heads: header_timeout from their first byte
                    self._deadline.set(limits.header_timeout)
            return
        if end + 4 > limits.max_header_bytes:
            self._refuse(HeadTooLarge("head_too_large"))
            return
        head = buf if start == 0 and end + 4 == len(buf) else buf[start : end + 4]
        try:
            request = self._parser.parse(head)
        except HttpError as err:
            self._refuse(err)
            return
        self._dispatch(request, buf[end + 4 :])

    def _busy_bytes(self, data: bytes) -> None:
        """Bytes while a request is in flight: its body, then a pipelined next request."""
        body = self._body
        if not body.complete:
            data = body.feed(data)
        if data and not body.failed:
            self._buf = self._buf + data if self._buf else data
        self._update_reading()

    def _update_reading(self) -> None:
        """Read while waiting for a head, or for body bytes the handler has room for."""
        state = self._state
        if state is State.BUSY:
            body = self._body
            if body.complete:
                # Keep reading until a pipelined byte arrives (then it waits, one read at most):
                # a client that leaves while its response streams is seen (EOF) at once,
                # instead of the TLS layer dropping the writes unseen.
                want = not self._buf and not body.failed
            else:
                want = not body.failed and body.buffered < self._limits.body_buffer_high
        else:
            want = state is State.IDLE or state is State.HEAD
        if want != self._reading:
            self._reading = want
            if want:
                self._transport.resume_reading()
            else:
                self._transport.pause_reading()

    # BodySource
    def want_body(self) -> None:
        if self._body.failed or self._state is not State.BUSY:
            return
        responder = self._responder
        if self._continue and responder is not None and not responder.started:
            self._continue = False
            self._transport.write(_CONTINUE)
        self._update_reading()

    def body_consumed(self) -> None:
        if self._state is State.BUSY:
            self._update_reading()

    # -- one request ------------------------------------------------------------------------------

    def _dispatch(self, request: Request, rest: bytes) -> None:
        owner = self._owner
        limits = self._limits
        owner.counters.requests += 1
        self._deadline.clear()
        self._to(Event.HEAD_DONE)
        if request.has_body:
            body = Body(
                self,
                request,
                default_limit=limits.max_body_bytes,
                timeout=limits.body_timeout,
                buffer_high=limits.body_buffer_high,
                max_trailer_bytes=limits.max_header_bytes,
                counters=owner.counters,
            )
        else:
            body = EMPTY_BODY
        responder = Responder(self, request)
        self._body = body
        self._responder = responder
        self._continue = request.expect_continue
        if rest:
            self._busy_bytes(rest)
        else:
            self._update_reading()
        self._task = self._loop.create_task(self._serve(request, body, responder))

    async def _serve(self, request: Request, body: Body, responder: Responder) -> None:
        try:
            await self._owner.handler(self._info, request, body, responder)
        except HttpError as err:  # a body error the handler let through, or its own refusal
            self._answer(responder, err.status, err.body(), err.headers)
        except ResponseError:
            pass  # the connection is already cut
        except Exception:
            log.exception("unexpected error in the request handler")
            self._answer(responder, 500, b'{"error": "internal"}')
        self._finish(responder)

    def _answer(
        self, responder: Responder, status: int, body: bytes, headers: HeaderPairs = ()
    ) -> None:
        if responder.started:
            if not responder.done:
                responder.abort()  # mid-stream: no error response can follow
            return
        with contextlib.suppress(ResponseError):
            responder.simple(status, body, headers)

    def _finish(self, responder: Responder) -> None:
        """The handler returned: keep the connection for the next request, or close it."""
        self._task = None
        if not responder.done:
            if not responder.started:
                log.error("the request handler returned without a response")
            self._answer(responder, 500, b'{"error": "internal"}')
        if self._state is not State.BUSY:
            return  # lost or closing meanwhile
        body = self._body
        self._body, self._responder = EMPTY_BODY, None
        if not responder.keep_alive or not body.complete or body.failed or self._draining:
            self._close()
            return
        self._served += 1
        self._to(Event.KEEP_ALIVE)
        self._deadline.set(self._limits.idle_timeout)
        buf, self._buf = self._buf, b""
        if buf:
            self._process(buf)
        self._update_reading()

    # -- writing (ResponseSink) -------------------------------------------------------------------

    def may_keep_alive(self) -> bool:
        body = self._body
        return body.complete and not body.failed and not self._draining

    def send(self, data: bytes) -> None:
        transport = self._transport
        if self._state is State.CLOSED or transport.is_closing():
            raise ClientDisconnected("client_disconnected")
        transport.write(data)

    async def drain(self) -> None:
        await self._writes.wait()

    def _write_timed_out(self) -> None:
        self._owner.counters.write_timeouts += 1
        self.cut()

    def cut(self) -> None:
        self._transport.abort()

    def pause_writing(self) -> None:
        self._writes.pause()
        if self._tunnel is not None:
            self._tunnel.client_paused(True)

    def resume_writing(self) -> None:
        self._writes.resume()
        if self._tunnel is not None:
            self._tunnel.client_paused(False)

    # -- switching protocols --------------------------------------------------------------------

    def upgrade(self, tunnel: TunnelEnd) -> tuple[asyncio.Transport, bytes]:
        """After a 101 is written: from now on every byte the client sends goes to ``tunnel``
        (and the write pauses of this connection too); returns the transport and the bytes the
        client sent after the request head (the tunnel's first bytes). The header, idle and
        body timeouts stop: the tunnel keeps its own idle timeout."""
        if self._state is not State.BUSY:
            raise ClientDisconnected("client_disconnected")
        self._to(Event.UPGRADE)
        self._deadline.cancel()
        self._tunnel = tunnel
        rest, self._buf = self._buf, b""
        if not self._reading:
            self._reading = True
            self._transport.resume_reading()
        return self._transport, rest

    # -- timeouts, refusals, closing --------------------------------------------------------------

    def _on_deadline(self) -> None:
        if self._state is State.HEAD:
            self._owner.counters.header_timeouts += 1
            self._refuse(HeadTimeout("head_timeout"))
        elif self._state is State.IDLE:
            self._owner.counters.idle_closed += 1
            self._close()

    def _refuse(self, err: HttpError) -> None:
        """Answer a request the core refuses before any handler sees it, then close."""
        counters = self._owner.counters
        if isinstance(err, HeadTooLarge):
            counters.head_too_large += 1
        elif not isinstance(err, HeadTimeout):
            counters.bad_requests += 1
        self._buf = b""
        self._transport.write(error_response(err.status, err.body(), err.headers))
        self._close()

    def _close(self) -> None:
        """Close after what was written (TLS close_notify, then FIN)."""
        if self._state is State.CLOSED or self._state is State.REFUSED:
            return
        self._to(Event.CLOSE)
        self._deadline.clear()
        if self._reading:
            self._reading = False
            self._transport.pause_reading()
        self._transport.close()

    def shutdown(self) -> None:
        """Drain: an idle connection closes now, a busy one after its response."""
        if self._state is State.HANDSHAKE or self._state is State.REFUSED:
            return
        self._draining = True
        if self._state is State.IDLE or self._state is State.HEAD:
            self._close()

    def abort(self) -> None:
        """Cut the connection now (the end of a drain)."""
        transport = getattr(self, "_transport", None)
        if transport is not None:
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        previous = self._state
        self._to(Event.LOST)
        self._owner.forget(self)
        if previous is State.HANDSHAKE or previous is State.REFUSED:
            return
        self._deadline.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        self._body.fail(BodyIncomplete("client_disconnected"))
        self._writes.lose()
        self._parser.close()
        if self._tunnel is not None:
            self._tunnel.client_lost()
