"""Why a client's connection failed before HTTP: the reason label of
``svidgate_gateway_handshake_failures_total`` (and of the log line of a failed handshake).

Two places find the fault: the TLS handshake (OpenSSL verifies the chain against every
configured bundle; an exception says why) and the identity check right after it (the SVID
profile and the bundle of the leaf's own trust domain; a :class:`PkiError` says why). Both are
classified here, by exception type and OpenSSL's verify code, never by parsing messages.
"""

from __future__ import annotations

import ssl

from svidgate.pki.errors import (
    InvalidSpiffeIdError,
    InvalidSvidError,
    PkiError,
    SvidValidityError,
    UntrustedSvidError,
)

NO_CLIENT_CERTIFICATE = "no_client_certificate"
UNKNOWN_CA = "unknown_ca"
EXPIRED = "expired"
NOT_AN_SVID = "not_an_svid"
TIMEOUT = "timeout"
OTHER = "other"  # not TLS, a protocol version or cipher mismatch, a reset mid-handshake
REASONS = (NO_CLIENT_CERTIFICATE, UNKNOWN_CA, EXPIRED, NOT_AN_SVID, TIMEOUT, OTHER)

# OpenSSL X509_V_ERR_* codes (x509_vfy.h)
_VALIDITY = {9, 10}  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
# UNABLE_TO_GET_ISSUER_CERT, DEPTH_ZERO_SELF_SIGNED_CERT, SELF_SIGNED_CERT_IN_CHAIN,
# UNABLE_TO_GET_ISSUER_CERT_LOCALLY, UNABLE_TO_VERIFY_LEAF_SIGNATURE, CERT_UNTRUSTED,
# CERT_SIGNATURE_FAILURE
_UNTRUSTED = {2, 7, 18, 19, 20, 21, 27}


def handshake_failure_reason(exc: BaseException | None) -> str:
    """The reason a TLS handshake failed (``None``: the client never sent a ClientHello)."""
    if exc is None or isinstance(exc, TimeoutError | ConnectionAbortedError):
        # uvloop aborts a handshake that outlives ssl_handshake_timeout (ConnectionAbortedError)
        return TIMEOUT
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _VALIDITY:
            return EXPIRED
        if exc.verify_code in _UNTRUSTED:
            return UNKNOWN_CA
        return NOT_AN_SVID  # a chain that verifies to no SVID profile (purpose, constraints)
    if isinstance(exc, ssl.SSLError) and exc.reason in (
        "PEER_DID_NOT_RETURN_A_CERTIFICATE",
        "NO_CERTIFICATE_RETURNED",
    ):
        return NO_CLIENT_CERTIFICATE
    return OTHER


def identity_failure_reason(exc: PkiError) -> str:
    """The reason the identity check after the handshake refused a peer."""
    if isinstance(exc, SvidValidityError):
        return EXPIRED
    if isinstance(exc, InvalidSvidError | InvalidSpiffeIdError):
        return NOT_AN_SVID
    if isinstance(exc, UntrustedSvidError):
        return UNKNOWN_CA  # no bundle for its trust domain, or it does not chain to it
    return NOT_AN_SVID
