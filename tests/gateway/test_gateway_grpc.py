"""gRPC through the gateway with real peers: a grpc.aio client presenting an SVID → svidgate
(HTTP/2 both legs) → a grpc.aio server over mTLS with its SPIFFE ID pinned. Every streaming
kind, a 1 MiB message, trailing metadata, denials with the right gRPC status, grpc-timeout,
cancellation, and HTTP/1.1 ↔ HTTP/2 translation."""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from gateway_harness import (
    WEB_ID,
    Echo,
    GatewayProcess,
    Harness,
    LabPki,
    build_request,
    raw_exchange,
)
from grpc_lab import (
    SERVICE,
    TRAILER,
    EchoService,
    channel,
    grpc_gateway_config,
    health_stub,
    method,
    start_grpc_upstream,
)
from support.ports import free_port
from test_gateway_jwt import AUDIENCE, Signer


@pytest.fixture
async def upstream(test_pki: LabPki) -> AsyncIterator[EchoService]:
    service, server = await start_grpc_upstream(test_pki)
    yield service
    await server.stop(0)


@pytest.fixture
async def ggw(
    test_pki: LabPki, echo: Echo, upstream: EchoService, start_gateway: Callable[..., Any]
) -> Harness:
    gw: Harness = await start_gateway(grpc_gateway_config(test_pki, echo.port, upstream.port))
    return gw


async def test_unary_with_trailing_metadata_and_identity(
    ggw: Harness, upstream: EchoService
) -> None:
    async with channel(ggw.pki, ggw.port) as ch:
        call = method(ch, "Unary")(b"hello", metadata=(("x-caller", "test"),), timeout=20)
        assert await call == b"hello"
        assert TRAILER in tuple(await call.trailing_metadata())
        assert await call.code() == grpc.StatusCode.OK
    (name, meta), *_ = upstream.calls
    assert name == "Unary" and meta["x-caller"] == "test"
    assert f"URI={WEB_ID}" in meta["x-forwarded-client-cert"]


async def test_one_mebibyte_message_both_ways(ggw: Harness) -> None:
    payload = bytes(range(256)) * 4096
    async with channel(ggw.pki, ggw.port) as ch:
        assert await method(ch, "Unary")(payload, timeout=30) == payload


async def test_client_streaming(ggw: Harness) -> None:
    async def parts() -> AsyncIterator[bytes]:
        for n in range(20):
            yield b"p%d" % n

    async with channel(ggw.pki, ggw.port) as ch:
        call = method(ch, "ClientStream", "stream_unary")(parts(), timeout=20)
        assert await call == b"|".join(b"p%d" % n for n in range(20))
        assert TRAILER in tuple(await call.trailing_metadata())


async def test_server_streaming(ggw: Harness) -> None:
    async with channel(ggw.pki, ggw.port) as ch:
        call = method(ch, "ServerStream", "unary_stream")(b"50", timeout=20)
        items = [item async for item in call]
        assert items == [b"item-%d" % n for n in range(50)]
        assert TRAILER in tuple(await call.trailing_metadata())


async def test_bidi_streaming_ping_pong(ggw: Harness) -> None:
    async with channel(ggw.pki, ggw.port) as ch:
        call = method(ch, "Bidi", "stream_stream")(timeout=20)
        for word in (b"abc", b"hello", b"x" * 70000):
            await call.write(word)
            assert await call.read() == word[::-1]  # each answer before the next message
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


async def test_health_service(ggw: Harness) -> None:
    async with channel(ggw.pki, ggw.port) as ch:
        stub, request = health_stub(ch)
        reply = await stub.Check(request(service=""), timeout=20)
        assert reply.status == 1  # SERVING


async def _status(ch: grpc.aio.Channel, path: str, **kw: Any) -> grpc.aio.AioRpcError:
    call = ch.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(b"x", timeout=20, **kw)
    return info.value


async def test_denials_have_grpc_statuses(ggw: Harness, upstream: EchoService) -> None:
    async with channel(ggw.pki, ggw.port) as ch:
        denied = await _status(ch, "/admin.Admin/Drop")
        missing = await _status(ch, "/nowhere.Svc/Call")
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (denied.details() or "").startswith("identity_not_allowed")
    assert missing.code() == grpc.StatusCode.UNIMPLEMENTED
    assert (missing.details() or "").startswith("no_route")
    assert upstream.calls == []


