"""Trust bundles: the X.509 authorities (and JWT keys) of one trust domain.

Two formats are read and written: concatenated PEM certificates, and the SPIFFE bundle
format (a JWKS whose ``use: x509-svid`` keys carry one DER certificate in ``x5c``, with
``spiffe_sequence`` and ``spiffe_refresh_hint``).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from svidgate.pki.errors import BundleError, UntrustedSvidError
from svidgate.pki.jose import b64url_encode
from svidgate.pki.spiffe_id import TrustDomain, parse_trust_domain

USE_X509_SVID = "x509-svid"
USE_JWT_SVID = "jwt-svid"


@dataclass(frozen=True)
class Bundle:
    """The authorities of one trust domain."""

    trust_domain: TrustDomain
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_authorities: tuple[dict[str, Any], ...] = field(default=())
    sequence: int | None = None
    refresh_hint: int | None = None


def _as_trust_domain(value: TrustDomain | str) -> TrustDomain:
    return value if isinstance(value, TrustDomain) else parse_trust_domain(value)


def parse_pem_bundle(data: bytes, trust_domain: TrustDomain | str) -> Bundle:
    """Parse concatenated PEM certificates."""
    td = _as_trust_domain(trust_domain)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise BundleError(f"bundle for {td}: not valid PEM certificates") from None
    return Bundle(td, tuple(certs))


def _intb64url_encode(value: int, length: int | None = None) -> str:
    size = length if length is not None else max(1, (value.bit_length() + 7) // 8)
    return b64url_encode(value.to_bytes(size, "big"))


def public_jwk(cert: x509.Certificate) -> dict[str, Any]:
    """The JWK members describing a certificate's public key (EC P-256/384, RSA, Ed25519)."""
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        curves = {"secp256r1": ("P-256", 32), "secp384r1": ("P-384", 48)}
        if key.curve.name not in curves:
            raise BundleError(f"unsupported EC curve {key.curve.name}")
        crv, size = curves[key.curve.name]
        nums = key.public_numbers()
        return {
            "kty": "EC",
            "crv": crv,
            "x": _intb64url_encode(nums.x, size),
            "y": _intb64url_encode(nums.y, size),
        }
    if isinstance(key, rsa.RSAPublicKey):
        nums_rsa = key.public_numbers()
        return {
            "kty": "RSA",
            "n": _intb64url_encode(nums_rsa.n),
            "e": _intb64url_encode(nums_rsa.e),
        }
    if isinstance(key, ed25519.Ed25519PublicKey):
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(raw)}
    raise BundleError(f"unsupported public key type {type(key).__name__}")


def parse_json_bundle(data: bytes, trust_domain: TrustDomain | str) -> Bundle:
    """Parse the SPIFFE bundle format (JWKS)."""
    td = _as_trust_domain(trust_domain)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise BundleError(f"bundle for {td}: not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise BundleError(f"bundle for {td}: expected a JWKS object with a 'keys' list")
    certs: list[x509.Certificate] = []
    jwt_keys: list[dict[str, Any]] = []
    for index, key in enumerate(doc["keys"]):
        where = f"bundle for {td}: keys[{index}]"
        if not isinstance(key, dict):
            raise BundleError(f"{where}: not an object")
        use = key.get("use")
        if not isinstance(use, str) or not use:
            raise BundleError(f"{where}: the 'use' member is required")
        if use == USE_X509_SVID:
            x5c = key.get("x5c")
            if not isinstance(x5c, list) or len(x5c) != 1 or not isinstance(x5c[0], str):
                raise BundleError(f"{where}: x509-svid key needs exactly one x5c certificate")
            try:
                cert = x509.load_der_x509_certificate(base64.b64decode(x5c[0], validate=True))
            except ValueError:
                raise BundleError(f"{where}: x5c is not a DER certificate") from None
            certs.append(cert)
        elif use == USE_JWT_SVID:
            if not isinstance(key.get("kid"), str) or not key["kid"]:
                raise BundleError(f"{where}: jwt-svid key needs a kid")
            jwt_keys.append(dict(key))
        # Any other use: the bundle spec says clients MUST ignore the whole JWK element.
    sequence = doc.get("spiffe_sequence")
    hint = doc.get("spiffe_refresh_hint")
    for name, value in (("spiffe_sequence", sequence), ("spiffe_refresh_hint", hint)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise BundleError(f"bundle for {td}: {name} must be a non-negative integer")
    return Bundle(td, tuple(certs), tuple(jwt_keys), sequence, hint)


def load_bundle(path: str | Path, trust_domain: TrustDomain | str) -> Bundle:
    """Read a bundle file, PEM or SPIFFE JSON (decided by its content)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror}") from None
    if data.lstrip().startswith(b"{"):
        return parse_json_bundle(data, trust_domain)
    bundle = parse_pem_bundle(data, trust_domain)
    if not bundle.x509_authorities:
        raise BundleError(f"bundle {path} holds no certificates")
    return bundle


def marshal_pem(bundle: Bundle) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in bundle.x509_authorities)


def marshal_json(bundle: Bundle) -> bytes:
    keys: list[dict[str, Any]] = []
    for cert in bundle.x509_authorities:
        jwk = {"use": USE_X509_SVID, **public_jwk(cert)}
        jwk["x5c"] = [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()]
        keys.append(jwk)
    keys.extend(bundle.jwt_authorities)
    doc: dict[str, Any] = {"keys": keys}
    if bundle.sequence is not None:
        doc["spiffe_sequence"] = bundle.sequence
    if bundle.refresh_hint is not None:
        doc["spiffe_refresh_hint"] = bundle.refresh_hint
    return json.dumps(doc, indent=2).encode() + b"\n"


class BundleSet:
    """One bundle per trust domain; an SVID is checked only against its own domain's bundle."""

    __slots__ = ("_bundles",)

    def __init__(self, bundles: dict[TrustDomain, Bundle]) -> None:
        self._bundles = dict(bundles)

    @classmethod
    def from_bundles(cls, bundles: Iterable[Bundle]) -> BundleSet:
        out: dict[TrustDomain, Bundle] = {}
        for bundle in bundles:
            if bundle.trust_domain in out:
                raise BundleError(f"two bundles for trust domain {bundle.trust_domain}")
            out[bundle.trust_domain] = bundle
        return cls(out)

    def get(self, trust_domain: TrustDomain) -> Bundle:
        try:
            return self._bundles[trust_domain]
        except KeyError:
            raise UntrustedSvidError(f"no trust bundle for trust domain {trust_domain}") from None

    def __contains__(self, trust_domain: object) -> bool:
        return trust_domain in self._bundles

    def __iter__(self) -> Iterator[Bundle]:
        return iter(self._bundles.values())

    def __len__(self) -> int:
        return len(self._bundles)

    def trust_domains(self) -> list[TrustDomain]:
        return list(self._bundles)

    def pem(self) -> bytes:
        """All authorities as PEM, e.g. for ``SSLContext.load_verify_locations(cadata=…)``."""
        return b"".join(marshal_pem(b) for b in self._bundles.values())
