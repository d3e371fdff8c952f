"""One downstream HTTP/2 connection (``asyncio.Protocol`` around h2's server state machine).

Admitted like an HTTP/1.1 connection (the owner's identity check right after the handshake),
then every stream is one request handed to the same handler with the same Request / Body /
Responder shapes (:mod:`.stream`). Malformed requests (:mod:`.validate`) are reset with
PROTOCOL_ERROR and never reach the handler.

Bounds: ``max_concurrent_streams`` and ``max_header_list_bytes`` are advertised in SETTINGS
and enforced (h2 refuses more open streams, HPACK refuses a larger header list); request
bodies are credited back only as the handler reads them (a stream's window and the
connection's window bound what is buffered); floods of cheap frames (:mod:`.abuse`), too many
streams, oversized header lists and CONTINUATION floods end with GOAWAY ENHANCE_YOUR_CALM.
Timeouts: no open stream for ``idle_timeout`` (``header_timeout`` before the first request)
closes the connection; a client that does not read a response for ``write_timeout`` gets its
stream reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Generic, Protocol, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame
from svidgate.gateway.http1.body import EMPTY_BODY
from svidgate.gateway.http1.errors import BodyIncomplete, HttpError, ResponseError
from svidgate.gateway.http1.flow import Deadline, WriteFlow
from svidgate.gateway.http1.limits import Counters, Limits
from svidgate.gateway.http1.message import Admission, ConnectionInfo, Request
from svidgate.gateway.http1.protocol import Handler
from svidgate.gateway.http2.abuse import Flood, FloodGuard
from svidgate.gateway.http2.client import plain_hpack
from svidgate.gateway.http2.limits import H2Limits
from svidgate.gateway.http2.stream import H2Responder, StreamBody, StreamState
from svidgate.gateway.http2.validate import MalformedRequest, parse_request

log = logging.getLogger("svidgate.gateway.http2")

P = TypeVar("P")
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, REFUSED_STREAM, CALM = 0x0, 0x1, 0x2, 0x7, 0xB
_GOAWAY_LENGTH = 17  # h2's own GOAWAY (no debug data): 9-byte frame header + 8 bytes


class H2Owner(Protocol[P]):
    """What an HTTP/2 connection needs from whoever accepted it (the listener)."""

    @property
    def limits(self) -> Limits: ...

    @property
    def h2_limits(self) -> H2Limits: ...

    @property
    def counters(self) -> Counters: ...

    @property
    def handler(self) -> Handler[P]: ...

    def admit(self, conn: Any, transport: asyncio.BaseTransport) -> Admission[P] | None: ...

    def forget(self, conn: Any) -> None: ...


def goaway_frame(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    frame = GoAwayFrame(0)
    frame.last_stream_id = last_stream_id
    frame.error_code = code
    frame.additional_data = debug
    return bytes(frame.serialize())


class H2ServerConnection(asyncio.Protocol, Generic[P]):
    """The server side of one HTTP/2 connection."""

    def __init__(self, owner: H2Owner[P]) -> None:
        self._owner = owner
        self._transport: asyncio.Transport | None = None
        self._info: ConnectionInfo[P] | None = None
        self._streams: dict[int, StreamState] = {}
        self._closing = False
        self._draining = False
        self._last_stream = 0
        self._flush_soon: asyncio.Handle | None = None

    # -- admission ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        admission = self._owner.admit(self, transport)
        if admission is None:
            self._closing = True
            transport.abort()  # type: ignore[attr-defined]
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        limits = self._limits = self._owner.limits
        h2l = self._owner.h2_limits
        self._info = ConnectionInfo(
            admission.peer, admission.key, transport.get_extra_info("peername")
        )
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,  # our own checks: a malformed request is a stream error
            normalize_inbound_headers=False,
            # responses: names lower-cased and connection-specific ones dropped by H2Responder,
            # values checked for CR/LF/NUL where they came from (the upstream's parser)
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        conn = self._h2 = h2.connection.H2Connection(config=config)
        plain_hpack(conn)
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: h2l.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: h2l.max_header_list_bytes,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: h2l.stream_window,
            },
        )
        conn.decoder.max_header_list_size = h2l.max_header_list_bytes
        conn.initiate_connection()
        conn.increment_flow_control_window(h2l.connection_window - 65535)
        self._guard = FloodGuard(loop.time())
        self._writes = WriteFlow(loop, limits.write_timeout, self._write_timed_out)
        self._deadline = Deadline(loop, self._on_idle)
        self._deadline.set(limits.header_timeout)
        self._expiry = (
            loop.call_later(admission.expires_in, self.shutdown)
            if admission.expires_in is not None
            else None
        )
        transport.set_write_buffer_limits(high=limits.write_buffer_high)  # type: ignore[attr-defined]
        self._flush()

    @property
    def info(self) -> ConnectionInfo[P] | None:
        return self._info

    # -- reading -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._closing or self._info is None:
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._protocol_error(exc)
            return
        now = self._loop.time()
        for event in events:
            if self._closing:
                return
            self._event(event, now)
        self._flush()

    def _event(self, event: h2.events.Event, now: float) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            self._data(event)
        elif isinstance(event, h2.events.StreamEnded):
            self._stream_ended(event.stream_id, None)
        elif isinstance(event, h2.events.TrailersReceived):
            self._trailers(event)
        elif isinstance(event, h2.events.StreamReset):
            if not self._guard.hit(Flood.RESET, now):
                self._calm(Flood.RESET.value)
                return
            self._lost_stream(event.stream_id)
        elif isinstance(event, h2.events.WindowUpdated):
            if not self._guard.hit(Flood.WINDOW_UPDATE, now):
                self._calm(Flood.WINDOW_UPDATE.value)
                return
            self._window(event.stream_id)
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            if not self._guard.hit(Flood.SETTINGS, now):
                self._calm(Flood.SETTINGS.value)
                return
            self._window(0)
        elif isinstance(event, h2.events.PingReceived):
            if not self._guard.hit(Flood.PING, now):
                self._calm(Flood.PING.value)
        elif isinstance(event, h2.events.PriorityUpdated):
            if not self._guard.hit(Flood.PRIORITY, now):
                self._calm(Flood.PRIORITY.value)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._close()

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        self._last_stream = max(self._last_stream, stream_id)
        if self._draining:
            self._h2.reset_stream(stream_id, REFUSED_STREAM)
            return
        limits = self._limits
        counters = self._owner.counters
        state = StreamState(self, stream_id, limits.write_timeout)
        ended = event.stream_ended is not None
        try:
            request = parse_request(
                event.headers or (), end_stream=ended, max_headers=limits.max_headers
            )
        except MalformedRequest as exc:
            counters.bad_requests += 1
            log.debug("malformed HTTP/2 request on stream %d: %s", stream_id, exc.reason)
            self._h2.reset_stream(stream_id, PROTOCOL_ERROR)
            return
        except HttpError as err:
            counters.bad_requests += 1
            self._streams[stream_id] = state
            self._deadline.clear()
            dummy = Request("GET", b"/", "/", None, (2, 0), (), None, None, False, True, False)
            H2Responder(state, dummy).simple(err.status, err.body(), err.headers)
            return
        counters.requests += 1
        if request.has_body:
            state.body = StreamBody(
                self,
                stream_id,
                request,
                default_limit=limits.max_body_bytes,
                timeout=limits.body_timeout,
                buffer_high=limits.body_buffer_high,
                counters=counters,
            )
        body = state.body or EMPTY_BODY
        responder = H2Responder(state, request)
        self._streams[stream_id] = state
        self._deadline.clear()
        state.task = self._loop.create_task(self._serve(state, request, body, responder))

    async def _serve(
        self, state: StreamState, request: Request, body: Any, responder: H2Responder
    ) -> None:
        info = self._info
        assert info is not None
        try:
            await self._owner.handler(info, request, body, responder)
        except asyncio.CancelledError:
            return  # the client reset the stream (or the connection is gone)
        except HttpError as err:
            self._answer(responder, err.status, err.body(), err.headers)
        except ResponseError:
            pass
        except Exception:
            log.exception("unexpected error in the request handler")
            self._answer(responder, 500, b'{"error": "internal"}')
        if not responder.done:
            if not responder.started:
                log.error("the request handler returned without a response")
            self._answer(responder, 500, b'{"error": "internal"}')
        with contextlib.suppress(ResponseError, asyncio.CancelledError):
            await state.sent()  # a response queued for a closed window: bounded by write_timeout
        state.task = None
        body_state = state.body
        if body_state is not None and not body_state.complete and not state.closed:
            # answered before the whole request arrived: the client may stop sending
            self._stop_receiving(state)
        self._maybe_forget(state)

    def _answer(self, responder: H2Responder, status: int, body: bytes, headers: Any = ()) -> None:
        if responder.started:
            if not responder.done:
                responder.abort()
            return
        with contextlib.suppress(ResponseError):
            responder.simple(status, body, headers)

    def _data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        data = event.data or b""
        flow = event.flow_controlled_length or 0
        if flow > len(data):  # padding: credited at once
            self._h2.acknowledge_received_data(flow - len(data), stream_id)
        if not data and event.stream_ended is None:
            if not self._guard.hit(Flood.EMPTY_DATA, self._loop.time()):
                self._calm(Flood.EMPTY_DATA.value)
            return
        state = self._streams.get(stream_id)
        body = state.body if state is not None else None
        if body is None or not isinstance(body, StreamBody):
            if data:
                self.consumed(stream_id, len(data))
            if state is not None and data:  # DATA on a request that declared no body
                self._malformed(state, "content_length_mismatch")
            return
        if data and not body.push(data):
            self._malformed(state, "content_length_mismatch")  # type: ignore[arg-type]

    def _trailers(self, event: h2.events.TrailersReceived) -> None:
        state = self._streams.get(event.stream_id)
        trailers = [(n, v) for n, v in event.headers or () if n[:1] != b":"]
        if len(trailers) != len(event.headers or ()):
            if state is not None:
                self._malformed(state, "pseudo_header_in_trailers")
            return
        self._stream_ended(event.stream_id, trailers)

    def _stream_ended(self, stream_id: int, trailers: list[tuple[bytes, bytes]] | None) -> None:
        state = self._streams.get(stream_id)
        if state is None:
            return
        body = state.body
        if isinstance(body, StreamBody) and not body.finish(trailers):
            self._malformed(state, "content_length_mismatch")
            return
        self._maybe_forget(state)

    def _malformed(self, state: StreamState, reason: str) -> None:
        self._owner.counters.bad_requests += 1
        log.debug("malformed HTTP/2 request on stream %d: %s", state.stream_id, reason)
        self.reset(state, PROTOCOL_ERROR)

    def _lost_stream(self, stream_id: int) -> None:
        """The client reset the stream: its handler is cancelled (so is its upstream call)."""
        state = self._streams.pop(stream_id, None)
        if state is None:
            return
        self._drop(state)
        self._idle_check()

    def _drop(self, state: StreamState) -> None:
        state.closed = True
        body = state.body
        if body is not None:
            body.fail(BodyIncomplete("client_disconnected"))
        if state.task is not None:
            state.task.cancel()
            state.task = None
        state.pending.clear()
        state.wake()

    # -- flow control (StreamOwner) -------------------------------------------------------------

    def consumed(self, stream_id: int, size: int) -> None:
        if self._closing or size <= 0:
            return
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.acknowledge_received_data(size, stream_id)
        self._schedule_flush()

    def pump(self, stream: StreamState) -> None:
        """Send the stream's head, body bytes the windows allow, and its end."""
        if stream.closed or self._closing:
            stream.wake()
            return
        conn = self._h2
        stream_id = stream.stream_id
        try:
            if stream.headers is not None:
                headers, stream.headers = stream.headers, None
                end = stream.end and not stream.pending and not stream.trailers
                conn.send_headers(stream_id, headers, end_stream=end)
                stream.ended = end
            pending = stream.pending
            while pending:
                window = min(
                    conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size
                )
                if window <= 0:
                    break
                chunk = bytes(pending[:window])
                del pending[:window]
                conn.send_data(stream_id, chunk)
                self._guard.sent_data()
            if not pending and stream.end and not stream.ended:
                if stream.trailers:
                    conn.send_headers(stream_id, stream.trailers, end_stream=True)
                else:
                    conn.end_stream(stream_id)
                stream.ended = True
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            stream.closed = True
        if stream.flushed or stream.closed:
            stream.wake()
            if stream.ended or stream.closed:
                self._maybe_forget(stream)
        self._schedule_flush()

    def reset(self, stream: StreamState, code: int) -> None:
        if not stream.closed and not self._closing:
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self._h2.reset_stream(stream.stream_id, code)
            self._schedule_flush()
        self._streams.pop(stream.stream_id, None)
        self._drop(stream)
        self._idle_check()

    def _stop_receiving(self, state: StreamState) -> None:
        """The response is complete before the request: RST_STREAM NO_ERROR (RFC 9113 §8.1)."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self._h2.reset_stream(state.stream_id, NO_ERROR)
        state.closed = True
        self._schedule_flush()

    def _window(self, stream_id: int) -> None:
        if stream_id:
            state = self._streams.get(stream_id)
            if state is not None:
                self.pump(state)
            return
        for state in list(self._streams.values()):
            if state.pending or (state.end and not state.ended):
                self.pump(state)

    def _maybe_forget(self, state: StreamState) -> None:
        """A stream whose response ended and whose handler returned is done."""
        if state.task is not None:
            return
        if (state.ended or state.closed) and self._streams.get(state.stream_id) is state:
            body = state.body
            if body is None or body.complete or body.failed or state.closed:
                del self._streams[state.stream_id]
                self._idle_check()

    # -- writing -----------------------------------------------------------------------------

    def _schedule_flush(self) -> None:
        if self._flush_soon is None and not self._closing:
            self._flush_soon = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        data = self._h2.data_to_send()
        if data:
            transport.write(data)

    async def drain(self) -> None:
        await self._writes.wait()

    def pause_writing(self) -> None:
        self._writes.pause()

    def resume_writing(self) -> None:
        self._writes.resume()

    def _write_timed_out(self) -> None:
        self._owner.counters.write_timeouts += 1
        self.abort()

    # -- ending ------------------------------------------------------------------------------

    def _protocol_error(self, exc: h2.exceptions.ProtocolError) -> None:
        """h2 refused a frame and queued GOAWAY; abuse classes answer ENHANCE_YOUR_CALM."""
        data = self._h2.data_to_send()
        abuse = (
            isinstance(exc, h2.exceptions.DenialOfServiceError | h2.exceptions.TooManyStreamsError)
            or "too many continuation" in str(exc).lower()
        )
        if abuse and data[-_GOAWAY_LENGTH:][3:4] == b"\x07":
            data = data[:-_GOAWAY_LENGTH] + goaway_frame(self._last_stream_id(), CALM)
        log.info("HTTP/2 connection error: %s", exc)
        self._owner.counters.bad_requests += 1
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)
        self._close()

    def _calm(self, reason: str) -> None:
        """A flood: GOAWAY ENHANCE_YOUR_CALM, then close."""
        log.warning("HTTP/2 client flooding (%s): GOAWAY ENHANCE_YOUR_CALM", reason)
        self._owner.counters.bad_requests += 1
        self._flush()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(goaway_frame(self._last_stream_id(), CALM, reason.encode()))
        self._close()

    def _last_stream_id(self) -> int:
        return max(self._last_stream, self._h2.highest_inbound_stream_id)

    def _idle_check(self) -> None:
        if self._streams or self._closing:
            return
        if self._draining:
            self._close()
        else:
            self._deadline.set(self._limits.idle_timeout)

    def _on_idle(self) -> None:
        if self._streams or self._closing:
            return
        self._owner.counters.idle_closed += 1
        self._goaway_and_close()

    def _goaway_and_close(self) -> None:
        self._flush()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(goaway_frame(self._last_stream_id(), NO_ERROR))
        self._close()

    def shutdown(self) -> None:
        """Drain: GOAWAY (no new streams), close once the open streams are done."""
        if self._info is None or self._closing:
            return
        if not self._draining:
            self._draining = True
            self._flush()
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(goaway_frame(self._last_stream_id(), NO_ERROR))
        if not self._streams:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        if self._closing:
            return
        if self._info is not None:
            self._flush()  # what the last streams queued goes out before the close
            self._deadline.cancel()
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._owner.forget(self)
        if self._info is None:
            return
        self._deadline.cancel()
        if self._expiry is not None:
            self._expiry.cancel()
        if self._flush_soon is not None:
            self._flush_soon.cancel()
        self._writes.lose()
        for state in list(self._streams.values()):
            self._drop(state)
        self._streams.clear()
