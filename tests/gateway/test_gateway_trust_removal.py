"""Issue 9 item 4, red team: removing trust on reload reaches connections that are already open.

A client holds a keep-alive connection and gets 200; the operator removes its trust domain from
gateway.yaml, or replaces its bundle with another CA, and the gateway reloads (file poll,
SIGHUP to a real `svidgate gateway serve` process, or in-process). That connection gets no
further 200: an idle one is closed at once, one with a request in flight is closed after that
request, and a request that reaches the gateway before the background re-check does gets 403
``trust_revoked`` and a close. A client of a trust domain that stays keeps its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from gateway_harness import (
    B,
    Echo,
    GatewayProcess,
    Harness,
    LabPki,
    Response,
    build_request,
    gateway_config,
    parse_response,
    raw_exchange,
    write_config,
)
from support.logschema import read_events
from support.waiting import wait_for
from svidgate.pki.bundle import BundleSet, marshal_pem
from svidgate.pki.ca import CertificateAuthority

# Generous bounds for a loaded 2-core machine; the gateway acts within one reload poll.
CLOSE_WITHIN = 5.0
# How long a "slow" upstream takes to answer: drain_timeout (300 ms) must cut it off first.
SLOW_UPSTREAM = 1.5


class KeepAlive:
    """One client connection that stays open between requests (HTTP/1.1 keep-alive)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, ctx: ssl.SSLContext) -> KeepAlive:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        return cls(reader, writer)

    async def get(self, target: str, *, timeout: float = 10.0) -> Response | None:
        """One request on this connection; None when the server closed it instead."""
        try:
            self.writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            await self.writer.drain()
            head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await asyncio.wait_for(self.reader.readexactly(length), timeout)
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            return None
        return parse_response(head + body)

    async def closed_by_server(self, timeout: float = CLOSE_WITHIN) -> bool:
        """True when the server closes the (idle) connection within ``timeout``."""
        try:
            data = await asyncio.wait_for(self.reader.read(1), timeout)
        except TimeoutError:
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True
        assert data == b"", f"unexpected bytes on an idle connection: {data!r}"
        return True

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


@pytest.fixture
async def conns() -> AsyncIterator[Callable[..., Any]]:
    opened: list[KeepAlive] = []

    async def open_(port: int, ctx: ssl.SSLContext) -> KeepAlive:
        conn = await KeepAlive.open(port, ctx)
        opened.append(conn)
        return conn

    yield open_
    for conn in opened:
        await conn.close()


def _without_b(pki: LabPki, echo: Echo, **overrides: Any) -> dict[str, Any]:
    doc = gateway_config(pki, echo.port, **overrides)
    del doc["trust_domains"][B]
    return doc


async def _wait_generation(gw: Harness, generation: int) -> None:
    await wait_for(
        lambda: gw.server.holder.current.generation >= generation,
        5,
        f"a reload to generation {generation}",
    )


async def test_removed_trust_domain_closes_its_idle_keep_alive_connection_on_file_poll(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any], conns: Callable[..., Any]
) -> None:
    gw: Harness = await start_gateway(gateway_config(test_pki, echo.port, reload_interval="100ms"))
    removed: KeepAlive = await conns(gw.port, gw.ctx("b-web"))
    stays: KeepAlive = await conns(gw.port, gw.ctx("web"))
    assert (await removed.get("/public/1")).status == 200  # type: ignore[union-attr]
    assert (await stays.get("/orders/1")).status == 200  # type: ignore[union-attr]
    write_config(test_pki, _without_b(test_pki, echo, reload_interval="100ms"))
    await _wait_generation(gw, 2)
    assert await removed.closed_by_server(), "the removed trust domain's connection stays open"
    assert await removed.get("/public/2") is None
    resp = await stays.get("/orders/2")
    assert resp is not None and resp.status == 200, "a trusted client keeps its connection"
    assert echo.targets == ["/public/1", "/orders/1", "/orders/2"]
    registry = gw.server.app.metrics.registry
    assert registry.get_sample_value("svidgate_gateway_connections_rejected_total") == 1


