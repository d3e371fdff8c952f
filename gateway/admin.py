"""The admin listener (plain HTTP, loopback or pod-local): /healthz, /readyz, /metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

M = TypeVar("M", bound=MetricWrapperBase)


class Children(Generic[M]):
    """The labelled children of one metric, bound once per label tuple: ``labels()`` validates
    and locks on every call, a dict lookup does not (label values are bounded by the config)."""

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


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
        self.request_count = Children(self.requests)
        self.decision_count = Children(self.decisions)
        self.upstream_seconds = Children(self.upstream_latency)
        self.signer_seconds = Children(self.signer_latency)
        self.connections_rejected = Counter(
            "svidgate_gateway_connections_rejected",
            "TLS connections refused after the handshake by per-trust-domain re-verification.",
            registry=self.registry,
        )
        self._listener = ListenerCollector(lambda: None)
        self.registry.register(self._listener)

    def watch_listener(self, view: ListenerView) -> None:
        """Report the data-plane listener through ``view()`` → (open connections, counters)."""
        self._listener.view = view


ListenerView = Callable[[], tuple[int, dict[str, int]] | None]
# The core's counters (gateway.http1.limits.Counters) under the metric that reports them.
_HANDSHAKE_FAILURES = {"handshake_failed": "handshake", "identity_refused": "identity"}
_REFUSED = {"over_capacity": "max_connections", "identity_over_cap": "max_connections_per_identity"}
_LIMITS = {
    "head_too_large": "max_header_bytes",
    "body_too_large": "max_body_bytes",
    "header_timeouts": "header_timeout",
    "body_timeouts": "body_timeout",
    "write_timeouts": "write_timeout",
    "idle_closed": "idle_timeout",
    "bad_requests": "bad_request",
}


class ListenerCollector(Collector):
    """The data-plane listener's figures, read at scrape time (the core keeps plain integers):
    open connections, failed handshakes by reason, connections refused by a limit, and how
    often each request limit tripped."""

    def __init__(self, view: ListenerView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        seen = self.view()
        if seen is None:
            return
        open_now, counters = seen
        yield GaugeMetricFamily(
            "svidgate_gateway_connections_open", "Open data-plane connections.", value=open_now
        )
        for name, doc, label, table in (
            ("handshake_failures", "Failed TLS handshakes and refused identities.", "reason",
             _HANDSHAKE_FAILURES),
            ("connections_refused", "Connections refused by a connection limit.", "limit",
             _REFUSED),
            ("limit_trips", "Requests or connections cut by a request limit.", "limit", _LIMITS),
        ):  # fmt: skip
            family = CounterMetricFamily(f"svidgate_gateway_{name}", doc, labels=[label])
            for key, value in table.items():
                family.add_metric([value], counters.get(key, 0))
            yield family


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

    async def server_header(_: web.Request, resp: web.StreamResponse) -> None:
        resp.headers["Server"] = "svidgate"  # not aiohttp's version banner

    app = web.Application()
    app.on_response_prepare.append(server_header)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    return app
