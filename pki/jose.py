"""JOSE primitives shared by the signer and the gateway (through :mod:`svidgate.pki.jwt_svid`).

The signer and the gateway never import each other; both depend on pki, so the strict parts of
compact-JWS handling live here once: base64url without padding, strict JSON (no duplicate
members, no NaN/Infinity, no nesting deeper than :data:`MAX_JSON_DEPTH`), the allowed
algorithms with their pyjwt algorithm objects, and the one-algorithm-per-key rule.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from functools import cache
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import Algorithm, get_default_algorithms

B64URL_ALPHABET = re.compile(r"^[A-Za-z0-9_-]*$")
MIN_RSA_BITS = 2048
# Asymmetric algorithms only (never none / HS*); a key always has exactly one of them.
ALGORITHMS: Final = ("EdDSA", "ES256", "RS256", "PS256")
# Deeper JSON is refused: far beyond any JWT or JWKS, far below Python's recursion limit.
MAX_JSON_DEPTH: Final = 64


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


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"JSON constant {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("JSON number out of range")
    return value


_STRICT_JSON = json.JSONDecoder(
    object_pairs_hook=reject_duplicate_keys,
    parse_constant=_refuse_constant,
    parse_float=_finite_float,
)


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays/objects in ``value`` nest more than ``limit`` levels (iterative)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def loads_strict(data: bytes | str) -> Any:
    """``json.loads(data)`` (same encoding detection for bytes, same BOM refusal for text) that
    also refuses a duplicate member, the constants NaN / Infinity / -Infinity, a number that
    overflows a float (``1e400``) and nesting deeper than :data:`MAX_JSON_DEPTH`. Raises
    ValueError (UnicodeDecodeError is one), never RecursionError."""
    if isinstance(data, bytes):
        text = data.decode(json.detect_encoding(data), "surrogatepass")
    else:
        if data.startswith("\ufeff"):
            raise ValueError("Unexpected UTF-8 BOM (decode using utf-8-sig)")
        text = data
    try:
        value = _STRICT_JSON.decode(text)
    except RecursionError:
        raise ValueError("JSON is nested too deeply") from None
    # depth <= number of brackets: the walk only runs for documents that could be too deep
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        raise ValueError(f"JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    return value


@cache
def jws_algorithm(alg: str) -> Algorithm:
    """pyjwt's algorithm object for one of :data:`ALGORITHMS`; ValueError for any other."""
    if alg not in ALGORITHMS:
        raise ValueError(f"algorithm {alg[:32]!r} is not allowed")
    return get_default_algorithms()[alg]


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
