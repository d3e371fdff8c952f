"""Real ``svidgate gateway serve`` processes: with ``workers: 2`` /metrics sums every worker
(prometheus_client multi-process mode); two gateways sharing one real Redis together admit no
more than the shared limit allows."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
from gateway_harness import (
    Echo,
    GatewayProcess,
    LabPki,
    build_request,
    gateway_config,
    raw_exchange,
)
from support.redis import RedisServer
from support.waiting import wait_for


async def _metrics(gw: GatewayProcess) -> str:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gw.admin}/metrics") as resp,
    ):
        assert resp.status == 200
        return await resp.text()


def _sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample (labels in any order); 0 when absent."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if line.startswith(name + "{") and found != labels:
            continue
        return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _get(gw: GatewayProcess, path: str, client: str = "web") -> int:
    """GET over a new mTLS connection (the kernel spreads new connections over the workers)."""
    ctx = gw.pki.client_context(*gw.pki.files(client))
    resp = await raw_exchange(gw.port, ctx, build_request("GET", path), timeout=20)
    assert resp is not None
    return resp.status


def _workers(gw: GatewayProcess) -> list[int]:
    children = Path(f"/proc/{gw.pid}/task/{gw.pid}/children").read_text().split()
    return [int(pid) for pid in children]


async def test_two_workers_metrics_sum_every_worker(
    test_pki: LabPki, echo: Echo, serve: Any
) -> None:
    gw: GatewayProcess = await serve(gateway_config(test_pki, echo.port, workers=2))
    assert len(_workers(gw)) == 2
    n = 40
    statuses = await asyncio.gather(*(_get(gw, f"/orders/{i}") for i in range(n)))
    assert statuses == [200] * n
    # A worker that did not serve the scrape publishes its listener figures within a second;
    # request counts are written as they happen. 40 new connections land on both workers
    # (SO_REUSEPORT); worker 0's own count alone would be about half.
    text = await _metrics(gw)
    assert _sample(
        text, "svidgate_gateway_requests_total", route="orders-read", method="GET", code="200"
    ) == float(n)
    assert _sample(
        text, "svidgate_gateway_request_duration_seconds_count", route="orders-read"
    ) == float(n)
    pids = set(re.findall(r'process_resident_memory_bytes\{pid="(\d+)"\}', text))
    assert pids == {str(p) for p in _workers(gw)}  # one series per live worker

    # A worker that dies is restarted; what it counted still counts, its live gauges go.
    victim = _workers(gw)[1]
    os.kill(victim, signal.SIGKILL)

    async def replaced() -> bool:
        workers = _workers(gw)
        return len(workers) == 2 and victim not in workers and await gw.readyz() == 200

    await wait_for(replaced, 20, "the supervisor to restart the killed worker")
    statuses = await asyncio.gather(*(_get(gw, "/public/x") for _ in range(10)))
    assert statuses == [200] * 10
    text = await _metrics(gw)
    assert _sample(
        text, "svidgate_gateway_requests_total", route="orders-read", method="GET", code="200"
    ) == float(n)
    assert _sample(
        text, "svidgate_gateway_requests_total", route="public", method="GET", code="200"
    ) == float(10)
    pids = set(re.findall(r'process_resident_memory_bytes\{pid="(\d+)"\}', text))
    assert str(victim) not in pids


async def test_two_workers_count_handshake_failures_by_reason(
    test_pki: LabPki, echo: Echo, serve: Any
) -> None:
    gw: GatewayProcess = await serve(gateway_config(test_pki, echo.port, workers=2))
    ctx = test_pki.client_context(None, None)
    for _ in range(6):
        assert await raw_exchange(gw.port, ctx, build_request("GET", "/public/x")) is None

    async def counted() -> bool:
        text = await _metrics(gw)
        reason = "no_client_certificate"
        return _sample(text, "svidgate_gateway_handshake_failures_total", reason=reason) == 6

    await wait_for(counted, 10, "6 handshake failures (no client certificate) in /metrics")


async def test_two_gateways_on_one_redis_hold_the_shared_limit(
    test_pki: LabPki, echo: Echo, serve: Any, redis_server: RedisServer
) -> None:
    rate, burst = 5.0, 5
    top: dict[str, Any] = {
        "rate_limits": {
            "backend": "redis",
            "redis": {"url": redis_server.url, "timeout": "1s"},
            "on_backend_error": "deny",
        }
    }
    doc = gateway_config(test_pki, echo.port, **top)
    for route in doc["routes"]:
        if route["name"] == "public":
            route["rate_limit"] = {"requests_per_second": rate, "burst": burst, "key": "identity"}
    gateways: list[GatewayProcess] = [await serve(doc), await serve(doc)]
    admitted = refused = 0
    started = time.monotonic()
    stop_at = started + 3.0

    async def client(index: int) -> None:
        nonlocal admitted, refused
        gw = gateways[index % 2]
        while time.monotonic() < stop_at:
            status = await _get(gw, "/public/x")
            assert status in (200, 429), status
            admitted += status == 200
            refused += status == 429

    await asyncio.gather(*(client(i) for i in range(6)))
    elapsed = time.monotonic() - started
    # Shared buckets: both gateways together get the rate over the run plus the burst (one
    # more burst of slack for the edges); two private buckets would give about twice that.
    assert admitted <= rate * elapsed + 2 * burst, (admitted, refused, elapsed)
    assert admitted >= burst, (admitted, refused, elapsed)
    assert refused > 0
    totals = [
        _sample(await _metrics(gw), "svidgate_gateway_rate_limited_total", route="public")
        for gw in gateways
    ]
    assert sum(totals) == refused
