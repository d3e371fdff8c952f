"""Reference floors for reading the gateway's numbers (``bench/run --floors``).

Minimal Python servers with the gateway's TLS settings (TLS 1.3, client certificate required
and verified against the bundle, no tickets, uvloop) and none of its features:

- ``hello``: aiohttp answers 200 itself — the cost of aiohttp + TLS in Python, no upstream;
- ``proxy``: aiohttp server + pooled aiohttp client to the upstream, body read whole and
  returned in one response — the cost of the gateway's architecture without identity,
  policy, JWT, header hygiene, logging or metrics;
- ``rawup``: aiohttp server, a hand-written pooled upstream client, headers + body in one
  write — what replacing only the gateway's upstream leg and response writing would reach;
- ``raw``: an asyncio.Protocol proxy with one pooled upstream connection per client
  connection and a minimal HTTP/1.x parser (GET/HEAD only, Content-Length responses) —
  what a hand-written forwarding path could reach.

Not a product and not secure beyond the TLS handshake: measurement only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path


def server_context(cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve_aiohttp(mode: str, port: int, upstream_port: int, ctx: ssl.SSLContext) -> None:
    import aiohttp
    from aiohttp import web

    session: aiohttp.ClientSession | None = None
    base = f"http://127.0.0.1:{upstream_port}"

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=b"ok\n", content_type="text/plain")

    async def proxy(request: web.Request) -> web.Response:
        assert session is not None
        async with session.get(base + request.path_qs, allow_redirects=False) as resp:
            body = await resp.read()
            return web.Response(
                body=body, status=resp.status, headers={"Content-Type": resp.content_type}
            )

    pool: list[_Upstream] = []
    loop = asyncio.get_running_loop()

    async def rawup(request: web.Request) -> web.Response:
        # aiohttp server, hand-written pooled upstream leg, one write for headers + body.
        up = pool.pop() if pool else None
        if up is None or up.transport is None or up.transport.is_closing():
            _, up = await loop.create_connection(_Upstream, "127.0.0.1", upstream_port)
        assert up.transport is not None
        up.waiter = loop.create_future()
        up.transport.write(b"GET %s HTTP/1.1\r\nHost: upstream\r\n\r\n" % request.raw_path.encode())
        msg = await up.waiter
        pool.append(up)
        head, _, body = msg.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return web.Response(body=body, status=status, content_type="text/plain")

    handlers = {"hello": hello, "proxy": proxy, "rawup": rawup}
    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handlers[mode])
    if mode == "proxy":
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
        )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.SockSite(runner, listening_socket(port), ssl_context=ctx)
    await site.start()
    try:
        await asyncio.Event().wait()
    finally:
        if session is not None:
            await session.close()
        await runner.cleanup()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; reads Content-Length framed responses."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        total = end + 4 + _content_length(bytes(self.buf[:end]))
        if len(self.buf) >= total:
            msg = bytes(self.buf[:total])
            del self.buf[:total]
            waiter, self.waiter = self.waiter, None
            waiter.set_result(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError("upstream closed"))


class _Client(asyncio.Protocol):
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.up: _Upstream | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tr: asyncio.Transport = transport  # type: ignore[assignment]  # uvloop's SSL transport
        self.transport = tr
        ssl_obj = tr.get_extra_info("ssl_object")
        if ssl_obj is None or not ssl_obj.getpeercert(binary_form=True):
            tr.abort()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[: end + 4])
        del self.buf[: end + 4]
        self.busy = True
        asyncio.get_running_loop().create_task(self._forward(head))

    async def _forward(self, head: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self.up is None or self.up.transport is None or self.up.transport.is_closing():
                _, proto = await loop.create_connection(_Upstream, "127.0.0.1", self.upstream_port)
                self.up = proto
            line, _, rest = head.partition(b"\r\n")
            method, target, version = line.split(b" ", 2)
            keep = b"connection: keep-alive" in rest.lower() or version.endswith(b"1.1")
            req = b"%s %s HTTP/1.1\r\nHost: upstream\r\n\r\n" % (method, target)
            self.up.waiter = loop.create_future()
            assert self.up.transport is not None
            self.up.transport.write(req)
            resp = await self.up.waiter  # nginx answers with Connection: keep-alive
            assert self.transport is not None
            self.transport.write(resp)
            if not keep:
                self.transport.close()
        except (ConnectionError, ValueError):
            if self.transport is not None:
                self.transport.abort()
            return
        self.busy = False
        if self.buf:
            self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def serve_raw(port: int, upstream_port: int, ctx: ssl.SSLContext) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Client(upstream_port), sock=listening_socket(port), ssl=ctx
    )
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.floor")
    p.add_argument("--mode", choices=("hello", "proxy", "rawup", "raw"), required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream-port", type=int, default=0)
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    ctx = server_context(args.cert, args.key, args.bundle)
    for _ in range(args.workers - 1):
        if os.fork() == 0:
            break
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    coro = (
        serve_raw(args.port, args.upstream_port, ctx)
        if args.mode == "raw"
        else serve_aiohttp(args.mode, args.port, args.upstream_port, ctx)
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(coro)
    return 0


if __name__ == "__main__":
    sys.exit(main())