async def test_unreachable_upstream_is_unavailable(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    gw = await start_gateway(grpc_gateway_config(test_pki, echo.port, free_port()))
    async with channel(gw.pki, gw.port) as ch:
        err = await _status(ch, f"/{SERVICE}/Unary")
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert (err.details() or "").startswith("upstream_unreachable")


@pytest.fixture(scope="module")
def grpc_signer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    s = Signer(tmp_path_factory.mktemp("grpc-signer"))
    s.process.start_sync()
    yield s
    if s.process.running:
        s.process.stop(10)


async def test_jwt_from_authorization_metadata(
    test_pki: LabPki,
    echo: Echo,
    upstream: EchoService,
    grpc_signer: Signer,
    start_gateway: Callable[..., Any],
) -> None:
    doc = grpc_gateway_config(test_pki, echo.port, upstream.port)
    doc["signer"] = {"address": f"unix:{grpc_signer.socket}", "timeout": "2s"}
    doc["routes"][-3]["jwt"] = {"audience": AUDIENCE, "bind": "subject"}  # echo-grpc
    gw = await start_gateway(doc)
    token = await grpc_signer.sign(WEB_ID)
    async with channel(gw.pki, gw.port) as ch:
        missing = await _status(ch, f"/{SERVICE}/Unary")
        bad = await _status(ch, f"/{SERVICE}/Unary", metadata=(("authorization", "Bearer x.y.z"),))
        ok = await method(ch, "Unary")(
            b"in", metadata=(("authorization", f"Bearer {token}"),), timeout=20
        )
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (missing.details() or "").startswith("missing_token")
    assert bad.code() == grpc.StatusCode.UNAUTHENTICATED
    assert ok == b"in"
    assert len(upstream.calls) == 1
    assert "authorization" not in upstream.calls[0][1]  # verified here, not passed on


async def test_grpc_timeout_bounds_the_upstream_call(ggw: Harness, upstream: EchoService) -> None:
    async with channel(ggw.pki, ggw.port) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await method(ch, "Slow")(b"x", timeout=0.5)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(upstream.cancelled.wait(), 10)  # the upstream stream was cancelled


async def test_cancelled_client_cancels_the_upstream_stream(
    ggw: Harness, upstream: EchoService
) -> None:
    async with channel(ggw.pki, ggw.port) as ch:
        call = method(ch, "Forever", "unary_stream")(b"", timeout=30)
        got = [await call.read() for _ in range(3)]
        assert got == [b"tick-0", b"tick-1", b"tick-2"]
        call.cancel()
        await asyncio.wait_for(upstream.cancelled.wait(), 10)


def _frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


async def test_http11_client_to_h2_upstream(ggw: Harness, upstream: EchoService) -> None:
    """h1 → h2: a gRPC request over HTTP/1.1 reaches the HTTP/2 upstream; the answer comes
    back chunked with the gRPC status in the trailer section."""
    ctx: ssl.SSLContext = ggw.ctx()
    ctx.set_alpn_protocols(["http/1.1"])
    data = build_request(
        "POST",
        f"/{SERVICE}/Unary",
        [("Content-Type", "application/grpc"), ("TE", "trailers")],
        _frame(b"over-h1"),
    )
    resp = await raw_exchange(ggw.port, ctx, data, timeout=20)
    assert resp is not None and resp.status == 200, resp
    assert resp.body == _frame(b"over-h1")
    assert upstream.calls and upstream.calls[0][0] == "Unary"


async def test_http11_trailers_reach_the_client(ggw: Harness) -> None:
    ctx: ssl.SSLContext = ggw.ctx()
    ctx.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", ggw.port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(
        build_request(
            "POST", f"/{SERVICE}/Unary", [("Content-Type", "application/grpc")], _frame(b"t")
        )
    )
    raw = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    assert b"\r\n0\r\n" in raw
    trailer_section = raw.rsplit(b"\r\n0\r\n", 1)[1]
    assert b"grpc-status: 0" in trailer_section.lower()
    assert b"x-echo-trailer: done" in trailer_section.lower()


