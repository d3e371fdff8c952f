"""The gateway's error tree and the one table that maps each error to an HTTP response.

Errors are raised where the fault is found; :func:`response_spec` is the only place that turns
them into a status, a short JSON body (``{"error": ..., "route": ...}``) and extra headers.
``str(err)`` is safe to show or log: it never holds a token or key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


class GatewayError(Exception):
    """Base of every gateway error. ``str(err)`` is safe to show: it never holds a token or key."""

    status: int = 500
    reason: str = "internal"
    headers: tuple[tuple[str, str], ...] = ()  # per-error headers, after the table's own


class CredentialsError(GatewayError):
    """Certificates, keys or bundles cannot be loaded or do not fit together."""

    status = 500
    reason = "credentials"


class RequestError(GatewayError):
    """A request-level failure with a reason code (used in the body and the audit log)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class BadRequest(RequestError):
    """The request is ambiguous or malformed (path, Host, target form)."""


class NoRoute(RequestError):
    """No route's path prefix matches the canonical path."""


class Forbidden(RequestError):
    """Policy denied the caller (identity, method or token binding)."""


class TokenRejected(GatewayError):
    """The JWT is missing, malformed or failed verification (``reason`` is the signer's code)."""

    status = 401

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class SignerUnavailable(GatewayError):
    """The signer could not answer within the deadline: fail closed with 503 + Retry-After."""

    status = 503
    reason = "signer_unavailable"


class IssuerUnavailable(SignerUnavailable):
    """Another JWT issuer's keys are not known (yet): fail closed with 503 + Retry-After."""

    reason = "issuer_unavailable"


class UpstreamError(RequestError):
    """The upstream failed: unreachable, bad TLS identity, or an unsafe response."""


class UpstreamTimeout(RequestError):
    """The upstream did not answer within the read timeout."""


class UpstreamBusy(RequestError):
    """Every connection of the upstream's pool stayed in use for the queue timeout."""


class CircuitOpen(RequestError):
    """The upstream's circuit breaker is open: fail fast."""


class RateLimited(GatewayError):
    """The caller's (or the route's) token bucket is empty: 429 with ``Retry-After`` and the
    ``RateLimit-*`` headers of draft-ietf-httpapi-ratelimit-headers."""

    status = 429
    reason = "rate_limited"

    def __init__(self, *, limit: int, remaining: int, reset: int, retry_after: int) -> None:
        super().__init__(f"rate limited: retry after {retry_after}s")
        self.headers = (
            ("Retry-After", str(retry_after)),
            ("RateLimit-Limit", str(limit)),
            ("RateLimit-Remaining", str(remaining)),
            ("RateLimit-Reset", str(reset)),
        )


class RateLimitUnavailable(GatewayError):
    """The shared rate-limit store failed and ``on_backend_error: deny`` says fail closed."""

    status = 503
    reason = "rate_limit_unavailable"


@dataclass(frozen=True, slots=True)
class ResponseSpec:
    status: int
    error: str
    headers: tuple[tuple[str, str], ...] = ()


# The one table: error class -> (status, body "error" value, extra headers). Looked up by MRO.
_TABLE: dict[type[GatewayError], ResponseSpec] = {
    BadRequest: ResponseSpec(400, "bad_request"),
    TokenRejected: ResponseSpec(
        401, "unauthorized", (("WWW-Authenticate", 'Bearer error="invalid_token"'),)
    ),
    Forbidden: ResponseSpec(403, "forbidden"),
    NoRoute: ResponseSpec(404, "no_route"),
    UpstreamError: ResponseSpec(502, "bad_gateway"),
    SignerUnavailable: ResponseSpec(503, "signer_unavailable", (("Retry-After", "1"),)),
    IssuerUnavailable: ResponseSpec(503, "issuer_unavailable", (("Retry-After", "1"),)),
    CircuitOpen: ResponseSpec(503, "upstream_unavailable", (("Retry-After", "1"),)),
    UpstreamBusy: ResponseSpec(503, "upstream_busy", (("Retry-After", "1"),)),
    RateLimited: ResponseSpec(429, "rate_limited"),
    RateLimitUnavailable: ResponseSpec(503, "rate_limit_unavailable", (("Retry-After", "1"),)),
    UpstreamTimeout: ResponseSpec(504, "gateway_timeout"),
    GatewayError: ResponseSpec(500, "internal"),
}


