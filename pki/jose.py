"""JOSE encoding primitives shared by the signer and the gateway's local JWT verifier.

The signer and the gateway never import each other; both depend on pki, so the strict parts
of compact-JWS handling that must behave identically on both sides live here once: base64url
without padding, JSON objects that refuse duplicate member names, and the one-algorithm-per-key
rule.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

B64URL_ALPHABET = re.compile(r"^[A-Za-z0-9_-]*$")
MIN_RSA_BITS = 2048


def b64url_encode(data: bytes) -> str:
    """base64url without padding (RFC 7515 section 2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict base64url without padding; raises ValueError."""
    if not B64URL_ALPHABET.match(text) or len(text) % 4 == 1:
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None


def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a JSON object naming a member twice."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate JSON key {key!r}")
        out[key] = value
    return out


_STRICT_JSON = json.JSONDecoder(object_pairs_hook=reject_duplicate_keys)


def loads_strict(data: bytes | str) -> Any:
    """Exactly ``json.loads(data, object_pairs_hook=reject_duplicate_keys)`` (same encoding
    detection for bytes, same BOM refusal for text) with one shared decoder. Raises ValueError
    (or UnicodeDecodeError, a ValueError) for invalid JSON or a duplicate member."""
    if isinstance(data, bytes):
        text = data.decode(json.detect_encoding(data), "surrogatepass")
    else:
        if data.startswith("\ufeff"):
            raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")
        text = data
    return _STRICT_JSON.decode(text)


def key_fits_algorithm(alg: str, key: object) -> bool:
    """One algorithm per key: whether ``key`` (public or private) is the key type ``alg`` needs."""
    if alg == "EdDSA":
        return isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey)
    if alg == "ES256":
        return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and (
            isinstance(key.curve, ec.SECP256R1)
        )
    if alg in ("RS256", "PS256"):
        return isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey) and (
            key.key_size >= MIN_RSA_BITS
        )
    return False
