"""The signer's admin listener (``admin_listen``: plain HTTP) and its metrics.

- ``/healthz``: 200 while the process serves.
- ``/readyz``: 200 when the key ring has an active key that can sign and the key source
  answered its last read; 503 with the reason otherwise (``no_active_key``,
  ``key_source_unavailable``, ``shutting_down``).
- ``/metrics``: ``svidgate_signer_rpc_total{method,code}`` (every RPC, counted by
  :class:`RpcMetrics`, a gRPC server interceptor: the servicers stay as they are),
  ``svidgate_signer_tokens_issued_total``, ``svidgate_signer_key_rotations_total`` (the active
  key changed in this process), ``svidgate_signer_key_source_errors_total`` (failed key-source
  rounds), ``svidgate_signer_active_key_age_seconds`` and the ``process_*`` metrics.

The listener is :class:`svidgate.admin_http.AdminServer` (bounded connections and lifetimes).
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from svidgate.signer.keystore import KeyStore

from svidgate.admin_http import AdminServer, probe_app

_SIGN = "Sign"
WATCH_INTERVAL = 1.0  # seconds between two looks at the active key (rotations)


class SignerMetrics:
    """The signer's Prometheus metrics, in a registry of their own."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpcs = Counter(
            "svidgate_signer_rpc",
            "RPCs by method and gRPC status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.tokens_issued = Counter(
            "svidgate_signer_tokens_issued", "Tokens signed.", registry=self.registry
        )
        self.key_rotations = Counter(
            "svidgate_signer_key_rotations",
            "Times the active signing key changed in this process.",
            registry=self.registry,
        )
        self.registry.register(_KeyStoreCollector(self))
        ProcessCollector(registry=self.registry)
        self._active_kid = ""

    def observe_active_key(self) -> None:
        """Count a change of the signing key (not the first one this process sees)."""
        kid = self.store.signing_kid()
        if kid and kid != self._active_kid:
            if self._active_kid:
                self.key_rotations.inc()
            self._active_kid = kid

    async def watch_active_key(self) -> None:
        while True:
            self.observe_active_key()
            await asyncio.sleep(WATCH_INTERVAL)

    def count_rpc(self, method: str, code: grpc.StatusCode) -> None:
        self.rpcs.labels(method, code.name).inc()
        if method == _SIGN and code == grpc.StatusCode.OK:
            self.tokens_issued.inc()

    def active_key_age(self) -> float | None:
        """Seconds since the key that signs now became active; None when none signs."""
        store = self.store
        if store.ring is None or not store.signing_kid():
            return None
        now = store.clock()
        key = store.ring.active(now)
        return None if key is None else max((now - key.activate_at).total_seconds(), 0.0)


class _KeyStoreCollector(Collector):
    """Figures the key store keeps itself, read at scrape time."""

    def __init__(self, metrics: SignerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        self._metrics.observe_active_key()
        yield CounterMetricFamily(
            "svidgate_signer_key_source_errors",
            "Key-source rounds that failed (read, create or remove).",
            value=self._metrics.store.source_errors,
        )
        age = self._metrics.active_key_age()
        if age is not None:
            yield GaugeMetricFamily(
                "svidgate_signer_active_key_age_seconds",
                "Seconds since the signing key became active.",
                value=age,
            )


Behavior = Callable[[Any, Any], Any]
Handler = Any  # grpc.RpcMethodHandler: its stubs type the sync servicer context only


class RpcMetrics(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Counts every RPC by method (the registered method's name) and final status code."""

    def __init__(self, metrics: SignerMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: grpc answers UNIMPLEMENTED, not counted
            return handler
        method = str(handler_call_details.method).rsplit("/", 1)[-1]
        count = self._metrics.count_rpc
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, method, count),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap(handler.unary_stream, method, count),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap(handler.stream_stream, method, count),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


Count = Callable[[str, grpc.StatusCode], None]


def _final_code(context: grpc.aio.ServicerContext[Any, Any], failed: bool) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    return grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK


def _unary(inner: Behavior, method: str, count: Count) -> Behavior:
    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            response = await inner(request, context)
        except asyncio.CancelledError:
            count(method, grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            count(method, _final_code(context, failed=True))
            raise
        count(method, _final_code(context, failed=False))
        return response

    return behavior


def _wrap(inner: Behavior, method: str, count: Count) -> Behavior:
    """A streaming behavior is an async generator, or a coroutine that writes with
    ``context.write`` (grpc's own health Watch): wrapped as what it is."""
    if inspect.isasyncgenfunction(inner):
        return _streaming(inner, method, count)
    return _unary(inner, method, count)


def _streaming(inner: Behavior, method: str, count: Count) -> Behavior:
    async def behavior(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            async for response in inner(request, context):
                yield response
        except (asyncio.CancelledError, GeneratorExit):
            count(method, grpc.StatusCode.CANCELLED)
            raise
        except BaseException:
            count(method, _final_code(context, failed=True))
            raise
        count(method, _final_code(context, failed=False))

    return behavior


def readiness(store: KeyStore, stopping: Callable[[], bool]) -> tuple[bool, str]:
    """Ready to sign: an active key that can sign, and a key source that answers."""
    if stopping():
        return False, "shutting_down"
    if not store.can_sign:
        return False, "no_active_key"
    if not store.source_healthy:
        return False, "key_source_unavailable"
    return True, "ok"


def admin_server(
    address: str, metrics: SignerMetrics, ready: Callable[[], tuple[bool, str]]
) -> AdminServer:
    return AdminServer(probe_app(ready, lambda: generate_latest(metrics.registry)), address)
