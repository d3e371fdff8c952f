"""WebSocket on routes with ``websocket: true``, over real sockets: aiohttp's WebSocket client
through the gateway (mTLS) to aiohttp's WebSocket server. The upgrade passes policy (and JWT)
first; after the 101 frames flow both ways until a side closes or ``idle_timeout``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from gateway_harness import WEB_ID, Echo, Harness, LabPki, gateway_config

StartGateway = Callable[..., Any]


@pytest.fixture
async def ws_upstream() -> AsyncIterator[tuple[int, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return web.Response(text="plain")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "bye":
                    await ws.close()
                    break
                await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1], seen
    await runner.cleanup()


def _ws_config(pki: LabPki, echo_port: int, ws_port: int, **limits: Any) -> dict[str, Any]:
    doc = gateway_config(pki, echo_port)
    doc["upstreams"]["ws"] = {"url": f"http://127.0.0.1:{ws_port}"}
    doc["routes"] += [
        {"name": "ws", "match": {"path_prefix": "/ws"}, "upstream": "ws", "allow": [WEB_ID],
         "websocket": True},
        {"name": "nows", "match": {"path_prefix": "/nows"}, "upstream": "ws", "allow": [WEB_ID]},
    ]  # fmt: skip
    if limits:
        doc["limits"] = limits
    return doc


async def test_websocket_relays_both_ways(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway, ws_upstream: Any
) -> None:
    port, seen = ws_upstream
    gw: Harness = await start_gateway(_ws_config(test_pki, echo.port, port))
    async with aiohttp.ClientSession() as session:
        url = f"wss://localhost:{gw.port}/ws/chat"
        async with session.ws_connect(url, ssl=gw.ctx("web")) as ws:
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "echo:hello"
            big = bytes(range(256)) * 1024  # 256 KiB: back-pressure both ways
            await ws.send_bytes(big)
            assert (await ws.receive(timeout=10)).data == big
            await ws.send_str("bye")
            closing = await ws.receive(timeout=5)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    (headers,) = seen
    assert headers["X-Forwarded-Client-Cert"].endswith(f"URI={WEB_ID}")
    # the gateway still serves plain requests
    resp = await gw.request("GET", "/public/x")
    assert resp is not None and resp.status == 200


async def test_websocket_upgrade_passes_policy_first(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway, ws_upstream: Any
) -> None:
    port, seen = ws_upstream
    gw: Harness = await start_gateway(_ws_config(test_pki, echo.port, port))
    async with aiohttp.ClientSession() as session:
        url = f"wss://localhost:{gw.port}/ws/chat"
        with pytest.raises(aiohttp.WSServerHandshakeError) as denied:
            await session.ws_connect(url, ssl=gw.ctx("writer"))
        assert denied.value.status == 403
    assert seen == []  # nothing reached the upstream


async def test_websocket_elsewhere_is_a_plain_request(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway, ws_upstream: Any
) -> None:
    port, seen = ws_upstream
    gw: Harness = await start_gateway(_ws_config(test_pki, echo.port, port))
    async with aiohttp.ClientSession() as session:
        url = f"wss://localhost:{gw.port}/nows/chat"
        with pytest.raises(aiohttp.WSServerHandshakeError) as plain:
            await session.ws_connect(url, ssl=gw.ctx("web"))
        assert plain.value.status == 200  # the upstream's plain answer, never a 101
    (headers,) = seen
    assert "Upgrade" not in headers


async def test_websocket_idle_timeout_closes_both_sides(
    test_pki: LabPki, echo: Echo, start_gateway: StartGateway, ws_upstream: Any
) -> None:
    port, _seen = ws_upstream
    gw: Harness = await start_gateway(_ws_config(test_pki, echo.port, port, idle_timeout="1s"))
    async with aiohttp.ClientSession() as session:
        url = f"wss://localhost:{gw.port}/ws/chat"
        async with session.ws_connect(url, ssl=gw.ctx("web"), autoping=False) as ws:
            await ws.send_str("x")
            assert (await ws.receive(timeout=5)).data == "echo:x"
            started = asyncio.get_running_loop().time()
            msg = await ws.receive(timeout=10)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                aiohttp.WSMsgType.ERROR)  # fmt: skip
            assert asyncio.get_running_loop().time() - started < 5
    resp = await gw.request("GET", "/public/x")
    assert resp is not None and resp.status == 200
