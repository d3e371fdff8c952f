"""Why a client's TLS handshake, or the identity check right after it, failed: one word that
the handshake log line (``reason``) and the metric
``svidgate_gateway_handshake_failures_total{reason}`` share.

``no_client_certificate`` · ``unknown_ca`` (the chain does not lead to a trusted root, or its
trust domain has no bundle) · ``expired`` (outside the certificate's validity, either end) ·
``not_an_svid`` (the certificate breaks the X.509-SVID profile) · ``timeout`` (no ClientHello,
or no finished handshake, within ``handshake_timeout``) · ``tls_error`` (anything else: a
protocol error, a version or cipher mismatch, a peer that went away).
"""

from __future__ import annotations

import ssl
from typing import Final

from svidgate.pki.errors import (
    InvalidSpiffeIdError,
    InvalidSvidError,
    NoCertificateError,
    PkiError,
    SvidValidityError,
)

NO_CLIENT_CERTIFICATE: Final = "no_client_certificate"
UNKNOWN_CA: Final = "unknown_ca"
EXPIRED: Final = "expired"
NOT_AN_SVID: Final = "not_an_svid"
TIMEOUT: Final = "timeout"
TLS_ERROR: Final = "tls_error"
REASONS: Final = (NO_CLIENT_CERTIFICATE, UNKNOWN_CA, EXPIRED, NOT_AN_SVID, TIMEOUT, TLS_ERROR)

# OpenSSL X509_V_ERR_* codes of a failed chain check (ssl.SSLCertVerificationError.verify_code)
_VALIDITY_CODES: Final = frozenset({9, 10})  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
# no issuer / self-signed / untrusted / bad signature (2, 7, 18, 19, 20, 21, 27)
_UNKNOWN_CA_CODES: Final = frozenset({2, 7, 18, 19, 20, 21, 27})
# OpenSSL's reason names (ssl.SSLError.reason) of a missing client certificate
_NO_CERTIFICATE: Final = frozenset(
    {"PEER_DID_NOT_RETURN_A_CERTIFICATE", "NO_CERTIFICATES_RETURNED", "NO_CERTIFICATE_RETURNED"}
)


def handshake_failure_reason(exc: BaseException | None) -> str:
    """The reason word for an exception the TLS handshake raised (``ssl`` module's errors,
    the loop's handshake timeout; ``None``: the client never sent a ClientHello)."""
    if exc is None or isinstance(exc, TimeoutError):
        return TIMEOUT
    if isinstance(exc, ConnectionAbortedError) and "taking longer" in str(exc):
        return TIMEOUT  # asyncio's and uvloop's ssl_handshake_timeout
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in _VALIDITY_CODES:
            return EXPIRED
        return UNKNOWN_CA if exc.verify_code in _UNKNOWN_CA_CODES else NOT_AN_SVID
    if isinstance(exc, ssl.SSLError) and getattr(exc, "reason", None) in _NO_CERTIFICATE:
        return NO_CLIENT_CERTIFICATE
    return TLS_ERROR


def refusal_reason(exc: PkiError) -> str:
    """The reason word for the identity check's refusal of a finished handshake."""
    if isinstance(exc, NoCertificateError):
        return NO_CLIENT_CERTIFICATE
    if isinstance(exc, SvidValidityError):
        return EXPIRED
    if isinstance(exc, InvalidSvidError | InvalidSpiffeIdError):
        return NOT_AN_SVID
    return UNKNOWN_CA  # no bundle for its trust domain, or a chain that does not verify