async def test_request_before_the_sweep_gets_403_and_close(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any], conns: Callable[..., Any]
) -> None:
    """The fail-closed path on the request itself: the background re-check has not reached the
    connection (here: it is cancelled before it runs), the request is checked first."""
    gw: Harness = await start_gateway(gateway_config(test_pki, echo.port))
    removed: KeepAlive = await conns(gw.port, gw.ctx("b-web"))
    stays: KeepAlive = await conns(gw.port, gw.ctx("web"))
    assert (await removed.get("/public/1")).status == 200  # type: ignore[union-attr]
    assert (await stays.get("/orders/1")).status == 200  # type: ignore[union-attr]
    write_config(test_pki, _without_b(test_pki, echo))
    assert gw.server.reload()
    sweep = gw.server.app.trust_sweep
    assert sweep is not None
    sweep.cancel()  # before it ever ran: only the per-request check is left
    resp = await removed.get("/public/2")
    assert resp is not None and resp.status == 403
    assert resp.json() == {"error": "forbidden", "route": None, "reason": "trust_revoked"}
    assert (resp.header("Connection") or "").lower() == "close"
    assert await removed.closed_by_server()
    ok = await stays.get("/orders/2")
    assert ok is not None and ok.status == 200
    assert echo.targets == ["/public/1", "/orders/1", "/orders/2"]


async def test_in_flight_request_finishes_then_the_connection_closes(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any], conns: Callable[..., Any]
) -> None:
    gw: Harness = await start_gateway(gateway_config(test_pki, echo.port))
    removed: KeepAlive = await conns(gw.port, gw.ctx("b-web"))
    assert (await removed.get("/public/1")).status == 200  # type: ignore[union-attr]
    echo.hold = asyncio.Event()  # the upstream answers once the re-check has refused the peer
    in_flight = asyncio.create_task(removed.get("/public/2"))
    await wait_for(lambda: len(echo.seen) == 2, 2, "the second request at the upstream")
    assert len(echo.seen) == 2, "the second request reached the upstream"
    write_config(test_pki, _without_b(test_pki, echo))
    assert gw.server.reload()
    sweep = gw.server.app.trust_sweep
    assert sweep is not None
    await sweep  # the re-check has refused the busy connection: now the request may finish
    echo.hold.set()
    resp = await in_flight
    assert resp is not None and resp.status == 200, "an in-flight request may finish"
    assert await removed.closed_by_server(), "…and then the connection is closed"
    assert echo.targets == ["/public/1", "/public/2"]


async def test_in_flight_request_gets_drain_timeout_at_most(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any], conns: Callable[..., Any]
) -> None:
    gw: Harness = await start_gateway(gateway_config(test_pki, echo.port, drain_timeout="300ms"))
    removed: KeepAlive = await conns(gw.port, gw.ctx("b-web"))
    echo.hold = asyncio.Event()  # the upstream does not answer while the test watches
    in_flight = asyncio.create_task(removed.get("/public/slow", timeout=30))
    await wait_for(lambda: bool(echo.seen), 2, "the request at the upstream")
    assert echo.seen, "the request reached the upstream"
    write_config(test_pki, _without_b(test_pki, echo, drain_timeout="300ms"))
    assert gw.server.reload()
    # closed within SLOW_UPSTREAM (an upstream that slow would have answered by then), not at
    # the client's own read timeout
    try:
        done = await asyncio.wait_for(in_flight, SLOW_UPSTREAM)
    except TimeoutError:
        done = "still open"  # type: ignore[assignment]
    finally:
        echo.hold.set()
    assert done is None, "a slow in-flight request outlived drain_timeout"


