"""The signer's error tree (one base); the single table mapping them to gRPC status codes lives
in the service layer (:mod:`svidgate.signer.service`). Token verification failures are not
here: they are :class:`svidgate.pki.jwt_svid.JwtSvidError`, shared with the gateway."""

from __future__ import annotations


class SignerError(Exception):
    """Base of every signer error. ``str(err)`` never holds a token, key or Vault token."""


class InvalidRequestError(SignerError):
    """A request is well-formed protobuf but asks for something invalid (bad claims JSON…)."""


class PermissionDeniedError(SignerError):
    """The caller's SPIFFE ID is not allowed to make this call (or mint this subject)."""


class ClaimNotAllowedError(PermissionDeniedError):
    """``Sign`` asked for an extra claim that ``authorization.claims`` does not grant."""


class AudienceNotAllowedError(PermissionDeniedError):
    """``Sign`` asked for an audience that ``authorization.audiences`` does not grant."""


class KeyNotFoundError(SignerError):
    """``Revoke`` named a kid that the key source does not hold."""


class RevokeRefusedError(SignerError):
    """The key source cannot delete this key now (Transit: only the oldest versions can go)."""


class RotationPendingError(SignerError):
    """``Rotate`` while a prepared key has not activated yet (one rotation at a time)."""


class SourceCapacityError(SignerError):
    """Writing one more key would make the source drop a published key (KV ``max_versions``)."""


class SigningUnavailableError(SignerError):
    """No key may sign right now (no active key, or the cached key's window has run out)."""


class NotReadyError(SignerError):
    """The signer has not loaded any key yet (the source was never reachable)."""


class KeySourceError(SignerError):
    """The key source (directory, Vault) failed; the cached key ring stays in use."""


class SourceUnavailableError(KeySourceError):
    """The key source cannot be reached (Vault down, network error)."""


class SourceDeniedError(KeySourceError):
    """The key source refused the operation (Vault 403 after a fresh login: the policy)."""


class SourceConflictError(KeySourceError):
    """A check-and-set write lost against another replica; reload and re-plan."""
