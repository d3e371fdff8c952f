"""Pooled, multiplexed HTTP/2 connections to one upstream.

A request takes a stream on a connection with room under the upstream's own
``SETTINGS_MAX_CONCURRENT_STREAMS``; a new connection is made only when every one is full, up
to ``max_connections``; beyond that a request waits up to ``queue_timeout`` for a free stream
(:class:`PoolTimeout`). Connections are made like the HTTP/1.1 pool's (connect timeout, TLS
with the upstream's SPIFFE ID pinned right after the handshake) and must select ALPN ``h2``;
an ``http://`` upstream speaks h2c with prior knowledge. Idle connections close after
``idle_timeout``.
"""

from __future__ import annotations

import asyncio
import ssl

from svidgate.gateway.http2.client import ClientStream, H2ClientConnection, Headers
from svidgate.gateway.upstream_client import (
    ConnectFailed,
    PoolTimeout,
    dial,
    pin_upstream_id,
)


class H2Pool:
    """The HTTP/2 connections of one upstream."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        expected_id: str | None,
        connect_timeout: float,
        max_connections: int,
        queue_timeout: float,
        idle_timeout: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self._ssl = ssl_context
        self._expected_id = expected_id
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        self._queue_timeout = queue_timeout
        self._idle_timeout = idle_timeout
        self._conns: list[H2ClientConnection] = []
        self._dialing: asyncio.Future[None] | None = None
        self._free = asyncio.Event()
        self._closed = False
        self._sweeper: asyncio.TimerHandle | None = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    async def open(
        self, headers: Headers, *, end_stream: bool
    ) -> tuple[H2ClientConnection, ClientStream]:
        """A new stream carrying ``headers``; raises the upstream client's errors."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._queue_timeout
        while True:
            conn = self._pick()
            if conn is not None:
                return conn, conn.open(headers, end_stream=end_stream)
            dialing = self._dialing
            if dialing is not None:
                # one connection is being made: it most likely has room for this one too
                await asyncio.shield(dialing)
                continue
            if len(self._conns) < self._max_connections:
                conn = await self._connect(loop)
                if conn.free_streams > 0:
                    return conn, conn.open(headers, end_stream=end_stream)
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise PoolTimeout("every upstream HTTP/2 stream stayed busy")
            self._free.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._free.wait()
            except TimeoutError:
                raise PoolTimeout("every upstream HTTP/2 stream stayed busy") from None

    def _pick(self) -> H2ClientConnection | None:
        """The usable connection with the most streams in use that still has room (fills
        connections before opening new ones)."""
        best: H2ClientConnection | None = None
        alive = []
        for conn in self._conns:
            if not conn.usable and conn.active == 0:
                conn.close()
                continue
            alive.append(conn)
            if conn.free_streams > 0 and (best is None or conn.active > best.active):
                best = conn
        self._conns = alive
        return best

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> H2ClientConnection:
        dialing: asyncio.Future[None] = loop.create_future()
        self._dialing = dialing
        try:
            conn = await self._dial(loop)
        finally:
            self._dialing = None
            dialing.set_result(None)  # waiters try again (and dial themselves on a failure)
        self._conns.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._idle_timeout, self._sweep)
        return conn

    async def _dial(self, loop: asyncio.AbstractEventLoop) -> H2ClientConnection:
        free = self._free

        def factory() -> H2ClientConnection:
            return H2ClientConnection(free)

        async def ready(transport: asyncio.Transport, conn: H2ClientConnection) -> None:
            self._check(transport)
            await conn.ready()

        _, conn = await dial(
            loop,
            factory,
            self.host,
            self.port,
            ssl_context=self._ssl,
            seconds=self._connect_timeout,
            ready=ready,
        )
        return conn

    def _check(self, transport: asyncio.Transport) -> None:
        """TLS: the pinned SPIFFE ID, and ALPN h2 selected; raises (and drops the connection)."""
        if self._ssl is None:
            return
        if self._expected_id is not None:
            pin_upstream_id(transport, self._expected_id)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            transport.abort()
            raise ConnectFailed("the upstream did not select ALPN h2")

    def _sweep(self) -> None:
        self._sweeper = None
        if not self._conns:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        keep = []
        for conn in self._conns:
            if conn.active == 0 and (
                not conn.usable or now - conn.idle_since >= self._idle_timeout
            ):
                conn.close()
            else:
                keep.append(conn)
        self._conns = keep
        if keep and not self._closed:
            self._sweeper = loop.call_later(self._idle_timeout / 2, self._sweep)

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