def response_spec(err: GatewayError) -> ResponseSpec:
    """The HTTP response for ``err`` (500 for anything not listed), with the error's own
    headers (``Retry-After`` of a rate limit) after the table's."""
    spec = _TABLE[GatewayError]
    for cls in type(err).__mro__:
        found = _TABLE.get(cls)
        if found is not None:
            spec = found
            break
    if err.headers:
        return ResponseSpec(spec.status, spec.error, spec.headers + err.headers)
    return spec


# gRPC: a request with ``content-type: application/grpc…`` that the gateway answers itself gets
# a trailers-only response (HTTP 200) whose ``grpc-status`` follows gRPC's HTTP-to-gRPC mapping
# (doc/http-grpc-status-mapping.md) and whose ``grpc-message`` starts with the reason code.
GRPC_UNKNOWN = 2
_GRPC_STATUS: dict[int, int] = {
    400: 13,  # INTERNAL
    401: 16,  # UNAUTHENTICATED
    403: 7,  # PERMISSION_DENIED
    404: 12,  # UNIMPLEMENTED
    429: 14,  # UNAVAILABLE
    502: 14,
    503: 14,
    504: 14,
}
_GRPC_MESSAGE_SAFE = frozenset(range(0x20, 0x7F)) - {ord("%")}


def grpc_status(http_status: int) -> int:
    """The gRPC status code for one of the gateway's own HTTP answers (2 UNKNOWN otherwise)."""
    return _GRPC_STATUS.get(http_status, GRPC_UNKNOWN)


def is_grpc(content_type: bytes | None) -> bool:
    """Whether a request's Content-Type says gRPC (``application/grpc``, ``…+proto`` …)."""
    if content_type is None:
        return False
    value = content_type.lower()
    return value == b"application/grpc" or value.startswith(
        (b"application/grpc+", b"application/grpc;")
    )


def grpc_error_headers(
    http_status: int, reason: str, detail: str = ""
) -> list[tuple[bytes, bytes]]:
    """The headers of a trailers-only gRPC answer for an HTTP error: ``grpc-status`` from the
    mapping, ``grpc-message`` = the reason code (``: detail``), percent-encoded as gRPC wants."""
    message = f"{reason}: {detail}" if detail else reason
    encoded = "".join(
        chr(b) if b in _GRPC_MESSAGE_SAFE else f"%{b:02X}" for b in message.encode("utf-8")
    )
    return [
        (b"content-type", b"application/grpc"),
        (b"grpc-status", str(grpc_status(http_status)).encode("ascii")),
        (b"grpc-message", encoded.encode("ascii")),
    ]


def grpc_answer_headers(
    http_status: int,
    body: Mapping[str, Any] | bytes,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """A trailers-only gRPC answer for one of the gateway's own JSON answers (``body``: the
    ``{"error", "reason", "route"}`` document, or its JSON bytes); extra headers (Retry-After,
    WWW-Authenticate) follow, lower-cased."""
    doc = body if not isinstance(body, bytes) else _json_doc(body)
    reason = str(doc.get("reason") or doc.get("error") or "error")
    detail = str(doc.get("error") or "")
    if doc.get("route"):
        detail = f"{detail} (route {doc['route']})"
    extra = [(n.lower(), v) for n, v in headers if n.lower() != b"content-type"]
    return [*grpc_error_headers(http_status, reason, detail), *extra]


def _json_doc(body: bytes) -> Mapping[str, Any]:
    try:
        doc = json.loads(body) if body else {}
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
