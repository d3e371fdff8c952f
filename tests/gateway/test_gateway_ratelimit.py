"""Rate limits through the real pipeline (mTLS on loopback, the echo upstream): a burst then 429
with ``Retry-After`` and ``RateLimit-*``; one bucket per identity or per route; a caller that
policy denies consumes nothing; the Redis backend against a real ``redis-server``, its outage
under each ``on_backend_error`` mode, and its recovery."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from gateway_harness import Echo, Harness, LabPki, gateway_config
from prometheus_client.exposition import generate_latest
from support.redis import RedisServer
from support.waiting import wait_for
from svidgate.gateway.ratelimit import BACKEND_RETRY_SECONDS

# 1 token per 100 s: within a test nothing refills, so counts are exact
SLOW = {"requests_per_second": 0.01, "burst": 3}


def _limited(pki: LabPki, port: int, limit: dict[str, Any], **top: Any) -> dict[str, Any]:
    doc = gateway_config(pki, port, **top)
    for route in doc["routes"]:
        if route["name"] in ("public", "admin"):
            route["rate_limit"] = limit
    return doc


async def _statuses(gw: Harness, n: int, client: str = "web", path: str = "/public/x") -> list[int]:
    out = []
    for _ in range(n):
        resp = await gw.request("GET", path, client=client)
        assert resp is not None
        out.append(resp.status)
    return out


def _counted(gw: Harness, route: str) -> float:
    value = gw.server.metrics.registry.get_sample_value(
        "svidgate_gateway_rate_limited_total", {"route": route}
    )
    return value or 0.0


async def test_burst_then_429_with_headers(
    test_pki: LabPki, echo: Echo, start_gateway: Any
) -> None:
    gw: Harness = await start_gateway(_limited(test_pki, echo.port, SLOW))
    assert await _statuses(gw, 3) == [200, 200, 200]
    resp = await gw.request("GET", "/public/x")
    assert resp is not None and resp.status == 429
    assert resp.json()["error"] == "rate_limited"
    retry = int(resp.header("Retry-After") or "0")
    assert 1 <= retry <= 100
    assert resp.header("RateLimit-Limit") == "3"
    assert resp.header("RateLimit-Remaining") == "0"
    assert 1 <= int(resp.header("RateLimit-Reset") or "0") <= 300
    assert len(echo.seen) == 3  # the refused request never reached the upstream
    assert _counted(gw, "public") == 1
    assert (
        "svidgate_gateway_rate_limited_total"
        in generate_latest(gw.server.metrics.registry).decode()
    )


async def test_each_identity_has_its_own_bucket(
    test_pki: LabPki, echo: Echo, start_gateway: Any
) -> None:
    gw: Harness = await start_gateway(_limited(test_pki, echo.port, SLOW))
    assert await _statuses(gw, 4, "web") == [200, 200, 200, 429]
    assert await _statuses(gw, 4, "writer") == [200, 200, 200, 429]
    assert await _statuses(gw, 1, "b-web") == [200]  # another trust domain, another bucket


async def test_key_route_is_one_bucket_for_every_caller(
    test_pki: LabPki, echo: Echo, start_gateway: Any
) -> None:
    gw: Harness = await start_gateway(_limited(test_pki, echo.port, {**SLOW, "key": "route"}))
    assert await _statuses(gw, 2, "web") == [200, 200]
    assert await _statuses(gw, 2, "writer") == [200, 429]
    assert await _statuses(gw, 1, "b-web") == [429]
    # another route keeps its own bucket
    assert await _statuses(gw, 1, "web", "/orders/1") == [200]


async def test_a_caller_denied_by_policy_consumes_nothing(
    test_pki: LabPki, echo: Echo, start_gateway: Any
) -> None:
    gw: Harness = await start_gateway(_limited(test_pki, echo.port, {**SLOW, "key": "route"}))
    # web may not use /admin: 403 every time, and the route's bucket stays full
    assert await _statuses(gw, 5, "web", "/admin/x") == [403] * 5
    assert await _statuses(gw, 4, "ops", "/admin/x") == [200, 200, 200, 429]


def _redis_top(redis: RedisServer, mode: str) -> dict[str, Any]:
    return {
        "rate_limits": {
            "backend": "redis",
            "redis": {"url": redis.url, "timeout": "500ms"},
            "on_backend_error": mode,
        }
    }


async def test_redis_backend_burst_then_429_and_bucket_ttl(
    test_pki: LabPki, echo: Echo, start_gateway: Any, redis_server: RedisServer
) -> None:
    doc = _limited(test_pki, echo.port, SLOW, **_redis_top(redis_server, "deny"))
    gw: Harness = await start_gateway(doc)
    assert await _statuses(gw, 4) == [200, 200, 200, 429]
    (key,) = redis_server.command("KEYS", "svidgate:ratelimit:*").split(b"\r\n")[2:3]
    ttl = int(redis_server.command("TTL", key.decode()).strip(b":\r\n"))
    assert 1 <= ttl <= 301  # refill time of 3 tokens at 0.01/s, plus one second
    # the buckets live in Redis: a second gateway on the same Redis shares them
    other: Harness = await start_gateway(doc)
    resp = await other.request("GET", "/public/x")
    assert resp is not None and resp.status == 429
    # a Redis that lost the script (restart, SCRIPT FLUSH) gets it again (EVALSHA → EVAL)
    assert redis_server.command("SCRIPT", "FLUSH").startswith(b"+OK")
    assert await _statuses(gw, 1, "writer") == [200]


async def _until_backend_answers(gw: Harness, redis: RedisServer) -> None:
    """The limiter tries Redis again BACKEND_RETRY_SECONDS after a failure."""

    async def shared() -> bool:
        await gw.request("GET", "/orders/1")  # a route without limits: nothing consumed
        resp = await gw.request("GET", "/public/x", client="ops")
        return resp is not None and resp.status == 200 and not gw.server.app.limiter.outage

    await wait_for(shared, 10 + BACKEND_RETRY_SECONDS, "the limiter to use Redis again")


@pytest.mark.parametrize("mode", ["local", "deny", "allow"])
async def test_redis_outage_follows_on_backend_error_and_recovers(
    test_pki: LabPki,
    echo: Echo,
    start_gateway: Any,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    mode: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="svidgate.gateway")
    doc = _limited(test_pki, echo.port, SLOW, **_redis_top(redis_server, mode))
    gw: Harness = await start_gateway(doc)
    assert await _statuses(gw, 1) == [200]  # Redis holds web's bucket: 2 left
    redis_server.stop()
    seen = await _statuses(gw, 5)
    if mode == "local":
        assert seen == [200, 200, 200, 429, 429]  # a fresh per-worker bucket of 3
    elif mode == "deny":
        assert seen == [503] * 5
        resp = await gw.request("GET", "/public/x")
        assert resp is not None and resp.json()["error"] == "rate_limit_unavailable"
        assert resp.header("Retry-After") == "1"
    else:
        assert seen == [200] * 5
    outage_lines = [r for r in caplog.records if "rate-limit backend unavailable" in r.getMessage()]
    assert len(outage_lines) == 1  # once per outage, not per request
    errors = gw.server.metrics.registry.get_sample_value(
        "svidgate_gateway_rate_limit_backend_errors_total"
    )
    assert errors is not None and errors >= 1
    redis_server.start()  # empty: every bucket starts full again
    await _until_backend_answers(gw, redis_server)
    assert await _statuses(gw, 4) == [200, 200, 200, 429]
    assert any("answers again" in r.getMessage() for r in caplog.records)
