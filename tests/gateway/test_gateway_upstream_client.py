"""The upstream leg (gateway.upstream_client + gateway.proxy) against scripted upstreams on
127.0.0.1: pooling, stale connections and retries, response framing, malformed responses,
request bodies, timeouts and the exact bytes sent upstream."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from gateway_harness import (
    BUNDLE_A,
    WEB_ID,
    WRITER_ID,
    A,
    Echo,
    Harness,
    LabPki,
    gateway_config,
)
from multidict import CIMultiDict
from support.waiting import wait_for
from svidgate.gateway.upstream_client import (
    ConnectFailed,
    Disconnected,
    ReadTimeout,
    UpstreamPool,
    encode_request_head,
    scan_head,
)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, "Scripted"], Awaitable[None]]


@dataclass
class Scripted:
    """A plain-HTTP upstream whose behaviour per connection is a test-supplied coroutine."""

    port: int = 0
    connections: int = 0
    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


async def read_request(reader: asyncio.StreamReader, up: Scripted) -> bytes | None:
    """Read one request (head + Content-Length or chunked body); None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    up.heads.append(head)
    lower = head.lower()
    body = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += data[:-2]
    else:
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                body = await reader.readexactly(int(line.split(b":")[1]))
    up.bodies.append(body)
    return head


@contextlib.asynccontextmanager
async def scripted(script: Script) -> AsyncIterator[Scripted]:
    up = Scripted()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up.connections += 1
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await script(reader, writer, up)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            up.closed.set()
            tasks.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    up.port = server.sockets[0].getsockname()[1]
    try:
        yield up
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await server.wait_closed()


async def stall_forever() -> None:
    """Answer nothing more until the scripted upstream is shut down (which cancels this)."""
    await asyncio.Event().wait()


def respond(*responses: bytes) -> Script:
    """Answer each request on a connection with the next response, then close."""

    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted
    ) -> None:
        for response in responses:
            if await read_request(reader, up) is None:
                return
            writer.write(response)
            await writer.drain()

    return script


def keep_alive(response: bytes) -> Script:
    async def script(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted
    ) -> None:
        while await read_request(reader, up) is not None:
            writer.write(response)
            await writer.drain()

    return script


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Up: 1\r\n\r\nok"


def _doc(pki: LabPki, echo: Echo, port: int, **upstream: Any) -> dict[str, Any]:
    doc = gateway_config(pki, echo.port)
    doc["upstreams"]["raw"] = {"url": f"http://127.0.0.1:{port}", **upstream}
    doc["routes"].append(
        {
            "name": "raw",
            "match": {"path_prefix": "/raw"},
            "upstream": "raw",
            "allow": [WEB_ID, WRITER_ID],
        }
    )
    return doc


StartGateway = Callable[..., Awaitable[Harness]]


async def _gateway(
    start_gateway: StartGateway, pki: LabPki, echo: Echo, up: Scripted, **upstream: Any
) -> Harness:
    return await start_gateway(_doc(pki, echo, up.port, **upstream))


# -- pooling and retries -------------------------------------------------------------------------