async def test_reload_that_keeps_trust_closes_nothing(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any], conns: Callable[..., Any]
) -> None:
    gw: Harness = await start_gateway(gateway_config(test_pki, echo.port))
    b: KeepAlive = await conns(gw.port, gw.ctx("b-web"))
    assert (await b.get("/public/1")).status == 200  # type: ignore[union-attr]
    doc = gateway_config(test_pki, echo.port)
    doc["routes"][3]["allow"] = [f"spiffe://{B}/**"]  # policy changes, trust does not
    write_config(test_pki, doc)
    assert gw.server.reload()
    assert gw.server.app.trust_sweep is None
    assert not await b.closed_by_server(0.3)
    resp = await b.get("/public/2")
    assert resp is not None and resp.status == 200


def test_trust_digest_tells_trust_changes_apart() -> None:
    from svidgate.gateway.credentials import trust_digest  # new: keeps the attacks above red

    ca_a, ca_b, ca_b2 = (CertificateAuthority.create(td) for td in ("a.org", "b.org", "b.org"))
    # order does not matter; a removed trust domain or a replaced authority does
    both = BundleSet.from_bundles([ca_a.bundle(), ca_b.bundle()])
    same = BundleSet.from_bundles([ca_b.bundle(), ca_a.bundle()])
    assert trust_digest(both) == trust_digest(same)
    assert trust_digest(both) != trust_digest(BundleSet.from_bundles([ca_a.bundle()]))
    assert trust_digest(both) != trust_digest(
        BundleSet.from_bundles([ca_a.bundle(), ca_b2.bundle()])
    )


# -- the same attack against a real `svidgate gateway serve` process, reloaded with SIGHUP --


@pytest.fixture
async def process(test_pki: LabPki, echo: Echo) -> AsyncIterator[GatewayProcess]:
    gw = GatewayProcess(test_pki, gateway_config(test_pki, echo.port))
    try:
        await gw.start()
        yield gw
    finally:
        gw.kill()


async def test_sighup_with_a_replaced_bundle_closes_the_open_connection(
    test_pki: LabPki,
    echo: Echo,
    process: GatewayProcess,
    conns: Callable[..., Any],
) -> None:
    proc, port, log = process.proc, process.port, process.log
    assert proc is not None
    ctx_b = test_pki.client_context(test_pki.dir / "b-web.crt", test_pki.dir / "b-web.key")
    ctx_a = test_pki.client_context(test_pki.dir / "web.crt", test_pki.dir / "web.key")
    removed: KeepAlive = await conns(port, ctx_b)
    stays: KeepAlive = await conns(port, ctx_a)
    assert (await removed.get("/public/1")).status == 200  # type: ignore[union-attr]
    assert (await stays.get("/orders/1")).status == 200  # type: ignore[union-attr]
    # The operator replaces other.org's bundle with another CA's and sends SIGHUP.
    other_ca = CertificateAuthority.create(B)
    test_pki.bundle(B).write_bytes(marshal_pem(other_ca.bundle()))
    proc.send_signal(signal.SIGHUP)
    assert await removed.closed_by_server(), "the connection outlived its trust"
    assert await removed.get("/public/2") is None
    resp = await stays.get("/orders/2")
    assert resp is not None and resp.status == 200
    # a new connection with the old chain does not get in either
    assert await raw_exchange(port, ctx_b, build_request("GET", "/public/3")) is None
    assert echo.targets == ["/public/1", "/orders/1", "/orders/2"]
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(proc.wait, 10) == 0
    lines = read_events(log, "gateway")
    denials = [x for x in lines if x.get("event") == "connection"]
    assert any(
        d["decision"] == "deny"
        and d["reason"].startswith("trust re-check after reload: ")
        and d["spiffe_id"] == f"spiffe://{B}/ns/shop/sa/web"
        for d in denials
    ), denials
    assert any("re-checked 2 open connections, closed 1" in x.get("message", "") for x in lines)
