"""The admin listener of both services (``admin_listen``): a small aiohttp server, bounded.

Plain HTTP for probes and scrapes on loopback or the pod network: at most ``max_connections``
open at once (one more is closed at accept), every connection closed ``lifetime`` seconds after
it opened (a slow or idle client cannot keep one), ``keepalive`` seconds of idle between
requests, request heads capped by aiohttp's line and field limits, and no body is read (the
endpoints are GETs). Responses carry ``Server: svidgate``, never aiohttp's version.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST

from svidgate.config import parse_host_port

MAX_CONNECTIONS = 64
LIFETIME = 30.0  # seconds a connection may stay open
KEEPALIVE = 5.0  # idle seconds between two requests on one connection
_SWEEP = 1.0  # seconds between two looks for connections past their lifetime


def bind(address: str) -> socket.socket:
    """A listening TCP socket on ``HOST:PORT`` (port 0: any free port)."""
    host, port = parse_host_port(address, any_port=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def probe_app(
    ready: Callable[[], tuple[bool, str]], exposition: Callable[[], bytes]
) -> web.Application:
    """``/healthz`` (200 while the process serves), ``/readyz`` (``ready()`` → (ready, reason):
    200, or 503 with the reason) and ``/metrics`` (``exposition()``: Prometheus text)."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, reason = ready()
        return web.json_response(
            {"status": "ready" if ok else "not_ready", "reason": reason},
            status=200 if ok else 503,
        )

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=exposition())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application(client_max_size=1024)  # GETs only: no body is read
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app


class _Refused(asyncio.Protocol):
    """Over the connection limit: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.abort()


async def _server_header(_: web.Request, resp: web.StreamResponse) -> None:
    resp.headers["Server"] = "svidgate"


class AdminServer:
    """Serves ``app`` on ``address`` within the limits above."""

    def __init__(
        self,
        app: web.Application,
        address: str,
        *,
        max_connections: int = MAX_CONNECTIONS,
        lifetime: float = LIFETIME,
    ) -> None:
        app.on_response_prepare.append(_server_header)
        self.address = address
        self.max_connections = max_connections
        self.lifetime = lifetime
        self.port = 0
        self._runner = web.AppRunner(
            app, access_log=None, keepalive_timeout=KEEPALIVE, handler_cancellation=True
        )
        self._server: asyncio.Server | None = None
        self._opened: dict[RequestHandler, float] = {}  # handler -> loop time it opened
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        await self._runner.setup()
        sock = bind(self.address)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, sock=sock)
        self._sweeper = loop.create_task(self._sweep())
        self.port = int(sock.getsockname()[1])
        return self.port

    def _protocol(self) -> asyncio.BaseProtocol:
        factory = self._runner.server
        assert factory is not None
        if len(factory.connections) >= self.max_connections:
            return _Refused()
        handler = factory()
        self._opened[handler] = asyncio.get_running_loop().time()
        return handler

    async def _sweep(self) -> None:
        factory = self._runner.server
        assert factory is not None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP)
            now = loop.time()
            live = set(factory.connections)
            for handler in live:
                opened = self._opened.get(handler)
                if opened is not None and now - opened > self.lifetime:
                    handler.force_close()
            # forget closed ones (a handler made a moment ago may not be registered yet)
            self._opened = {
                h: t for h, t in self._opened.items() if h in live or now - t < 2 * _SWEEP
            }

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()
