"""X.509-SVIDs: the SPIFFE profile checks and chain verification against a trust bundle.

The rules follow go-spiffe's ``x509svid``: exactly one URI SAN holding a workload SPIFFE ID,
the leaf is not a CA, it has digitalSignature and neither keyCertSign nor cRLSign, and it
chains to the bundle of the trust domain its own ID names, valid at an explicit ``now``.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from svidgate.pki.bundle import BundleSet
from svidgate.pki.errors import (
    InvalidSpiffeIdError,
    InvalidSvidError,
    PkiError,
    SvidValidityError,
    UntrustedSvidError,
)
from svidgate.pki.jose import b64url_encode
from svidgate.pki.spiffe_id import SpiffeId, parse_spiffe_id


@dataclass(frozen=True)
class X509Svid:
    """A leaf certificate with its SPIFFE ID and the intermediates presented with it."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...] = ()


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI subject alternative names of ``cert`` (empty when there is no SAN extension)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return ext.value.get_values_for_type(x509.UniformResourceIdentifier)


def check_svid_profile(leaf: x509.Certificate) -> SpiffeId:
    """Apply the X.509-SVID leaf rules and return the leaf's SPIFFE ID."""
    uris = uri_sans(leaf)
    if not uris:
        raise InvalidSvidError("certificate has no URI SAN (an X.509-SVID needs exactly one)")
    if len(uris) > 1:
        raise InvalidSvidError(
            f"certificate has {len(uris)} URI SANs (an X.509-SVID has exactly one)"
        )
    try:
        spiffe_id = parse_spiffe_id(uris[0], require_path=True)
    except InvalidSpiffeIdError as exc:
        raise InvalidSvidError(f"URI SAN is not a workload SPIFFE ID: {exc}") from None
    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise InvalidSvidError("leaf certificate is a CA (basicConstraints CA:TRUE)")
    try:
        usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise InvalidSvidError(
            "leaf certificate has no keyUsage (digitalSignature required)"
        ) from None
    if not usage.digital_signature:
        raise InvalidSvidError("leaf certificate lacks the digitalSignature key usage")
    if usage.key_cert_sign:
        raise InvalidSvidError("leaf certificate has the keyCertSign key usage")
    if usage.crl_sign:
        raise InvalidSvidError("leaf certificate has the cRLSign key usage")
    return spiffe_id


def verify_x509_svid(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    bundles: BundleSet,
    *,
    now: datetime,
) -> X509Svid:
    """Check the profile, then the chain against the bundle of the ID's own trust domain."""
    spiffe_id = check_svid_profile(leaf)
    if now < leaf.not_valid_before_utc:
        start = f"{leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"
        raise SvidValidityError(f"certificate for {spiffe_id} is not valid before {start}")
    if now > leaf.not_valid_after_utc:
        end = f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}"
        raise SvidValidityError(f"certificate for {spiffe_id} expired at {end}")
    bundle = bundles.get(spiffe_id.trust_domain)
    if not bundle.x509_authorities:
        raise UntrustedSvidError(
            f"trust bundle of {spiffe_id.trust_domain} has no X.509 authorities"
        )
    authorities = list(bundle.x509_authorities)
    try:
        if any(_is_ed25519(c) for c in (leaf, *intermediates, *authorities)):
            _verify_chain_ed25519(leaf, list(intermediates), authorities, now)
        else:
            verifier = PolicyBuilder().store(Store(authorities)).time(now).build_client_verifier()
            verifier.verify(leaf, list(intermediates))
    except (VerificationError, _ChainError) as exc:
        raise UntrustedSvidError(
            f"certificate for {spiffe_id} does not chain to the bundle of "
            f"{spiffe_id.trust_domain}: {exc}"
        ) from None
    return X509Svid(spiffe_id, leaf, tuple(intermediates))


class _ChainError(Exception):
    pass


def _is_ed25519(cert: x509.Certificate) -> bool:
    return isinstance(cert.public_key(), ed25519.Ed25519PublicKey)


