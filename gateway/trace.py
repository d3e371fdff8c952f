"""One request's trace context: what the gateway propagates, and its spans when tracing is on.

Propagation happens on every request, tracing on or off (no OpenTelemetry import when off):
a request with one valid ``traceparent`` continues that trace — the upstream receives the
client's trace id (tracing off: the header unchanged; on: with the gateway's ``upstream`` span
as parent) and its ``tracestate``; a request with none, several, or an invalid one gets a new
trace id (not sampled when tracing is off) and no ``tracestate``. The trace id is on the
access line. With ``tracing:`` the spans are ``request`` (server) → ``policy``,
``jwt_verify`` (whose context goes to the signer in the gRPC metadata) and ``upstream``
(client).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict
from svidgate.gateway.http1 import Request

from svidgate.tracecontext import (
    TRACEPARENT,
    TRACESTATE,
    incoming,
    new_header,
)

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from svidgate.tracing import Kind, Tracing

_TRACEPARENT_B = TRACEPARENT.encode()
_TRACESTATE_B = TRACESTATE.encode()


class RequestTrace:
    """The trace context of one request and, with tracing on, its open request span."""

    __slots__ = ("drop_state", "header", "span", "state", "tracing")

    def __init__(
        self,
        tracing: Tracing | None,
        header: str,
        state: str | None,
        span: Span | None,
        *,
        drop_state: bool = False,
    ) -> None:
        self.tracing = tracing
        self.header = header  # the traceparent the upstream gets when no span is its parent
        self.state = state  # the tracestate passed on (only with the caller's valid parent)
        self.span = span
        self.drop_state = drop_state  # the client sent a tracestate that is not passed on

    @classmethod
    def begin(cls, tracing: Tracing | None, request: Request, client: str | None) -> RequestTrace:
        parents: list[str] = []
        states: list[str] = []
        for name, value in request.headers:  # one pass; most requests carry neither
            if name == _TRACEPARENT_B:
                parents.append(value.decode("latin-1"))
            elif name == _TRACESTATE_B:
                states.append(value.decode("latin-1"))
        parent, state = incoming(parents, states) if parents else (None, None)
        drop = bool(states) and state is None
        if tracing is None:  # passed on as it came (normalized), or a new unsampled trace
            header = parent.header() if parent else new_header()
            return cls(None, header, state, None, drop_state=drop)
        span = tracing.start(
            "request",
            parent=parent,
            tracestate=state,
            kind="server",
            attributes={"http.request.method": request.method, "client.address": client or ""},
        )
        return cls(tracing, tracing.traceparent(span), state, span, drop_state=drop)

    @property
    def trace_id(self) -> str:
        return self.header[3:35]

    def child(self, name: str, *, kind: Kind = "internal", **attributes: Any) -> Span | None:
        """A span under the request span (None when tracing is off)."""
        if self.tracing is None:
            return None
        return self.tracing.start(name, parent=self.span, kind=kind, attributes=attributes)

    def end(self, span: Span | None, *, error: str | None = None, **attributes: Any) -> None:
        if span is None or self.tracing is None:
            return
        if attributes:
            span.set_attributes(attributes)
        if error is not None:
            self.tracing.fail(span, error)
        span.end()

    def rpc_metadata(self, span: Span | None) -> tuple[tuple[str, str], ...] | None:
        """gRPC metadata carrying ``span``'s context to the signer (None when tracing is off)."""
        if span is None or self.tracing is None:
            return None
        metadata = ((TRACEPARENT, self.tracing.traceparent(span)),)
        return (*metadata, (TRACESTATE, self.state)) if self.state else metadata

    def propagate(self, headers: CIMultiDict[str], span: Span | None) -> None:
        """Set ``traceparent`` (and ``tracestate``) of the upstream request."""
        if span is not None and self.tracing is not None:
            headers[TRACEPARENT] = self.tracing.traceparent(span)
        else:
            headers[TRACEPARENT] = self.header
        if self.state:
            headers[TRACESTATE] = self.state
        elif self.drop_state:
            headers.popall(TRACESTATE, None)

    def finish(self, status: int, route: str | None, error: str | None) -> None:
        """End the request span with the response's status."""
        if self.span is None or self.tracing is None:
            return
        self.span.set_attribute("http.response.status_code", status)
        if route is not None:
            self.span.set_attribute("http.route", route)
        if status >= 500:  # a 4xx is the client's doing, not a failed span (semconv)
            self.tracing.fail(self.span, error or str(status))
        self.span.end()
