"""The admin listener (plain HTTP, loopback or pod-local): /healthz, /readyz, /metrics."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest


class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own (one per gateway)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "svidgate_gateway_requests",
            "Requests by route and status code.",
            ["route", "code"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "svidgate_gateway_decisions",
            "Authorization decisions by outcome and reason.",
            ["decision", "reason"],
            registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "svidgate_gateway_upstream_seconds",
            "Time to the upstream's response headers.",
            ["upstream"],
            registry=self.registry,
        )
        self.signer_latency = Histogram(
            "svidgate_gateway_signer_verify_seconds",
            "JWT verification latency (signer call or local).",
            ["mode"],
            registry=self.registry,
        )
        self.cert_expiry = Gauge(
            "svidgate_gateway_certificate_expiry_timestamp_seconds",
            "notAfter of the gateway's own certificate (Unix seconds).",
            registry=self.registry,
        )
        self.reloads = Counter(
            "svidgate_gateway_reloads",
            "Reload attempts by result.",
            ["result"],
            registry=self.registry,
        )
        self.connections_rejected = Counter(
            "svidgate_gateway_connections_rejected",
            "TLS connections refused after the handshake by per-trust-domain re-verification.",
            registry=self.registry,
        )


def admin_app(metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> web.Application:
    """``ready()`` returns (ready, reason); /readyz answers 503 with the reason when not."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ok, reason = ready()
        return web.json_response(
            {"status": "ready" if ok else "not_ready", "reason": reason},
            status=200 if ok else 503,
        )

    async def metrics_handler(_: web.Request) -> web.Response:
        body = generate_latest(metrics.registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    return app
