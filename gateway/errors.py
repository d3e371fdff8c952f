"""The gateway's error tree and the one table that maps each error to an HTTP response.

Errors are raised where the fault is found; :func:`response_spec` is the only place that turns
them into a status, a short JSON body (``{"error": ..., "route": ...}``) and extra headers.
``str(err)`` is safe to show or log: it never holds a token or key.
"""

from __future__ import annotations

from dataclasses import dataclass


class GatewayError(Exception):
    """Base of every gateway error. ``str(err)`` is safe to show: it never holds a token or key."""

    status: int = 500
    reason: str = "internal"


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
    UpstreamTimeout: ResponseSpec(504, "gateway_timeout"),
    GatewayError: ResponseSpec(500, "internal"),
}


def response_spec(err: GatewayError) -> ResponseSpec:
    """The HTTP response for ``err`` (500 for anything not listed)."""
    for cls in type(err).__mro__:
        spec = _TABLE.get(cls)
        if spec is not None:
            return spec
    return _TABLE[GatewayError]
