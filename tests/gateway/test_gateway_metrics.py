"""Labelled metric children are bound once per label tuple and still count in the registry."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest

from gateway.admin import Metrics


def test_children_are_bound_once_and_exported() -> None:
    metrics = Metrics()
    child = metrics.request_count("orders", "200")
    assert metrics.request_count("orders", "200") is child
    assert metrics.request_count("orders", "404") is not child
    for _ in range(3):
        metrics.request_count("orders", "200").inc()
    metrics.decision_count("deny", "no_route").inc()
    metrics.upstream_seconds("echo").observe(0.01)
    metrics.signer_seconds("local").observe(0.001)
    text = generate_latest(metrics.registry).decode()
    assert 'svidgate_gateway_requests_total{code="200",route="orders"} 3.0' in text
    assert 'svidgate_gateway_decisions_total{decision="deny",reason="no_route"} 1.0' in text
    assert 'svidgate_gateway_upstream_seconds_count{upstream="echo"} 1.0' in text
    assert 'svidgate_gateway_signer_verify_seconds_count{mode="local"} 1.0' in text
