"""A raw HTTP/2 client for tests: h2's client state machine over real TLS (ALPN h2) with a
test SVID, outbound header validation off so a test can send exactly the (malformed) header
block it means, and direct access to frames for the abuse tests (raw bytes, floods)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


@dataclass
class H2Response:
    """What came back on one stream."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None  # RST_STREAM error code from the server
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in [*self.headers, *self.trailers] if k == name), None)


class H2Client:
    """One HTTP/2 connection to ``port``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
            split_outbound_cookies=False,
            validate_inbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config=config)
        self.streams: dict[int, H2Response] = {}
        self.goaway: int | None = None  # error code of the server's GOAWAY
        self.goaway_debug: bytes = b""
        self.closed = asyncio.Event()
        self.settings = asyncio.Event()  # the server's SETTINGS arrived
        self.remote_settings: dict[int, int] = {}
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, port: int, ctx: ssl.SSLContext, timeout: float = 10.0) -> H2Client:
        ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost"),
            timeout,
        )
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "h2", "the server did not select h2"
        client = cls(reader, writer)
        client.conn.initiate_connection()
        client.flush()
        await asyncio.wait_for(client.settings.wait(), timeout)
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def send_raw(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self) -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await self.writer.drain()

    def start(
        self,
        headers: list[tuple[bytes, bytes]],
        *,
        end_stream: bool = True,
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        self.streams[stream_id] = H2Response()
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        self.flush()
        return stream_id

    async def request(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        body: bytes = b"",
        *,
        timeout: float = 10.0,
        authority: bytes = b"localhost",
    ) -> H2Response:
        block = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority),
            (b":path", path.encode()),
            *(headers or []),
        ]
        stream_id = self.start(block, end_stream=not body)
        if body:
            await self.send_body(stream_id, body)
        response = self.streams[stream_id]
        await asyncio.wait_for(response.done.wait(), timeout)
        return response

    async def send_body(self, stream_id: int, body: bytes, *, end_stream: bool = True) -> None:
        """Send ``body`` as the windows allow."""
        view = memoryview(body)
        while view:
            window = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                await asyncio.sleep(0.01)
                if self.closed.is_set():
                    return
                continue
            chunk, view = view[:window], view[window:]
            self.conn.send_data(stream_id, bytes(chunk))
            self.flush()
            await self.drain()
        if end_stream:
            self.conn.end_stream(stream_id)
            self.flush()

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError:
                    break
                for event in events:
                    self._event(event)
                self.flush()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self.closed.set()
            for response in self.streams.values():
                response.done.set()

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.remote_settings.update({k: v.new_value for k, v in event.changed_settings.items()})
            self.settings.set()
            return
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event.error_code
            self.goaway_debug = event.additional_data or b""
            return
        stream_id = getattr(event, "stream_id", 0)
        response = self.streams.get(stream_id)
        if response is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            headers = list(event.headers or [])
            response.status = int(dict(headers)[b":status"])
            response.headers = [(k, v) for k, v in headers if not k.startswith(b":")]
        elif isinstance(event, h2.events.DataReceived):
            response.body += event.data or b""
            self.conn.acknowledge_received_data(event.flow_controlled_length or 0, stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            response.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded):
            response.done.set()
        elif isinstance(event, h2.events.StreamReset):
            response.reset = event.error_code
            response.done.set()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
