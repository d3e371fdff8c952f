"""pki's error tree. Messages are user-facing and never contain key material."""

from __future__ import annotations


class PkiError(Exception):
    """Base of every pki error."""


class InvalidSpiffeIdError(PkiError):
    """Text is not a SPIFFE ID (per the SPIFFE-ID spec)."""


class InvalidPatternError(PkiError):
    """Text is not a valid SPIFFE ID pattern."""


class UnauthorizedIdError(PkiError):
    """A SPIFFE ID matched none of the allowed patterns."""


class InvalidSvidError(PkiError):
    """A certificate breaks the X.509-SVID profile (URI SANs, CA flag, key usage)."""


class UntrustedSvidError(PkiError):
    """An SVID does not verify: no bundle for its trust domain, bad chain, or outside validity."""


class SvidValidityError(UntrustedSvidError):
    """An SVID is outside its validity period (expired, or not yet valid)."""


class NoCertificateError(UntrustedSvidError):
    """The peer presented no certificate."""


class BundleError(PkiError):
    """A trust bundle cannot be read or parsed."""


class CaError(PkiError):
    """The CA cannot be created, loaded or cannot issue."""


class DurationError(PkiError):
    """Text is not a Go-style duration."""
