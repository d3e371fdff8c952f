"""The upstream leg over HTTP/2: one multiplexed connection (:class:`H2ClientConnection`) and
its streams (:class:`ClientStream`), on h2's client state machine.

A stream's response body is credited back to the upstream only as it is read (a slow client
slows the upstream: flow control end to end); request-body bytes wait for the upstream's
windows. A stream reset by the upstream, a GOAWAY that leaves the stream out, or the
connection going away reach the reader as the upstream client's flat errors
(:mod:`svidgate.gateway.upstream_client`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from svidgate.gateway.upstream_client import BadResponse, Disconnected, UpstreamClientError

log = logging.getLogger("svidgate.gateway")
Headers = list[tuple[bytes, bytes]]
CANCEL = 0x8
_STREAM_WINDOW = 256 * 1024
_CONNECTION_WINDOW = 1024 * 1024


def plain_hpack(conn: h2.connection.H2Connection) -> None:
    """HPACK without Huffman coding on what ``conn`` sends: hpack's Huffman encoder is pure
    Python and costs more CPU than the bytes it saves on the wire."""
    encode = conn.encoder.encode

    def encode_plain(headers: Any, huffman: bool = False) -> bytes:
        return encode(headers, huffman=False)

    conn.encoder.encode = encode_plain  # type: ignore[method-assign]


class StreamReset(UpstreamClientError):
    """The upstream reset the stream (``code``), or the connection went away under it."""

    def __init__(self, message: str, *, code: int, before_response: bool) -> None:
        super().__init__(message)
        self.code = code
        self.before_response = before_response


class ClientStream:
    """One request/response exchange on an upstream HTTP/2 connection."""

    __slots__ = (
        "_chunks",
        "_conn",
        "_ended",
        "_error",
        "_response",
        "_waiter",
        "_window_waiter",
        "closed",
        "stream_id",
        "trailers",
    )

    def __init__(self, conn: H2ClientConnection, stream_id: int) -> None:
        self._conn = conn
        self.stream_id = stream_id
        loop = asyncio.get_running_loop()
        self._response: asyncio.Future[tuple[int, Headers]] = loop.create_future()
        self._chunks: deque[bytes] = deque()
        self._ended = False
        self._error: UpstreamClientError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._window_waiter: asyncio.Future[None] | None = None
        self.trailers: Headers = []
        self.closed = False  # both sides done, or reset

    # -- what the proxy calls -------------------------------------------------------------------

    async def response(self) -> tuple[int, Headers]:
        """The final response head: (status, headers without pseudo-headers)."""
        return await asyncio.shield(self._response)

    @property
    def ended(self) -> bool:
        """The upstream ended its side and every byte was read."""
        return self._ended and not self._chunks

    async def read(self) -> bytes:
        """The next body chunk; ``b""`` at the end (trailers are in :attr:`trailers`)."""
        while True:
            if self._chunks:
                chunk = self._chunks.popleft()
                self._conn.credit(self.stream_id, len(chunk))
                return chunk
            if self._error is not None:
                raise self._error
            if self._ended:
                return b""
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter

    async def send(self, data: bytes) -> None:
        """Request-body bytes, as the upstream's windows allow."""
        view = memoryview(data)
        while view:
            if self._error is not None:
                raise self._error
            window = self._conn.window(self.stream_id)
            if window <= 0:
                self._window_waiter = asyncio.get_running_loop().create_future()
                await self._window_waiter
                continue
            chunk, view = view[:window], view[window:]
            self._conn.send_data(self.stream_id, bytes(chunk))
        await self._conn.drain()

    def end(self, trailers: Headers | None = None) -> None:
        """The request is complete (with request trailers, if any)."""
        if self._error is None:
            self._conn.end_stream(self.stream_id, trailers)

    def cancel(self) -> None:
        """RST_STREAM CANCEL unless the exchange is over (the client went away)."""
        if not self.closed:
            self._conn.reset(self.stream_id, CANCEL)
            self.fail(StreamReset("the stream was cancelled", code=CANCEL, before_response=False))

    # -- what the connection calls --------------------------------------------------------------

    def got_response(self, status: int, headers: Headers) -> None:
        if not self._response.done():
            self._response.set_result((status, headers))

    def got_data(self, data: bytes) -> None:
        self._chunks.append(data)
        self._wake()

    def got_end(self, trailers: Headers | None = None) -> None:
        if trailers:
            self.trailers = trailers
        self._ended = True
        if not self._response.done():
            self._response.set_exception(
                BadResponse("the upstream ended the stream without a response")
            )
        self._wake()

    def fail(self, exc: UpstreamClientError) -> None:
        self.closed = True
        if self._error is None and not self._ended:
            self._error = exc
        if not self._response.done():
            self._response.set_exception(exc)
            self._response.exception()  # retrieved: nobody may be waiting any more
        self._wake()
        self.window_opened()

    def window_opened(self) -> None:
        waiter, self._window_waiter = self._window_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 connection to an upstream (TLS with ALPN h2, or h2c with prior knowledge)."""

    def __init__(self, on_free: asyncio.Event | None = None) -> None:
        self._streams: dict[int, ClientStream] = {}
        self._transport: asyncio.Transport | None = None
        self._settings: asyncio.Future[None] | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._flush_soon: asyncio.Handle | None = None
        self.on_free = on_free  # set whenever a stream slot frees up
        self.lost = False
        self.goaway = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._settings = loop.create_future()
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            # request heads were validated on the way in (the HTTP/1.1 parser or
            # http2.validate) and are lower-cased by the proxy; the upstream's answers are checked
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        conn = self._h2 = h2.connection.H2Connection(config=config)
        plain_hpack(conn)
        conn.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        self.idle_since = loop.time()
        self._flush()

    async def ready(self) -> None:
        """Wait for the upstream's SETTINGS (its max_concurrent_streams counts from then)."""
        assert self._settings is not None
        await asyncio.shield(self._settings)

    @property
    def usable(self) -> bool:
        return not self.lost and not self.goaway and self._transport is not None

    @property
    def free_streams(self) -> int:
        """How many more streams the upstream's SETTINGS allow now."""
        if not self.usable:
            return 0
        limit = self._h2.remote_settings.max_concurrent_streams
        return max(limit - len(self._streams), 0)

    @property
    def active(self) -> int:
        return len(self._streams)

    def open(self, headers: Headers, *, end_stream: bool) -> ClientStream:
        """Start a request; raises :class:`Disconnected` when the connection cannot take it."""
        if not self.usable:
            raise Disconnected("the upstream connection is closing", before_response=True)
        stream_id = self._h2.get_next_available_stream_id()
        stream = ClientStream(self, stream_id)
        self._streams[stream_id] = stream
        try:
            self._h2.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError as exc:
            del self._streams[stream_id]
            raise ValueError(f"cannot send the request headers: {exc}") from None
        self._schedule_flush()
        return stream

    # -- frames out -----------------------------------------------------------------------------

    def window(self, stream_id: int) -> int:
        try:
            window = self._h2.local_flow_control_window(stream_id)
        except h2.exceptions.ProtocolError:
            return 0
        return min(window, self._h2.max_outbound_frame_size)

    def send_data(self, stream_id: int, data: bytes) -> None:
        try:
            self._h2.send_data(stream_id, data)
        except h2.exceptions.ProtocolError:
            self._fail_stream(stream_id, "the upstream stream closed")
        self._schedule_flush()

    def end_stream(self, stream_id: int, trailers: Headers | None) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            if trailers:
                self._h2.send_headers(stream_id, trailers, end_stream=True)
            else:
                self._h2.end_stream(stream_id)
        self._schedule_flush()

    def reset(self, stream_id: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(stream_id, code)
        self._forget(stream_id)
        self._schedule_flush()

    def credit(self, stream_id: int, size: int) -> None:
        if self.lost:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.acknowledge_received_data(size, stream_id)
        self._schedule_flush()

    async def drain(self) -> None:
        if self.lost:
            raise Disconnected("the upstream connection was lost", before_response=False)
        if self._paused:
            if self._drain is None:
                self._drain = self._loop.create_future()
            await asyncio.shield(self._drain)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        waiter, self._drain = self._drain, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _schedule_flush(self) -> None:
        """Frames queued in one turn of the event loop leave in one write."""
        if self._flush_soon is None:
            self._flush_soon = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        data = self._h2.data_to_send()
        if data:
            transport.write(data)

    # -- frames in ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            if self.goaway or "state ConnectionState.CLOSED" in str(exc):
                # frames after the upstream's GOAWAY (gRPC pings): h2 refuses them; just close
                self._lose(Disconnected("the upstream went away", before_response=False))
                if self._transport is not None:
                    self._transport.close()
                return
            log.warning("HTTP/2 protocol error from an upstream: %s", exc)
            self._flush()
            self._lose(BadResponse(f"HTTP/2 protocol error from the upstream: {exc}"))
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
            self._event(event)
        self._flush()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            if self._settings is not None and not self._settings.done():
                self._settings.set_result(None)
            for stream in self._streams.values():
                stream.window_opened()
            self._freed()
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(event.last_stream_id or 0)
            return
        stream_id = getattr(event, "stream_id", None)
        if stream_id == 0 and isinstance(event, h2.events.WindowUpdated):
            for stream in self._streams.values():
                stream.window_opened()
            return
        found = self._streams.get(stream_id) if stream_id else None
        if found is None:
            if isinstance(event, h2.events.DataReceived) and stream_id:
                self.credit(stream_id, event.flow_controlled_length or 0)
            return
        stream = found
        if isinstance(event, h2.events.ResponseReceived):
            headers = list(event.headers or [])
            status = next((v for k, v in headers if k == b":status"), b"")
            if not status.isdigit():
                self._fail_stream(stream.stream_id, "the upstream's response has no :status")
                return
            stream.got_response(int(status), [(k, v) for k, v in headers if k[:1] != b":"])
        elif isinstance(event, h2.events.DataReceived):
            data = event.data or b""
            padding = (event.flow_controlled_length or 0) - len(data)
            if padding > 0:
                self.credit(stream.stream_id, padding)
            if data:
                stream.got_data(data)
        elif isinstance(event, h2.events.TrailersReceived):
            stream.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded):
            stream.got_end()
            if stream.closed or self._h2_closed(stream.stream_id):
                self._forget(stream.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            stream.fail(
                StreamReset(
                    f"the upstream reset the stream ({event.error_code})",
                    code=int(event.error_code or 0),
                    before_response=False,
                )
            )
            self._forget(stream.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            stream.window_opened()

    def _h2_closed(self, stream_id: int) -> bool:
        stream = self._h2.streams.get(stream_id)
        return stream is None or stream.closed

    def stream_done(self, stream: ClientStream) -> None:
        """The proxy is done with ``stream`` (its request side may still be open: reset it)."""
        if stream.stream_id in self._streams:
            if not self._h2_closed(stream.stream_id):
                stream.cancel()
            self._forget(stream.stream_id)

    def _forget(self, stream_id: int) -> None:
        if self._streams.pop(stream_id, None) is not None:
            if not self._streams:
                self.idle_since = self._loop.time()
            self._freed()

    def _freed(self) -> None:
        if self.on_free is not None:
            self.on_free.set()

    def _fail_stream(self, stream_id: int, message: str) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream.fail(BadResponse(message))
        self.reset(stream_id, 0x1)

    def _goaway(self, last_stream_id: int) -> None:
        """No new streams; streams the upstream never saw fail as retryable."""
        self.goaway = True
        for stream_id, stream in list(self._streams.items()):
            if stream_id > last_stream_id:
                stream.fail(
                    StreamReset(
                        "the upstream refused the stream (GOAWAY)", code=7, before_response=True
                    )
                )
                self._streams.pop(stream_id, None)
        self._freed()
        if not self._streams and self._transport is not None:
            self._transport.close()

    def close(self) -> None:
        self.goaway = True
        if self._transport is not None:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.close_connection()
            self._flush()
            self._transport.close()

    def _lose(self, exc: UpstreamClientError) -> None:
        self.lost = True
        for stream in list(self._streams.values()):
            stream.fail(exc)
        self._streams.clear()
        if self._settings is not None and not self._settings.done():
            self._settings.set_exception(exc)
            self._settings.exception()
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_exception(exc)
            drain.exception()
        self._freed()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(
            StreamReset("the upstream connection was lost", code=CANCEL, before_response=False)
        )
        self._transport = None
