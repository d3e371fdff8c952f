"""The signer's error tree (one base); the single table mapping them to gRPC status codes lives
in the service layer (:mod:`svidgate.signer.service`)."""

from __future__ import annotations


class SignerError(Exception):
    """Base of every signer error. ``str(err)`` never holds a token, key or Vault token."""


class TokenError(SignerError):
    """A token failed verification. ``reason`` is the machine-readable code sent to clients."""

    reason = "malformed"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class ExpiredError(TokenError):
    reason = "expired"


class NotYetValidError(TokenError):
    reason = "not_yet_valid"


class BadSignatureError(TokenError):
    reason = "bad_signature"


class UnknownKidError(TokenError):
    reason = "unknown_kid"


class BadAudienceError(TokenError):
    reason = "bad_audience"


class BadIssuerError(TokenError):
    reason = "bad_issuer"


class BadSubjectError(TokenError):
    reason = "bad_subject"


class MalformedTokenError(TokenError):
    reason = "malformed"


class AlgNotAllowedError(TokenError):
    reason = "alg_not_allowed"


class BindingMismatchError(TokenError):
    reason = "binding_mismatch"


class TooLargeError(TokenError):
    reason = "too_large"


class InvalidRequestError(SignerError):
    """A request is well-formed protobuf but asks for something invalid (bad claims JSON…)."""


class PermissionDeniedError(SignerError):
    """The caller's SPIFFE ID is not allowed to make this call (or mint this subject)."""


class SigningUnavailableError(SignerError):
    """No key may sign right now (no active key, or the cached key's window has run out)."""


class NotReadyError(SignerError):
    """The signer has not loaded any key yet (the source was never reachable)."""


class KeySourceError(SignerError):
    """The key source (directory, Vault) failed; the cached key ring stays in use."""


class SourceUnavailableError(KeySourceError):
    """The key source cannot be reached (Vault down, network error)."""


class SourceConflictError(KeySourceError):
    """A check-and-set write lost against another replica; reload and re-plan."""
