"""Labelled metric children are bound once per label tuple and still count in the registry;
the gateway's own responses (errors, admin) carry no aiohttp version banner."""

from __future__ import annotations

import aiohttp
from gateway_harness import Echo, Harness
from prometheus_client.exposition import generate_latest
from svidgate.gateway.admin import Metrics


def test_children_are_bound_once_and_exported() -> None:
    metrics = Metrics()
    child = metrics.request_count("orders", "GET", "200")
    assert metrics.request_count("orders", "GET", "200") is child
    assert metrics.request_count("orders", "GET", "404") is not child
    for _ in range(3):
        metrics.count_request("orders", "GET", 200, 0.01)
    metrics.count_request("orders", "BREW", 200, 0.01)  # any other token: "other"
    metrics.decision_count("deny", "no_route").inc()
    metrics.upstream_seconds("echo").observe(0.01)
    metrics.signer_seconds("local").observe(0.001)
    text = generate_latest(metrics.registry).decode()
    assert 'svidgate_gateway_requests_total{code="200",method="GET",route="orders"} 3.0' in text
    assert 'svidgate_gateway_requests_total{code="200",method="other",route="orders"} 1.0' in text
    assert 'svidgate_gateway_request_duration_seconds_count{route="orders"} 4.0' in text
    assert "process_resident_memory_bytes " in text
    assert 'svidgate_gateway_decisions_total{decision="deny",reason="no_route"} 1.0' in text
    assert 'svidgate_gateway_upstream_seconds_count{upstream="echo"} 1.0' in text
    assert 'svidgate_gateway_signer_verify_seconds_count{mode="local"} 1.0' in text


async def test_own_responses_carry_no_software_banner(gw: Harness, echo: Echo) -> None:
    denied = await gw.request("GET", "/admin/1")
    assert denied is not None and denied.status == 403
    assert [v for k, v in denied.headers if k.lower() == "server"] == ["svidgate"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{gw.server.admin_port}/healthz") as resp,
    ):
        assert resp.status == 200
        assert resp.headers.getall("Server") == ["svidgate"]
