"""WebSocket relaying on routes with ``websocket: true``: after the upstream's ``101`` the
bytes flow both ways as they are, with back-pressure each way (a side that does not read
pauses reading from the other), until either side closes or nothing moves for the listener's
``idle_timeout``.

The request passed the whole pipeline first (route, policy, JWT, header hygiene). The upstream
connection is a fresh one (the same connect and TLS identity pinning as the pool, never
pooled); an upstream that does not answer ``101`` gets the client a 502 ``upgrade_refused``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from svidgate.gateway.errors import UpstreamError, UpstreamTimeout
from svidgate.gateway.headers import response_header_pairs

log = logging.getLogger("svidgate.gateway")
MAX_HEAD = 64 * 1024  # the upstream's 101 head, at most


@dataclass(frozen=True, slots=True)
class UpgradeAnswer:
    """The upstream's answer head: status, headers (raw pairs) and the bytes after it."""

    status: int
    headers: list[tuple[bytes, bytes]]
    rest: bytes


class UpstreamSide(asyncio.Protocol):
    """The upstream end: collects the answer head, then hands every byte to the tunnel."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.tunnel: Tunnel | None = None
        self._buf = b""
        self._head: asyncio.Future[UpgradeAnswer] = asyncio.get_running_loop().create_future()
        self._pending: list[bytes] = []

    async def answer(self, read_seconds: float) -> UpgradeAnswer:
        try:
            async with asyncio.timeout(read_seconds):
                return await self._head
        except TimeoutError:
            self.transport.abort()
            raise UpstreamTimeout("read_timeout") from None

    def data_received(self, data: bytes) -> None:
        if not self._head.done():
            self._buf += data
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > MAX_HEAD:
                    self._fail("the upstream's answer head is too large")
                return
            try:
                answer = _parse_head(self._buf[: end + 4], self._buf[end + 4 :])
            except (ValueError, UpstreamError):
                self._fail("the upstream's answer head is malformed")
                return
            self._buf = b""
            self._head.set_result(answer)
            return
        if self.tunnel is not None:
            self.tunnel.from_upstream(data)
        else:
            self._pending.append(data)

    def _fail(self, detail: str) -> None:
        if not self._head.done():
            self._head.set_exception(UpstreamError("bad_upstream_response", detail))
        self.transport.abort()

    def attach(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        for data in self._pending:
            tunnel.from_upstream(data)
        self._pending = []

    def pause_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.tunnel is not None:
            self.tunnel.upstream_paused(False)

    def eof_received(self) -> bool | None:
        return None  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._head.done():
            self._head.set_exception(
                UpstreamError("bad_upstream_response", "the upstream closed before answering")
            )
        if self.tunnel is not None:
            self.tunnel.upstream_lost()


def _parse_head(head: bytes, rest: bytes) -> UpgradeAnswer:
    lines = head[:-4].split(b"\r\n")
    version, _, tail = lines[0].partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise ValueError("not an HTTP/1.x status line")
    status = int(tail[:3])
    pairs: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name:
            raise ValueError("malformed header line")
        pairs.append((name, value.strip()))
    return UpgradeAnswer(status, response_header_pairs(pairs), rest)


class Tunnel:
    """Both ends of one switched connection (the client end is the core's connection, which
    calls :meth:`from_client`, :meth:`client_paused` and :meth:`client_lost`)."""

    def __init__(self, upstream: UpstreamSide, idle_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._upstream = upstream
        self._client: asyncio.Transport | None = None
        self._idle = idle_timeout
        self._last = self._loop.time()
        self._timer = self._loop.call_later(idle_timeout, self._check_idle)
        self.done = asyncio.Event()
        self.bytes_in = 0  # client → upstream
        self.bytes_out = 0  # upstream → client

    def start(self, client: asyncio.Transport, client_rest: bytes) -> None:
        self._client = client
        self._upstream.attach(self)
        if client_rest:
            self.from_client(client_rest)

    # client end (the core's TunnelEnd)
    def from_client(self, data: bytes) -> None:
        self._last = self._loop.time()
        self.bytes_in += len(data)
        self._upstream.transport.write(data)

    def client_paused(self, paused: bool) -> None:
        transport = self._upstream.transport
        if transport.is_closing():
            return
        if paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def client_lost(self) -> None:
        self._upstream.transport.close()
        self._finish()

    # upstream end
    def from_upstream(self, data: bytes) -> None:
        self._last = self._loop.time()
        self.bytes_out += len(data)
        if self._client is not None:
            self._client.write(data)

    def upstream_paused(self, paused: bool) -> None:
        client = self._client
        if client is None or client.is_closing():
            return
        if paused:
            client.pause_reading()
        else:
            client.resume_reading()

    def upstream_lost(self) -> None:
        if self._client is not None:
            self._client.close()
        self._finish()

    def close(self) -> None:
        """End both sides (idle timeout, or the handler giving up)."""
        self._upstream.transport.abort()
        if self._client is not None:
            self._client.close()
        self._finish()

    def _check_idle(self) -> None:
        left = self._last + self._idle - self._loop.time()
        if left > 0.001:
            self._timer = self._loop.call_later(left, self._check_idle)
            return
        log.info("websocket idle for %.0f s: closed", self._idle)
        self.close()

    def _finish(self) -> None:
        self._timer.cancel()
        self.done.set()
