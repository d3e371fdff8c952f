"""HTTP/2 abuse against a real `svidgate gateway serve` process, over real TLS with a test SVID,
with raw frames from h2's client state machine (or hand-built frames where h2 would refuse to
send them): each attack ends in GOAWAY ENHANCE_YOUR_CALM and a closed connection, the
upstream sees at most a handful of the attack's requests, and another client is served
meanwhile."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from gateway_harness import Echo, GatewayProcess, LabPki, gateway_config
from h2_client import H2Client
from hpack import Encoder
from hyperframe.frame import (
    ContinuationFrame,
    HeadersFrame,
    PingFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

CALM = 0xB
MAX_STREAMS = 8


@pytest.fixture
async def gateway(test_pki: LabPki, echo: Echo) -> AsyncIterator[GatewayProcess]:
    doc = gateway_config(test_pki, echo.port)
    doc["limits"] = {"h2": {"max_concurrent_streams": MAX_STREAMS, "max_header_list_bytes": 8192}}
    gw = GatewayProcess(test_pki, doc, "gateway-h2-abuse")
    await gw.start(timeout=20)
    yield gw
    gw.kill()


async def _client(gw: GatewayProcess) -> H2Client:
    return await H2Client.connect(gw.port, gw.pki.client_context(*gw.pki.files("web")))


def _block(path: str = "/orders/1") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"localhost"),
        (b":path", path.encode()),
    ]


async def _attack(
    gw: GatewayProcess, echo: Echo, attack: Callable[[H2Client], Awaitable[None]]
) -> H2Client:
    """Run ``attack`` on one connection while a bystander keeps being served; returns the
    attacker's client once the gateway closed it."""
    bystander = await _client(gw)
    attacker = await _client(gw)
    try:
        await attack(attacker)
        await asyncio.wait_for(attacker.closed.wait(), 30)
        served = await bystander.request("GET", "/orders/bystander", timeout=20)
        assert served.status == 200, "the other client was not served"
    finally:
        await bystander.close()
        await attacker.close()
    attack_requests = [t for t in echo.targets if t != "/orders/bystander"]
    assert len(attack_requests) <= 16, len(attack_requests)
    assert gw.running
    return attacker


async def test_rapid_reset(gateway: GatewayProcess, echo: Echo) -> None:
    async def attack(client: H2Client) -> None:
        for batch in range(50):
            for _ in range(100):
                stream_id = client.conn.get_next_available_stream_id()
                client.conn.send_headers(stream_id, _block(f"/orders/{batch}"), end_stream=True)
                client.conn.reset_stream(stream_id)
            client.flush()
            await client.drain()
            if client.closed.is_set():
                return

    attacker = await _attack(gateway, echo, attack)
    assert attacker.goaway == CALM
    assert attacker.goaway_debug == b"rapid_reset"


async def test_continuation_flood(gateway: GatewayProcess, echo: Echo) -> None:
    async def attack(client: H2Client) -> None:
        block = Encoder().encode(_block())
        headers = HeadersFrame(1, data=block)  # no END_HEADERS: CONTINUATION must follow
        client.send_raw(headers.serialize())
        for _ in range(2000):
            cont = ContinuationFrame(1, data=b"\x40\x01a\x01b")  # more literal fields, no end
            client.send_raw(cont.serialize())
            if client.closed.is_set():
                return
        await client.drain()

    attacker = await _attack(gateway, echo, attack)
    assert attacker.goaway == CALM


async def test_hpack_bomb(gateway: GatewayProcess, echo: Echo) -> None:
    async def attack(client: H2Client) -> None:
        # one 4 KiB header into the dynamic table, then referenced over and over: a few bytes
        # on the wire, far more than max_header_list_bytes once decoded
        encoder = Encoder()
        first = encoder.encode([*_block(), (b"x-bomb", b"a" * 4000)])
        client.send_raw(
            HeadersFrame(1, data=first, flags=["END_HEADERS", "END_STREAM"]).serialize()
        )
        bomb = encoder.encode([*_block(), *([(b"x-bomb", b"a" * 4000)] * 200)])
        client.send_raw(HeadersFrame(3, data=bomb, flags=["END_HEADERS", "END_STREAM"]).serialize())
        await client.drain()

    attacker = await _attack(gateway, echo, attack)
    assert attacker.goaway == CALM


async def test_settings_flood(gateway: GatewayProcess, echo: Echo) -> None:
    async def attack(client: H2Client) -> None:
        for _ in range(2000):
            client.send_raw(SettingsFrame(0, settings={0x4: 65535}).serialize())
        await client.drain()

    attacker = await _attack(gateway, echo, attack)
    assert attacker.goaway == CALM
    assert attacker.goaway_debug == b"settings_flood"


async def test_ping_flood(gateway: GatewayProcess, echo: Echo) -> None:
    async def attack(client: H2Client) -> None:
        for n in range(5000):
            client.send_raw(PingFrame(0, opaque_data=n.to_bytes(8, "big")).serialize())
        await client.drain()

    attacker = await _attack(gateway, echo, attack)
    assert attacker.goaway == CALM
    assert attacker.goaway_debug == b"ping_flood"


async def test_window_update_flood(gateway: GatewayProcess, echo: Echo) -> None:
    async def attack(client: H2Client) -> None:
        for _ in range(20000):
            client.send_raw(WindowUpdateFrame(0, window_increment=1).serialize())
        await client.drain()

    attacker = await _attack(gateway, echo, attack)
    assert attacker.goaway == CALM
    assert attacker.goaway_debug == b"window_update_flood"


async def test_more_streams_than_advertised(gateway: GatewayProcess, echo: Echo) -> None:
    async def attack(client: H2Client) -> None:
        assert client.remote_settings[0x3] == MAX_STREAMS
        encoder = Encoder()
        body_block = [*_block(), (b"content-length", b"10")]
        for n in range(MAX_STREAMS + 4):  # bodies never sent: every stream stays open
            frame = HeadersFrame(2 * n + 1, data=encoder.encode(body_block), flags=["END_HEADERS"])
            client.send_raw(frame.serialize())
        await client.drain()

    attacker = await _attack(gateway, echo, attack)
    assert attacker.goaway == CALM


async def test_oversized_header_list_gets_calm(gateway: GatewayProcess, echo: Echo) -> None:
    async def attack(client: H2Client) -> None:
        client.start([*_block(), *[(f"x-h{i}".encode(), b"v" * 200) for i in range(60)]])
        await client.drain()

    attacker = await _attack(gateway, echo, attack)
    assert attacker.goaway == CALM


async def test_zero_window_reader_is_reset_after_write_timeout(
    test_pki: LabPki, echo: Echo
) -> None:
    doc = gateway_config(test_pki, echo.port)
    doc["upstreams"]["echo"]["timeouts"]["write"] = "1s"
    gw = GatewayProcess(test_pki, doc, "gateway-h2-window")
    await gw.start(timeout=20)
    try:
        client = await _client(gw)
        bystander = await _client(gw)
        try:
            client.conn.update_settings({0x4: 0})  # INITIAL_WINDOW_SIZE 0: never reads a byte
            client.flush()
            stuck = await client.request("GET", "/orders/stuck", timeout=30)
            served = await bystander.request("GET", "/orders/bystander", timeout=20)
        finally:
            await client.close()
            await bystander.close()
        assert stuck.status == 200 and stuck.body == b""
        assert stuck.reset == 0x8  # CANCEL: the response never fit the client's window
        assert served.status == 200 and served.body
    finally:
        gw.kill()
