"""`svidgate gateway serve` as a real process: SIGTERM drains, SIGHUP reloads, workers share
the port with SO_REUSEPORT."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable
from typing import Any

from cryptography import x509
from gateway_harness import (
    GATEWAY_ID,
    Echo,
    GatewayProcess,
    LabPki,
    build_request,
    gateway_config,
    raw_exchange,
)
from support.waiting import wait_for


async def test_sigterm_drains_in_flight_requests(
    test_pki: LabPki, echo: Echo, serve: Callable[..., Any]
) -> None:
    gw: GatewayProcess = await serve(gateway_config(test_pki, echo.port))
    echo.hold = asyncio.Event()  # the upstream answers once the test has seen the drain
    ctx = test_pki.client_context(test_pki.dir / "web.crt", test_pki.dir / "web.key")
    in_flight = asyncio.create_task(raw_exchange(gw.port, ctx, build_request("GET", "/orders/1")))
    await wait_for(lambda: bool(echo.seen), 5, "the request to reach the upstream")
    assert echo.seen, "the request reached the upstream before SIGTERM"
    gw.proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: gw.logged("draining"), 5, "the draining log line")
    assert await gw.readyz() in (503, None)  # not ready while draining
    late = await raw_exchange(gw.port, ctx, build_request("GET", "/orders/2"), timeout=3)
    assert late is None  # no longer accepting
    assert not in_flight.done()
    echo.hold.set()
    resp = await in_flight
    assert resp is not None and resp.status == 200
    assert await asyncio.to_thread(gw.proc.wait, 10) == 0
    assert echo.targets == ["/orders/1"]
    events = [e.get("event") for e in gw.events()]
    assert "draining" in events and "stopped" in events


async def test_sighup_reloads_certificate(
    test_pki: LabPki, echo: Echo, serve: Callable[..., Any]
) -> None:
    gw: GatewayProcess = await serve(gateway_config(test_pki, echo.port))
    ctx = test_pki.client_context(test_pki.dir / "web.crt", test_pki.dir / "web.key")

    async def serial() -> int:
        _r, w = await asyncio.open_connection("127.0.0.1", gw.port, ssl=ctx, server_hostname="x")
        der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
        w.close()
        return x509.load_der_x509_certificate(der).serial_number

    before = await serial()
    test_pki.issue(GATEWAY_ID, "gateway", dns=["localhost"], ips=["127.0.0.1"])
    gw.proc.send_signal(signal.SIGHUP)

    async def reloaded() -> bool:
        return await serial() != before

    await wait_for(reloaded, 5, "the new certificate", interval=0.05)
    assert await serial() != before
    resp = await raw_exchange(gw.port, ctx, build_request("GET", "/orders/1"))
    assert resp is not None and resp.status == 200
    gw.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.proc.wait, 10) == 0


async def test_workers_share_the_port(
    test_pki: LabPki, echo: Echo, serve: Callable[..., Any]
) -> None:
    gw: GatewayProcess = await serve(gateway_config(test_pki, echo.port, workers=2))

    def listening() -> set[int]:
        return {e["pid"] for e in gw.events() if e.get("event") == "listening"}

    await wait_for(lambda: len(listening()) == 2, 5, "two workers listening")
    pids = listening()
    assert len(pids) == 2 and gw.proc.pid not in pids
    assert all(os.path.exists(f"/proc/{pid}") for pid in pids)
    ctx = test_pki.client_context(test_pki.dir / "web.crt", test_pki.dir / "web.key")
    results = await asyncio.gather(
        *(raw_exchange(gw.port, ctx, build_request("GET", f"/orders/{i}")) for i in range(20))
    )
    assert [r.status if r else None for r in results] == [200] * 20
    gw.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.proc.wait, 15) == 0
    assert not any(os.path.exists(f"/proc/{pid}") and _alive(pid) for pid in pids)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


async def test_crashed_worker_is_restarted(
    test_pki: LabPki, echo: Echo, serve: Callable[..., Any]
) -> None:
    gw: GatewayProcess = await serve(gateway_config(test_pki, echo.port, workers=2))

    def worker_pids() -> list[int]:
        return [e["pid"] for e in gw.events() if e.get("event") == "listening"]

    await wait_for(lambda: len(worker_pids()) == 2, 5, "two workers listening")
    victim = worker_pids()[-1]
    os.kill(victim, signal.SIGKILL)
    await wait_for(lambda: len(worker_pids()) == 3, 6, "a replacement worker listening")
    pids = worker_pids()
    assert len(pids) == 3 and pids[2] not in pids[:2]
    ctx = test_pki.client_context(test_pki.dir / "web.crt", test_pki.dir / "web.key")
    results = await asyncio.gather(
        *(raw_exchange(gw.port, ctx, build_request("GET", f"/orders/{i}")) for i in range(10))
    )
    assert [r.status if r else None for r in results] == [200] * 10
    gw.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(gw.proc.wait, 15) == 0