# What the Ed25519 chain walk understands. Like the WebPKI verifier it refuses any other
# critical extension, and it refuses name constraints outright since it cannot enforce them.
_HANDLED_EXTENSIONS = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
)


def _check_extensions(cert: x509.Certificate) -> None:
    for ext in cert.extensions:
        if ext.oid == ExtensionOID.NAME_CONSTRAINTS:
            raise _ChainError("name constraints are not supported on Ed25519 chains")
        if ext.critical and ext.oid not in _HANDLED_EXTENSIONS:
            raise _ChainError(f"unhandled critical extension {ext.oid.dotted_string}")


def _check_issued_by(
    child: x509.Certificate, parent: x509.Certificate, now: datetime, cas_below: int
) -> None:
    """One link of a chain: ``parent`` is a valid CA at ``now`` that signed ``child``."""
    _check_extensions(parent)
    if not parent.not_valid_before_utc <= now <= parent.not_valid_after_utc:
        raise _ChainError("a CA certificate of the chain is outside its validity period")
    try:
        constraints = parent.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise _ChainError("issuer is not a CA (no basicConstraints)") from None
    if not constraints.ca:
        raise _ChainError("issuer is not a CA (basicConstraints CA:FALSE)")
    if constraints.path_length is not None and cas_below > constraints.path_length:
        raise _ChainError("path length constraint exceeded")
    try:
        usage = parent.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.key_cert_sign:
        raise _ChainError("issuer lacks the keyCertSign key usage")
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        raise _ChainError("signature or issuer name does not match") from None


def _verify_chain_ed25519(
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    authorities: list[x509.Certificate],
    now: datetime,
) -> None:
    """Chain check for Ed25519, which cryptography's WebPKI verifier refuses: the presented
    order leaf → intermediates must link by signature to one bundle authority, every CA valid
    at ``now`` with CA:TRUE, keyCertSign and path lengths respected; a leaf EKU, when present,
    must allow clientAuth (as the WebPKI client verifier requires)."""
    try:
        eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise _ChainError("leaf extended key usage does not allow clientAuth")
    _check_extensions(leaf)
    chain = [leaf, *intermediates]
    for depth, (child, parent) in enumerate(itertools.pairwise(chain)):
        _check_issued_by(child, parent, now, depth)
    top = chain[-1]
    named_issuer_error: _ChainError | None = None
    for root in authorities:
        try:
            _check_issued_by(top, root, now, len(intermediates))
        except _ChainError as exc:
            if root.subject == top.issuer:  # the likely issuer: its reason is the useful one
                named_issuer_error = named_issuer_error or exc
            continue
        return
    if named_issuer_error is not None:
        raise named_issuer_error
    raise _ChainError("no authority of the bundle issued this chain")


def parse_raw_chain(ders: Sequence[bytes]) -> list[x509.Certificate]:
    """Parse DER certificates (leaf first)."""
    try:
        return [x509.load_der_x509_certificate(der) for der in ders]
    except ValueError:
        raise InvalidSvidError("malformed certificate (not DER X.509)") from None


def load_certificates(path: str | Path) -> list[x509.Certificate]:
    """Read one or more PEM certificates (leaf first)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read certificate file {path}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise InvalidSvidError(f"{path}: not PEM certificates") from None
    return certs


def load_private_key(path: str | Path) -> PrivateKeyTypes:
    """Read an unencrypted PEM private key; the error never shows the file's content."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise PkiError(f"cannot read private key file {path}: {exc.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise PkiError(f"{path}: not an unencrypted PEM private key") from None


def thumbprint_sha256(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER encoding."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()


def x5t_s256(cert: x509.Certificate) -> str:
    """RFC 8705 ``cnf.x5t#S256``: base64url (no padding) of the DER SHA-256 thumbprint."""
    return b64url_encode(thumbprint_sha256(cert))
