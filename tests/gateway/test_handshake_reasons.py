"""The reason words of failed handshakes (gateway.handshake), shared by the log line and the
handshake-failure metric: the identity check's typed errors and the loop's timeouts map to
their word; anything unknown is ``tls_error``. The TLS-level words are shown against a real
gateway in test_gateway_log_schema.py."""

from __future__ import annotations

import ssl

import pytest
from svidgate.gateway.handshake import REASONS, handshake_failure_reason, refusal_reason
from svidgate.pki.errors import (
    InvalidSpiffeIdError,
    InvalidSvidError,
    NoCertificateError,
    PkiError,
    SvidValidityError,
    UntrustedSvidError,
)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (NoCertificateError("the peer presented no certificate"), "no_client_certificate"),
        (SvidValidityError("certificate for … expired at …"), "expired"),
        (InvalidSvidError("leaf certificate is a CA"), "not_an_svid"),
        (InvalidSpiffeIdError("bad"), "not_an_svid"),
        (UntrustedSvidError("no trust bundle for trust domain x.org"), "unknown_ca"),
        (PkiError("not a TLS connection"), "unknown_ca"),
    ],
)
def test_identity_refusals_map_to_their_word(exc: PkiError, reason: str) -> None:
    assert refusal_reason(exc) == reason


def test_handshake_errors_map_to_their_word() -> None:
    assert handshake_failure_reason(TimeoutError()) == "timeout"
    aborted = ConnectionAbortedError("SSL handshake is taking longer than 5.0 seconds: aborting")
    assert handshake_failure_reason(aborted) == "timeout"
    assert handshake_failure_reason(ConnectionResetError()) == "tls_error"
    assert handshake_failure_reason(ssl.SSLError(1, "WRONG_VERSION_NUMBER")) == "tls_error"
    assert set(REASONS) == {
        "no_client_certificate",
        "unknown_ca",
        "expired",
        "not_an_svid",
        "timeout",
        "tls_error",
    }
