"""Spans of the signer's unary RPCs when ``tracing:`` is configured: a gRPC server
interceptor that continues the caller's trace from the ``traceparent`` / ``tracestate``
metadata (the gateway sends its ``jwt_verify`` span's context) and records one server span per
RPC, named ``svidgate.signer.v1.Signer/Verify`` and so on. Streams are not traced."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from svidgate.tracecontext import TRACEPARENT, TRACESTATE, incoming

if TYPE_CHECKING:
    from svidgate.tracing import Tracing

    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]  # generic in the stubs only
else:
    _Interceptor = grpc.aio.ServerInterceptor

Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]


class RpcSpans(_Interceptor):
    """Wraps every unary-unary handler in a server span."""

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        name = handler_call_details.method.lstrip("/")
        metadata = handler_call_details.invocation_metadata or ()
        parents = [str(v) for k, v in metadata if k == TRACEPARENT]
        states = [str(v) for k, v in metadata if k == TRACESTATE]
        behavior: Behavior = handler.unary_unary  # type: ignore[assignment]  # async servicers
        traced = self._traced(behavior, name, parents, states)
        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _traced(
        self, behavior: Behavior, name: str, parents: list[str], states: list[str]
    ) -> Behavior:
        tracing = self.tracing
        service, _, method = name.rpartition("/")

        async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            parent, state = incoming(parents, states)
            span = tracing.start(
                name,
                parent=parent,
                tracestate=state,
                kind="server",
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
            )
            try:
                return await behavior(request, context)
            except BaseException as exc:
                tracing.fail(span, type(exc).__name__)
                raise
            finally:
                span.end()

        return traced
