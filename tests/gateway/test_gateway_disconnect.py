"""A client that goes away while its response streams is one info line, not an error with a
traceback ("Cannot write to closing transport")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from gateway_harness import Echo, LabPki, build_request, gateway_config
from support.waiting import wait_for


async def _streaming_upstream() -> tuple[web.BaseRunner, int]:
    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        # ~10 s of 64 KiB chunks unless the gateway goes away; this upstream's own view of that
        # is not the subject here, so it ends quietly instead of logging an error.
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                await resp.write(b"x" * 65536)
                await asyncio.sleep(0.05)
            await resp.write_eof()
        return resp

    runner = web.ServerRunner(web.Server(handler, access_log=None))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_client_disconnect_mid_stream_is_one_info_line(
    test_pki: LabPki,
    echo: Echo,
    start_gateway: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner, port = await _streaming_upstream()
    try:
        doc = gateway_config(test_pki, echo.port)
        doc["upstreams"]["slow"] = {"url": f"http://127.0.0.1:{port}"}
        doc["routes"][0]["upstream"] = "slow"
        gw = await start_gateway(doc)
        caplog.set_level(logging.DEBUG)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gw.port, ssl=gw.ctx("web"), server_hostname="localhost"
        )
        writer.write(build_request("GET", "/orders/1"))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200")
        writer.transport.abort()  # gone mid-body
        await wait_for(
            lambda: any("client disconnected" in r.getMessage() for r in caplog.records),
            10,
            "the client disconnected log line",
        )
        gone = [r for r in caplog.records if "client disconnected" in r.getMessage()]
        assert len(gone) == 1 and gone[0].levelno == logging.INFO
        assert gone[0].exc_info is None
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        # the gateway still serves
        resp = await gw.request("GET", "/public/1")
        assert resp is not None and resp.status == 200
    finally:
        await runner.cleanup()