async def test_curl_http2(ggw: Harness, echo: Echo) -> None:
    curl = shutil.which("curl")
    assert curl, "curl is missing: apt-get install curl (with HTTP/2: nghttp2)"
    crt, key = ggw.pki.files("web")
    proc = await asyncio.create_subprocess_exec(
        curl,
        "-sS",
        "--http2",
        "--cacert",
        str(ggw.pki.bundle()),
        "--cert",
        str(crt),
        "--key",
        str(key),
        "-w",
        "\n%{http_version} %{http_code}",
        f"https://localhost:{ggw.port}/orders/curl?x=1",
        "--resolve",
        f"localhost:{ggw.port}:127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    body, _, status = out.decode().rpartition("\n")
    assert status == "2 200", (status, err.decode())
    assert json.loads(body)["target"] == "/orders/curl?x=1"
    assert echo.targets == ["/orders/curl?x=1"]


async def test_grpc_through_a_gateway_process(
    test_pki: LabPki, echo: Echo, upstream: EchoService
) -> None:
    """The same calls through `svidgate gateway serve` (uvloop, the production loop)."""
    gw = GatewayProcess(test_pki, grpc_gateway_config(test_pki, echo.port, upstream.port))
    await gw.start(timeout=20)
    try:
        async with channel(test_pki, gw.port) as ch:
            assert await method(ch, "Unary")(b"u" * 100000, timeout=20) == b"u" * 100000
            call = method(ch, "Bidi", "stream_stream")(timeout=20)
            for word in (b"one", b"two"):
                await call.write(word)
                assert await call.read() == word[::-1]
            await call.done_writing()
            assert await call.code() == grpc.StatusCode.OK
            denied = await _status(ch, "/admin.Admin/Drop")
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        gw.kill()


async def test_h2c_upstream(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    """An http:// upstream with protocol h2 is spoken to with HTTP/2 prior knowledge."""
    service, server = await start_grpc_upstream(test_pki, plaintext=True)
    try:
        doc = grpc_gateway_config(test_pki, echo.port, service.port)
        doc["upstreams"]["grpc"]["url"] = f"http://127.0.0.1:{service.port}"
        del doc["upstreams"]["grpc"]["tls"]
        gw = await start_gateway(doc)
        async with channel(test_pki, gw.port) as ch:
            assert await method(ch, "Unary")(b"plain", timeout=20) == b"plain"
        assert service.calls[0][1]["x-forwarded-proto"] == "https"
    finally:
        await server.stop(0)


async def test_upstream_settings_bound_streams_per_connection(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    """The upstream allows 2 concurrent streams: 6 calls at once need 3 pooled connections,
    all of them succeed, and later calls reuse those connections."""
    service, server = await start_grpc_upstream(test_pki, max_streams=2)
    try:
        gw = await start_gateway(grpc_gateway_config(test_pki, echo.port, service.port))
        async with channel(test_pki, gw.port) as ch:
            pause = method(ch, "Pause")
            replies = await asyncio.gather(*(pause(b"0.5", timeout=20) for _ in range(6)))
            assert replies == [b"0.5"] * 6
            pool = gw.server.app.upstreams["grpc"].h2pool
            assert pool.connections == 3
            await asyncio.gather(*(pause(b"0.1", timeout=20) for _ in range(4)))
            assert pool.connections == 3
    finally:
        await server.stop(0)


async def test_slow_reader_slows_the_upstream(ggw: Harness, upstream: EchoService) -> None:
    """Flow control end to end: a client that stops reading stops the upstream's writes (the
    gateway credits the upstream only for what the client took); memory stays bounded."""
    async with channel(ggw.pki, ggw.port) as ch:
        call = method(ch, "Flood", "unary_stream")(b"", timeout=30)
        assert len(await call.read()) == 65536
        await asyncio.sleep(2)  # the client reads nothing more
        stalled_at = upstream.flooded
        await asyncio.sleep(1)
        assert upstream.flooded == stalled_at, "the upstream kept writing to a stalled reader"
        # windows and socket buffers on three hops: a few MiB, never the 256 MiB the call has
        assert stalled_at * 65536 < 24 * 1024 * 1024, stalled_at
        for _ in range(stalled_at + 20):  # reading again (past what was buffered) lets it go on
            await call.read()
        call.cancel()
    assert upstream.flooded > stalled_at


async def test_drain_lets_open_calls_finish(ggw: Harness, upstream: EchoService) -> None:
    """A drain (SIGTERM) sends GOAWAY: a call in flight still completes, then the connection
    closes and new calls are not accepted."""
    async with channel(ggw.pki, ggw.port) as ch:
        pause = method(ch, "Pause")
        assert await pause(b"0", timeout=20) == b"0"  # connected
        in_flight = asyncio.ensure_future(pause(b"1.5", timeout=20))
        for _ in range(200):
            if len(upstream.calls) == 2:
                break
            await asyncio.sleep(0.02)
        listener = ggw.server.listener
        assert listener is not None
        drain = asyncio.create_task(listener.shutdown(10))
        assert await in_flight == b"1.5"
        await asyncio.wait_for(drain, 15)
        assert listener.open_connections == 0
