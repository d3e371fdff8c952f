"""The gateway's error tree. Each error carries the HTTP status and the short reason code it maps
to; the one table that turns them into responses lives with the request pipeline."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every gateway error. ``str(err)`` is safe to show: it never holds a token or key."""

    status: int = 500
    reason: str = "internal"


class ConfigError(GatewayError):
    """The configuration file is unreadable or invalid; the message names the field path."""

    status = 500
    reason = "config"


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
