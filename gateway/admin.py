"""The admin listener (plain HTTP, loopback or pod-local): /healthz, /readyz, /metrics; and the
gateway's metrics (every name in one place: :class:`Metrics`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from svidgate.gateway.handshake import REASONS
from svidgate.gateway.workers import ProcessMetrics

from svidgate.admin_http import probe_app

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


# Request methods reported by name; any other token is counted as "other" (the label stays
# bounded whatever clients send).
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# The listener core's counters (gateway.http1.limits.Counters) under the metric that reports
# them: (metric, label value). Handshake failures are counted by reason as they happen.
_LISTENER_COUNTERS = {
    "over_capacity": ("connections_refused", "max_connections"),
    "identity_over_cap": ("connections_refused", "max_connections_per_identity"),
    "head_too_large": ("limit_trips", "max_header_bytes"),
    "body_too_large": ("limit_trips", "max_body_bytes"),
    "header_timeouts": ("limit_trips", "header_timeout"),
    "body_timeouts": ("limit_trips", "body_timeout"),
    "write_timeouts": ("limit_trips", "write_timeout"),
    "idle_closed": ("limit_trips", "idle_timeout"),
    "bad_requests": ("limit_trips", "bad_request"),
}
ListenerView = Callable[[], tuple[int, dict[str, int]] | None]
PUBLISH_INTERVAL = 1.0  # seconds between a worker's publications in multi-process mode


class Metrics:
    """The gateway's Prometheus metrics, in a registry of their own (one per gateway).

    With ``multiprocess_dir`` (``workers`` > 1: :mod:`svidgate.gateway.workers` made the
    directory and switched prometheus_client to its multi-process values) every value lives in
    that directory and :meth:`exposition` sums every worker's; gauges say how to combine
    workers (``multiprocess_mode``). The listener core keeps plain integers: :meth:`publish`
    copies them in (before every scrape, and every second from :meth:`publish_forever`).
    """

    def __init__(self, multiprocess_dir: Path | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess_dir = multiprocess_dir
        self._view: ListenerView = lambda: None
        self._published: dict[str, int] = {}
        # first in the registry: a direct collect() sees the listener's figures of this moment
        self.registry.register(_Publisher(self))
        reg = self.registry
        self.requests = Counter(
            "svidgate_gateway_requests",
            "Requests by route, method and status code.",
            ["route", "method", "code"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "svidgate_gateway_request_duration_seconds",
            "Time from the request head to the end of the response, by route.",
            ["route"],
            registry=reg,
        )
        self.decisions = Counter(
            "svidgate_gateway_decisions",
            "Authorization decisions by outcome and reason.",
            ["decision", "reason"],
            registry=reg,
        )
        self.upstream_latency = Histogram(
            "svidgate_gateway_upstream_seconds",
            "Time to the upstream's response headers.",
            ["upstream"],
            registry=reg,
        )
        self.signer_latency = Histogram(
            "svidgate_gateway_signer_verify_seconds",
            "JWT verification latency (signer call or local).",
            ["mode"],
            registry=reg,
        )
        self.cert_expiry = Gauge(
            "svidgate_gateway_certificate_expiry_timestamp_seconds",
            "notAfter of the gateway's own certificate (Unix seconds).",
            registry=reg,
            multiprocess_mode="livemostrecent",
        )
        self.reloads = Counter(
            "svidgate_gateway_reloads", "Reload attempts by result.", ["result"], registry=reg
        )
        self.connections_rejected = Counter(
            "svidgate_gateway_connections_rejected",
            "TLS connections refused after the handshake by per-trust-domain re-verification.",
            registry=reg,
        )
        self.connections_open = Gauge(
            "svidgate_gateway_connections_open",
            "Open data-plane connections.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.handshake_failures = Counter(
            "svidgate_gateway_handshake_failures",
            "Connections that failed before HTTP: the TLS handshake or the identity check.",
            ["reason"],
            registry=reg,
        )
        self.rate_limited = Counter(
            "svidgate_gateway_rate_limited",
            "Requests refused with 429 by a route's rate limit.",
            ["route"],
            registry=reg,
        )
        self.rate_limit_backend_errors = Counter(
            "svidgate_gateway_rate_limit_backend_errors",
            "Rate-limit checks the shared backend (Redis) failed to answer.",
            registry=reg,
        )
        listener_families = {
            "connections_refused": Counter(
                "svidgate_gateway_connections_refused",
                "Connections refused by a connection limit.",
                ["limit"],
                registry=reg,
            ),
            "limit_trips": Counter(
                "svidgate_gateway_limit_trips",
                "Requests or connections cut by a request limit.",
                ["limit"],
                registry=reg,
            ),
        }
        self._listener_counters = {
            key: listener_families[family].labels(label)
            for key, (family, label) in _LISTENER_COUNTERS.items()
        }
        for reason in REASONS:  # every reason exported from the start, at 0
            self.handshake_failures.labels(reason)
        self.request_count = Children(self.requests)
        self.request_seconds = Children(self.request_duration)
        self.decision_count = Children(self.decisions)
        self.upstream_seconds = Children(self.upstream_latency)
        self.signer_seconds = Children(self.signer_latency)
        self.rate_limited_count = Children(self.rate_limited)
        self.handshake_failure = Children(self.handshake_failures)
        self._process = ProcessMetrics(reg, shared=multiprocess_dir is not None)
        self._scrape = reg
        if multiprocess_dir is not None:
            self._scrape = CollectorRegistry()
            MultiProcessCollector(self._scrape, path=str(multiprocess_dir))  # type: ignore[no-untyped-call]

    def watch_listener(self, view: ListenerView) -> None:
        """Report the data-plane listener through ``view()`` → (open connections, counters)."""
        self._view = view

    def count_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One finished request: by route, method (bounded) and status, and its duration."""
        name = method if method in _METHODS else "other"
        self.request_count(route, name, str(status)).inc()
        self.request_seconds(route).observe(seconds)

    def publish(self) -> None:
        """Copy the listener's integers (and this process's figures) into the metrics."""
        seen = self._view()
        if seen is not None:
            open_now, counters = seen
            self.connections_open.set(open_now)
            for key, child in self._listener_counters.items():
                value = counters.get(key, 0)
                delta = value - self._published.get(key, 0)
                if delta > 0:
                    child.inc(delta)
                    self._published[key] = value
        self._process.publish()

    async def publish_forever(self, interval: float = PUBLISH_INTERVAL) -> None:
        """A worker's figures reach the shared directory at least this often (another worker
        serves the scrape)."""
        while True:
            self.publish()
            await asyncio.sleep(interval)

    def exposition(self) -> bytes:
        """The text format of every metric (of every worker in multi-process mode)."""
        self.publish()
        return generate_latest(self._scrape)


class _Publisher(Collector):
    """Registered first: collecting the registry publishes the listener's figures first."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return ()

    def collect(self) -> Iterable[Metric]:
        self._metrics.publish()
        return ()


def admin_app(metrics: Metrics, ready: Callable[[], tuple[bool, str]]) -> web.Application:
    """``ready()`` returns (ready, reason); /readyz answers 503 with the reason when not."""
    return probe_app(ready, metrics.exposition)
