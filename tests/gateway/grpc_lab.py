"""A real grpc.aio upstream behind the gateway, over mTLS with the test PKI's ``upstream`` SVID:
the standard health service plus an echo service with every streaming kind, built from
generic handlers with bytes serializers (no .proto needed). It records what it saw (metadata,
cancellations) for the tests, and a gateway config that routes gRPC to it over HTTP/2."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from gateway_harness import BUNDLE_A, UPSTREAM_ID, LabPki, gateway_config
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

SERVICE = "echo.Echo"
TRAILER = ("x-echo-trailer", "done")


@dataclass
class EchoService:
    """What the upstream saw: each call's method and invocation metadata, and which calls were
    cancelled by the caller."""

    port: int = 0
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    flooded: int = 0  # messages the Flood call handed to gRPC

    def _seen(self, method: str, context: grpc.aio.ServicerContext) -> None:
        meta = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.calls.append((method, meta))

    async def unary(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._seen("Unary", context)
        context.set_trailing_metadata((TRAILER,))
        return request

    async def client_stream(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        self._seen("ClientStream", context)
        parts = [chunk async for chunk in requests]
        context.set_trailing_metadata((TRAILER,))
        return b"|".join(parts)

    async def server_stream(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._seen("ServerStream", context)
        for n in range(int(request or b"0")):
            yield b"item-%d" % n
        context.set_trailing_metadata((TRAILER,))

    async def bidi(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._seen("Bidi", context)
        async for chunk in requests:
            yield chunk[::-1]

    async def slow(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._seen("Slow", context)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return request

    async def forever(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        self._seen("Forever", context)
        try:
            n = 0
            while True:
                yield b"tick-%d" % n
                n += 1
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def flood(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """64 KiB messages as fast as the caller takes them (``await write`` blocks on flow
        control), counted."""
        self._seen("Flood", context)
        message = b"f" * 65536
        try:
            for _ in range(4096):
                await context.write(message)
                self.flooded += 1
        except (asyncio.CancelledError, Exception):  # ExecuteBatchError once it is gone
            self.cancelled.set()  # the caller went away
            return
        if False:  # an async generator: the messages go out through context.write
            yield b""

    async def pause(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self._seen("Pause", context)
        await asyncio.sleep(float(request or b"0.3"))
        return request


def _identity(data: bytes) -> bytes:
    return data


def _handlers(service: EchoService) -> grpc.GenericRpcHandler:
    kw: dict[str, Any] = {"request_deserializer": _identity, "response_serializer": _identity}
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(service.unary, **kw),
            "ClientStream": grpc.stream_unary_rpc_method_handler(service.client_stream, **kw),
            "ServerStream": grpc.unary_stream_rpc_method_handler(service.server_stream, **kw),
            "Bidi": grpc.stream_stream_rpc_method_handler(service.bidi, **kw),
            "Slow": grpc.unary_unary_rpc_method_handler(service.slow, **kw),
            "Forever": grpc.unary_stream_rpc_method_handler(service.forever, **kw),
            "Flood": grpc.unary_stream_rpc_method_handler(service.flood, **kw),
            "Pause": grpc.unary_unary_rpc_method_handler(service.pause, **kw),
        },
    )


async def start_grpc_upstream(
    pki: LabPki, *, plaintext: bool = False, max_streams: int | None = None
) -> tuple[EchoService, grpc.aio.Server]:
    """The upstream on a free loopback port, requiring a client certificate of example.org
    (``plaintext``: h2c, no TLS); ``max_streams`` is its SETTINGS_MAX_CONCURRENT_STREAMS."""
    options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", 8 * 1024 * 1024)]
    if max_streams is not None:
        options.append(("grpc.max_concurrent_streams", max_streams))
    service = EchoService()
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((_handlers(service),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    if plaintext:
        service.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return service, server
    cert, key = pki.files("upstream")
    credentials = grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=pki.bundle().read_bytes(),
        require_client_auth=True,
    )
    service.port = server.add_secure_port("127.0.0.1:0", credentials)
    await server.start()
    return service, server


def grpc_gateway_config(pki: LabPki, echo_port: int, grpc_port: int) -> dict[str, Any]:
    """The harness gateway config plus the ``grpc`` upstream (HTTP/2, mTLS, pinned ID) and
    routes: the echo service and health for shop workloads, an admin service for ops only."""
    doc = gateway_config(pki, echo_port)
    doc["upstreams"]["grpc"] = {
        "url": f"https://127.0.0.1:{grpc_port}",
        "protocol": "h2",
        "tls": {
            "cert": "gateway.crt",
            "key": "gateway.key",
            "bundle": BUNDLE_A,
            "spiffe_id": UPSTREAM_ID,
        },
        "timeouts": {"connect": "2s", "read": "10s"},
    }
    doc["routes"] += [
        {
            "name": "echo-grpc",
            "match": {"path_prefix": f"/{SERVICE}/", "methods": ["POST"]},
            "upstream": "grpc",
            "allow": ["spiffe://example.org/ns/shop/sa/*"],
        },
        {
            "name": "health",
            "match": {"path_prefix": "/grpc.health.v1.Health/"},
            "upstream": "grpc",
            "allow": ["spiffe://example.org/**"],
        },
        {
            "name": "admin-grpc",
            "match": {"path_prefix": "/admin.Admin/"},
            "upstream": "grpc",
            "allow": ["spiffe://example.org/ops/**"],
        },
    ]
    return doc


def channel(pki: LabPki, port: int, client: str = "web") -> grpc.aio.Channel:
    """A grpc.aio channel to the gateway presenting ``client``'s SVID."""
    return grpc.aio.secure_channel(
        f"127.0.0.1:{port}",
        pki.client_credentials(client),
        options=[
            ("grpc.ssl_target_name_override", "localhost"),
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ],
    )


def method(ch: grpc.aio.Channel, name: str, kind: str = "unary_unary") -> Any:
    factory = getattr(ch, kind)
    return factory(
        f"/{SERVICE}/{name}", request_serializer=_identity, response_deserializer=_identity
    )


def health_stub(ch: grpc.aio.Channel) -> Any:
    return health_pb2_grpc.HealthStub(ch), health_pb2.HealthCheckRequest
