"""Spans over OTLP with the OpenTelemetry SDK, for ``tracing:`` in gateway.yaml and
signer.yaml (extra ``svidgate[otel]``). The only module that imports ``opentelemetry``, and
only when :class:`Tracing` is built: with tracing off nothing of it is loaded.

Contexts are passed explicitly (a parent :class:`~svidgate.tracecontext.TraceParent` from the
wire, or a parent span), never through OpenTelemetry's ambient context, so concurrent
requests on one event loop never see each other's spans. Sampling is parent-based: a caller's
sampled flag is followed; a new trace is sampled with ``sample_ratio``. Spans are batched by
the SDK's BatchSpanProcessor (its own thread) and flushed by :meth:`Tracing.shutdown`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from svidgate.config import ConfigError
from svidgate.tracecontext import TraceParent

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from svidgate.config import TracingConfig

Kind = Literal["server", "client", "internal"]
EXPORT_DELAY_MS = 1000  # the batch processor's schedule delay


class TracingUnavailable(ConfigError):
    """``tracing:`` is configured but the ``svidgate[otel]`` extra is not installed (a config
    error: the CLI prints its one line and exits)."""


class Tracing:
    """One service's tracer provider and exporter."""

    def __init__(self, cfg: TracingConfig, service: str) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        except ImportError as exc:
            raise TracingUnavailable(
                f"tracing: needs the svidgate[otel] extra (pip install 'svidgate[otel]'): {exc}"
            ) from None
        self._trace = trace
        endpoint = cfg.otlp_endpoint
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": f"svidgate-{service}"}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter, schedule_delay_millis=EXPORT_DELAY_MS)
        )
        self.tracer = self.provider.get_tracer("svidgate")
        kinds = trace.SpanKind
        self._kinds = {"server": kinds.SERVER, "client": kinds.CLIENT, "internal": kinds.INTERNAL}

    def start(
        self,
        name: str,
        *,
        parent: Span | TraceParent | None,
        tracestate: str | None = None,
        kind: Kind = "internal",
        attributes: Mapping[str, Any] | None = None,
    ) -> Span:
        """Start a span under ``parent`` (a span of ours, the caller's traceparent, or None
        for a new trace); the caller ends it."""
        return self.tracer.start_span(
            name,
            context=self._context(parent, tracestate),
            kind=self._kinds[kind],
            attributes=dict(attributes or {}),
        )

    def traceparent(self, span: Span) -> str:
        """The ``traceparent`` header naming ``span`` as the parent of the next hop."""
        ctx = span.get_span_context()
        return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"

    def fail(self, span: Span, reason: str) -> None:
        """Mark ``span`` as failed with a short reason (never a token or key)."""
        from opentelemetry.trace import Status, StatusCode

        span.set_status(Status(StatusCode.ERROR, reason))

    def shutdown(self) -> None:
        """Export what is pending and stop the exporter thread."""
        self.provider.shutdown()

    def _context(self, parent: Span | TraceParent | None, tracestate: str | None) -> Any:
        trace = self._trace
        if parent is None:
            return None
        if not isinstance(parent, TraceParent):
            return trace.set_span_in_context(parent)
        remote = trace.SpanContext(
            trace_id=int(parent.trace_id, 16),
            span_id=int(parent.parent_id, 16),
            is_remote=True,
            trace_flags=trace.TraceFlags(parent.flags),
            trace_state=trace.TraceState.from_header([tracestate]) if tracestate else None,
        )
        return trace.set_span_in_context(trace.NonRecordingSpan(remote))