async def test_keep_alive_connection_is_reused(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    async with scripted(keep_alive(OK)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        for _ in range(3):
            resp = await gw.request("GET", "/raw/x")
            assert resp is not None and resp.status == 200 and resp.body == b"ok"
        assert up.connections == 1
        assert len(up.heads) == 3


async def test_connection_close_response_is_not_reused(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    closing = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    async with scripted(respond(closing)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        for _ in range(2):
            resp = await gw.request("GET", "/raw/x")
            assert resp is not None and resp.status == 200 and resp.body == b"ok"
            assert resp.header("Connection") in (None, "close")
        assert up.connections == 2


async def test_stale_pooled_connection_is_retried_for_get(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    # Each connection answers once without "Connection: close", then closes: the pooled
    # connection is stale when the second request is sent on it.
    async with scripted(respond(OK)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up, retries=1)
        first = await gw.request("GET", "/raw/x")
        assert first is not None and first.status == 200
        await asyncio.wait_for(up.closed.wait(), 5)
        second = await gw.request("GET", "/raw/y")
        assert second is not None and second.status == 200 and second.body == b"ok"
        assert up.connections == 2


async def test_request_with_body_is_never_retried(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    async def drop(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted
    ) -> None:
        await read_request(reader, up)  # take the request, answer nothing, close

    async with scripted(drop) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up, retries=3)
        resp = await gw.request("PUT", "/raw/x", body=b"payload", client="writer")
        assert resp is not None and resp.status == 502
        assert up.connections == 1 and up.bodies == [b"payload"]
        # Idempotent and bodiless: retried up to `retries` times.
        resp = await gw.request("GET", "/raw/x")
        assert resp is not None and resp.status == 502
        assert up.connections == 1 + 4


async def test_failure_after_response_bytes_is_not_retried(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    async def half(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted
    ) -> None:
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-")
        await writer.drain()

    async with scripted(half) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up, retries=3)
        resp = await gw.request("GET", "/raw/x")
        assert resp is not None and resp.status == 502
        assert up.connections == 1


# -- response framing ----------------------------------------------------------------------------


async def test_chunked_response_is_streamed(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    async with scripted(keep_alive(chunked)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        for _ in range(2):
            resp = await gw.request("GET", "/raw/x")
            assert resp is not None and resp.status == 200
            assert resp.body == b"hello world"
            assert resp.header("Transfer-Encoding") == "chunked"
        assert up.connections == 1


async def test_read_until_close_response(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    async with scripted(respond(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nuntil the end")) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        resp = await gw.request("GET", "/raw/x")
        assert resp is not None and resp.status == 200 and resp.body == b"until the end"


async def test_large_response_is_streamed_intact(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    body = bytes(range(256)) * 1024  # 256 KiB, above the one-write limit
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    async with scripted(keep_alive(big)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        resp = await gw.request("GET", "/raw/x")
        assert resp is not None and resp.status == 200
        assert resp.header("Content-Length") == str(len(body))
        assert resp.body == body


@pytest.mark.parametrize(
    ("method", "response"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'),
    ],
)
async def test_bodiless_responses_keep_the_connection(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway, method: str, response: bytes
) -> None:
    async with scripted(keep_alive(response)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        for _ in range(2):
            resp = await gw.request(method, "/raw/x")
            assert resp is not None
            assert resp.status == int(response.split(b" ")[1])
            assert resp.body == b""
        if method == "HEAD":
            assert resp.header("Content-Length") == "1234"
        assert up.connections == 1


async def test_interim_100_response_is_skipped(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    async with scripted(respond(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        resp = await gw.request("GET", "/raw/x")
        assert resp is not None and resp.status == 200 and resp.body == b"ok"


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", id="bad-status-code"),
        pytest.param(b"HELLO\r\n\r\n", id="no-status-line"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            id="content-length-and-chunked",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 3x\r\n\r\nabc", id="bad-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\nabc", id="negative-length"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
            id="two-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 3\r\n\r\nabc", id="obs-fold"
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length : 3\r\n\r\nabc", id="space-before-colon"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n", id="nul-in-value"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", id="body-shorter-than-length"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            id="bad-chunk-size",
        ),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", id="upgrade"),
    ],
)
async def test_malformed_upstream_response_502(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway, response: bytes
) -> None:
    async with scripted(respond(response)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up, retries=0)
        resp = await gw.request("GET", "/raw/x")
        assert resp is not None and resp.status == 502
        assert resp.json()["error"] == "bad_gateway"
        assert resp.header("X-A") is None


async def test_streamed_body_cut_short_aborts_the_client_connection(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    # Headers of a large response are already out when the upstream dies mid-body: the client
    # connection is cut, never completed with a truncated body.
    async def die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted) -> None:
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"x" * 70000)
        await writer.drain()

    async with scripted(die) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        resp = await gw.request("GET", "/raw/x")
        assert resp is None or len(resp.body) < 200000


# -- request side --------------------------------------------------------------------------------


async def test_exact_request_head_sent_upstream(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    async with scripted(keep_alive(OK)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        headers = [("X-B", "2"), ("Connection", "X-Drop"), ("X-Drop", "gone"), ("X-A", "1")]
        resp = await gw.request("GET", "/raw/a/./b?q=%2e%2E&x=1&x=2", headers=headers)
        assert resp is not None and resp.status == 200
        lines = up.heads[0].decode("latin-1").split("\r\n")
        assert lines[0] == "GET /raw/a/b?q=%2e%2E&x=1&x=2 HTTP/1.1"
        names = [line.split(":", 1)[0] for line in lines[1:] if line]
        assert names[:3] == ["Host", "X-B", "X-A"]
        assert "X-Drop" not in names and "Connection" not in names
        assert "X-Forwarded-Client-Cert" in names


async def test_chunked_request_body_is_forwarded(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    async with scripted(keep_alive(OK)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        data = (
            b"POST /raw/upload HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n4\r\nabcd\r\n3\r\nefg\r\n0\r\n\r\n"
        )
        from gateway_harness import raw_exchange

        resp = await raw_exchange(gw.port, gw.ctx("writer"), data)
        assert resp is not None and resp.status == 200
        assert up.bodies == [b"abcdefg"]
        assert b"transfer-encoding: chunked" in up.heads[0].lower()


async def test_bodiless_post_carries_content_length_zero(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    async with scripted(keep_alive(OK)) as up:
        gw = await _gateway(start_gateway, test_pki, echo, up)
        resp = await gw.request("POST", "/raw/x", client="writer")
        assert resp is not None and resp.status == 200
        assert b"\r\nContent-Length: 0\r\n" in up.heads[0]


async def test_read_timeout_while_reading_a_small_body_504(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    async def stall(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted
    ) -> None:
        await read_request(reader, up)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await stall_forever()

    async with scripted(stall) as up:
        gw = await _gateway(
            start_gateway,
            test_pki,
            echo,
            up,
            retries=0,
            timeouts={"connect": "1s", "read": "200ms"},
        )
        resp = await gw.request("GET", "/raw/x")
        assert resp is not None and resp.status == 504


# -- the client on its own -----------------------------------------------------------------------


def test_encode_request_head() -> None:
    head, chunked = encode_request_head(
        "POST", "/a?b", CIMultiDict([("Host", "h"), ("X", "1")]), default_host="u:1", has_body=True
    )
    assert head == b"POST /a?b HTTP/1.1\r\nHost: h\r\nX: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert chunked
    head, chunked = encode_request_head(
        "GET", "/", CIMultiDict([("Content-Length", "3")]), default_host="u:1", has_body=True
    )
    assert head == b"GET / HTTP/1.1\r\nHost: u:1\r\nContent-Length: 3\r\n\r\n"
    assert not chunked
    for bad in [("X", "a\r\nInjected: 1"), ("X\n", "a"), ("X", "a\x00")]:
        with pytest.raises(ValueError):
            encode_request_head("GET", "/", CIMultiDict([bad]), default_host="u", has_body=False)
    with pytest.raises(ValueError):
        encode_request_head(
            "GET", "/ HTTP/1.1\r\nX: y", CIMultiDict(), default_host="u", has_body=False
        )


def test_scan_head() -> None:
    assert scan_head(b"HTTP/1.1 200 OK\r\nA: b\r\n") is None
    assert scan_head(b"HTTP/1.1 200 OK\r\nA: b\r\n\r\nbody\n with fold-like bytes") is False
    assert scan_head(b"HTTP/1.1 200 OK\r\nA: b\r\n c\r\n\r\n") is True
    assert scan_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nA: b\r\n\tc\r\n\r\n") is True
    assert scan_head(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n") is None
    assert scan_head(b"HTTP/1.1 200 OK\r\nContent-Length : 1\r\n\r\n") is True
    assert scan_head(b"HTTP/1.1 200 OK\r\n: empty\r\n\r\n") is True
    assert scan_head(b"HTTP/1.1 200 OK\r\nX-\xff: 1\r\n\r\n") is True
    assert scan_head(b"HTTP/1.1 200 OK\nA: b\n\n") is False


async def test_pool_idle_timeout_closes_connections() -> None:
    async with scripted(keep_alive(OK)) as up:
        pool = UpstreamPool(
            "127.0.0.1",
            up.port,
            ssl_context=None,
            expected_id=None,
            connect_timeout=1.0,
            read_timeout=1.0,
            idle_timeout=0.2,
        )
        conn, reused = await pool.acquire()
        assert not reused
        message, payload = await conn.send(b"GET / HTTP/1.1\r\nHost: u\r\n\r\n", head_only=False)
        assert message.code == 200 and await payload.read() == b"ok"
        pool.release(conn)
        assert pool.idle_count == 1
        again, reused = await pool.acquire()
        assert reused and again is conn
        pool.release(again)
        await asyncio.wait_for(up.closed.wait(), 5)  # the sweeper closed it
        assert pool.idle_count == 0
        await pool.close()


async def test_pool_read_timeout_and_refused_connect() -> None:
    async def silent(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted
    ) -> None:
        await read_request(reader, up)
        await stall_forever()

    async with scripted(silent) as up:
        pool = UpstreamPool(
            "127.0.0.1",
            up.port,
            ssl_context=None,
            expected_id=None,
            connect_timeout=1.0,
            read_timeout=0.2,
        )
        conn, _ = await pool.acquire()
        with pytest.raises(ReadTimeout):
            await conn.send(b"GET / HTTP/1.1\r\nHost: u\r\n\r\n", head_only=False)
        pool.release(conn)
        assert pool.idle_count == 0
        await pool.close()
    pool = UpstreamPool(
        "127.0.0.1",
        up.port,
        ssl_context=None,
        expected_id=None,
        connect_timeout=1.0,
        read_timeout=1,
    )
    with pytest.raises(ConnectFailed):
        await pool.acquire()


async def test_connection_closed_before_response_is_marked_retryable() -> None:
    async def drop(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: Scripted
    ) -> None:
        await read_request(reader, up)

    async with scripted(drop) as up:
        pool = UpstreamPool(
            "127.0.0.1",
            up.port,
            ssl_context=None,
            expected_id=None,
            connect_timeout=1,
            read_timeout=1,
        )
        conn, _ = await pool.acquire()
        with pytest.raises(Disconnected) as info:
            await conn.send(b"GET / HTTP/1.1\r\nHost: u\r\n\r\n", head_only=False)
        assert info.value.before_response
        pool.release(conn)
        assert pool.idle_count == 0


async def test_slow_client_back_pressure_is_not_an_upstream_timeout(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    # 8 MiB does not fit in the socket buffers (the client's receive buffer is kept small):
    # while the client does not read, the gateway stops reading the upstream. That pause must
    # not count against the upstream's read timeout.
    body = bytes(range(256)) * (32 * 1024)
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    async with scripted(keep_alive(big)) as up:
        gw = await _gateway(
            start_gateway,
            test_pki,
            echo,
            up,
            retries=0,
            timeouts={"connect": "1s", "read": "300ms"},
        )
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
        reader, writer = await asyncio.open_connection(
            sock=sock, ssl=gw.ctx("web"), server_hostname="localhost"
        )
        try:
            writer.write(b"GET /raw/big HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            await writer.drain()
            await asyncio.sleep(1.0)  # well past the read timeout, without reading
            received = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        head, _, got = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert got == body


async def test_pinned_id_checked_before_any_request_byte(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    # A TLS upstream with a valid SVID of the wrong ID: the handshake succeeds, then the gateway
    # must hang up without writing a single byte of the request.
    cert, key = test_pki.issue("spiffe://example.org/impostor", "impostor", ips=["127.0.0.1"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(test_pki.bundle(A)))
    ctx.verify_mode = ssl.CERT_REQUIRED
    received: list[bytes] = []
    handshakes = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal handshakes
        handshakes += 1
        data = b""
        with contextlib.suppress(Exception):
            while chunk := await asyncio.wait_for(reader.read(65536), 5):
                data += chunk
        received.append(data)
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        doc = gateway_config(test_pki, echo.port)
        doc["upstreams"]["pinned"] = {
            "url": f"https://127.0.0.1:{port}",
            "tls": {
                "cert": "gateway.crt",
                "key": "gateway.key",
                "bundle": BUNDLE_A,
                "spiffe_id": "spiffe://example.org/orders",
            },
            "retries": 0,
        }
        doc["routes"].append(
            {
                "name": "pinned",
                "match": {"path_prefix": "/pinned"},
                "upstream": "pinned",
                "allow": [WEB_ID],
            }
        )
        gw = await start_gateway(doc)
        resp = await gw.request("GET", "/pinned/x")
        assert resp is not None and resp.status == 502
        assert resp.json()["reason"] == "upstream_identity"
        await wait_for(lambda: bool(received), 5, "the upstream to see the connection end")
        assert handshakes == 1
        assert received == [b""]
    finally:
        server.close()
        await server.wait_closed()


async def test_client_abandoning_its_upload_does_not_trip_the_breaker(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway
) -> None:
    # failures=1: a single upstream failure would open the circuit. A client that sends part of
    # its body and hangs up is the client's failure, not the upstream's.
    async with scripted(keep_alive(OK)) as up:
        gw = await _gateway(
            start_gateway, test_pki, echo, up, circuit_breaker={"failures": 1, "reset": "1m"}
        )
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=gw.ctx("writer"), server_hostname="localhost"
        )
        writer.write(
            b"POST /raw/upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n0123456789"
        )
        await writer.drain()
        # until the upstream has the head and the first bytes
        await wait_for(lambda: bool(up.heads), 2, "the request at the upstream")
        assert up.heads, "the request reached the upstream"
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        await asyncio.wait_for(up.closed.wait(), 5)  # the gateway dropped the upstream leg
        await asyncio.sleep(0.1)
        resp = await gw.request("GET", "/raw/after")
        assert resp is not None and resp.status == 200
