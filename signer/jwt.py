"""JWT minting: a pure core (``now`` is always passed in). Verification is not here: the signer's
``Verify`` calls :mod:`svidgate.pki.jwt_svid`, the one verifier it shares with the gateway.

Tokens are compact JWS with the header ``{"alg", "kid", "typ": "JWT"}`` only; the header of
the tokens we mint is encoded once per (alg, kid), and ES256 with a P-256 key signs through
cryptography directly (raw r||s, as pyjwt would produce).

What a Sign request may ask for is bounded here before anything is parsed or signed
(:func:`check_audiences`, :func:`check_claims_size`, :func:`parse_extra_claims`): sizes first,
then strict JSON whose numbers are finite and, for integers, within I-JSON's exact range
(RFC 7493), so a token never carries ``NaN``, ``Infinity`` or a number its verifiers would round.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from svidgate.pki.jose import b64url_encode as b64url
from svidgate.pki.jose import jws_algorithm, key_fits_algorithm, loads_strict
from svidgate.pki.jwt_svid import CNF_THUMBPRINT, MAX_TOKEN_BYTES, PublicKey
from svidgate.signer.errors import InvalidRequestError

REGISTERED_CLAIMS: Final = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "cnf"})
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())  # stateless: one instance serves every call
_P256_BYTES: Final = 32
# RFC 7493 (I-JSON) section 2.2: integers beyond this lose precision in IEEE 754 doubles
MAX_SAFE_INTEGER: Final = 2**53 - 1

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def check_key_algorithm(alg: str, key: PublicKey | PrivateKey) -> None:
    """Raise ValueError unless ``key`` is the key type ``alg`` needs (one algorithm per key)."""
    if not key_fits_algorithm(alg, key):
        raise ValueError(f"key type {type(key).__name__} does not fit algorithm {alg}")


def _compact_json(value: Mapping[str, Any]) -> bytes:
    """Compact JSON; ValueError for NaN / Infinity (never written into a token)."""
    text = json.dumps(value, separators=(",", ":"), sort_keys=False, allow_nan=False)
    return text.encode("utf-8")


@lru_cache(maxsize=64)
def _header_b64(alg: str, kid: str) -> str:
    return b64url(_compact_json({"alg": alg, "kid": kid, "typ": "JWT"}))


def signing_input(alg: str, kid: str, claims: Mapping[str, Any]) -> bytes:
    """``BASE64URL(header) . BASE64URL(claims)`` for our fixed header."""
    return f"{_header_b64(alg, kid)}.{b64url(_compact_json(claims))}".encode("ascii")


def sign_local(alg: str, private_key: PrivateKey, data: bytes) -> bytes:
    """A raw JWS signature (r||s for ECDSA) with a local private key."""
    if alg == "ES256" and isinstance(private_key, ec.EllipticCurvePrivateKey):
        if not key_fits_algorithm(alg, private_key):
            raise ValueError("ES256 needs a P-256 key")
        r, s = decode_dss_signature(private_key.sign(data, _ECDSA_SHA256))
        return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
    return jws_algorithm(alg).sign(data, private_key)


def assemble(data: bytes, signature: bytes) -> str:
    return f"{data.decode('ascii')}.{b64url(signature)}"


def check_audiences(audience: Sequence[str], *, max_count: int, max_bytes: int) -> None:
    """Refuse too many audiences, or one longer than ``max_bytes`` (UTF-8), before any work."""
    if len(audience) > max_count:
        raise InvalidRequestError(
            f"{len(audience)} audiences, more than limits.audiences ({max_count})"
        )
    for value in audience:
        if len(value) > max_bytes or len(value.encode("utf-8", "replace")) > max_bytes:
            raise InvalidRequestError(
                f"an audience is longer than limits.audience_bytes ({max_bytes} bytes)"
            )


def check_claims_size(claims_json: str, max_bytes: int) -> None:
    """Refuse ``claims_json`` over ``max_bytes`` (UTF-8) without reading it further."""
    if len(claims_json) > max_bytes or len(claims_json.encode("utf-8", "replace")) > max_bytes:
        raise InvalidRequestError(
            f"claims_json is larger than limits.claims_bytes ({max_bytes} bytes; a whole token "
            f"is at most {MAX_TOKEN_BYTES} bytes)"
        )


def parse_extra_claims(claims_json: str, *, max_bytes: int = MAX_TOKEN_BYTES) -> dict[str, Any]:
    """The Sign request's extra claims: at most ``max_bytes`` (checked before parsing), a strict
    JSON object (as a verifier will decode it) without registered claim names, whose numbers
    are finite and whose integers are exact in a double. No token holds more than
    MAX_TOKEN_BYTES, so neither can its claims."""
    if not claims_json:
        return {}
    check_claims_size(claims_json, max_bytes)
    try:
        extra = loads_strict(claims_json)
    except ValueError as exc:
        raise InvalidRequestError(f"claims_json is not valid JSON ({exc})") from None
    if not isinstance(extra, dict):
        raise InvalidRequestError("claims_json must be a JSON object")
    reserved = sorted(REGISTERED_CLAIMS.intersection(extra))
    if reserved:
        raise InvalidRequestError(f"claims_json may not set registered claims {reserved}")
    _check_numbers(extra)
    return extra


def _check_numbers(value: Any) -> None:
    """InvalidRequestError for a non-finite float or an integer beyond +-(2**53 - 1) anywhere in
    ``value`` (iterative: loads_strict already bounded the depth)."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, float) and not math.isfinite(node):
            raise InvalidRequestError("claims_json numbers must be finite")
        elif isinstance(node, int) and abs(node) > MAX_SAFE_INTEGER:
            raise InvalidRequestError(
                f"claims_json integers must be within +-{MAX_SAFE_INTEGER} (RFC 7493)"
            )


def build_claims(
    *,
    issuer: str,
    subject: str,
    audience: Sequence[str],
    now: datetime,
    ttl: timedelta,
    extra: Mapping[str, Any] | None = None,
    thumbprint: str | None = None,
) -> dict[str, Any]:
    """The claim set of a new token; ``exp`` = ``iat`` + ``ttl`` (whole seconds)."""
    if not audience or any(not a for a in audience):
        raise InvalidRequestError("at least one non-empty audience is required")
    iat = int(now.timestamp())
    claims: dict[str, Any] = dict(extra or {})
    claims.update(
        {
            "iss": issuer,
            "sub": subject,
            "aud": audience[0] if len(audience) == 1 else list(audience),
            "iat": iat,
            "exp": iat + max(1, int(ttl.total_seconds())),
            "jti": b64url(secrets.token_bytes(16)),
        }
    )
    if thumbprint is not None:
        claims["cnf"] = {CNF_THUMBPRINT: thumbprint}
    return claims


def verification_jwk(kid: str, alg: str, key: PublicKey) -> dict[str, Any]:
    """The JWKS member for a signing key's public half: ``kid``, ``alg`` and ``use: sig``."""
    jwk = dict(jws_algorithm(alg).to_jwk(key, as_dict=True))
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


def jwk_thumbprint(key: PublicKey, alg: str) -> str:
    """RFC 7638 thumbprint of the public key: every replica derives the same kid."""
    jwk = jws_algorithm(alg).to_jwk(key, as_dict=True)
    members = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}
    required = {name: jwk[name] for name in members[str(jwk["kty"])]}
    canonical = json.dumps(required, separators=(",", ":"), sort_keys=True).encode()
    return b64url(hashlib.sha256(canonical).digest())
