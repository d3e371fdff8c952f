"""JWT minting and verification: a pure core (``now`` is always passed in).

Tokens are compact JWS with the header ``{"alg", "kid", "typ": "JWT"}`` only. Verification is
strict and fails closed with a typed :class:`~svidgate.signer.errors.TokenError` whose
``reason`` is the machine-readable code: the size limit first, then structure, header, key
lookup by ``kid`` (only ever a dictionary key), header ``alg`` == the key's algorithm, signature
(pyjwt algorithm objects with key objects; ES256 with P-256 keys calls cryptography directly,
see :func:`verify_signature`), then the claims.

Per-request costs are kept off the hot path without changing any decision: a validated header
is remembered by its exact base64url text (a failing header is never cached and fails again),
the JSON decoder with the duplicate-key hook is built once, and the header of tokens we mint is
encoded once per (alg, kid).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache, lru_cache
from types import MappingProxyType
from typing import Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from jwt.algorithms import Algorithm, get_default_algorithms
from svidgate.pki.errors import PkiError
from svidgate.pki.jose import (
    B64URL_ALPHABET,
    b64url_decode,
    key_fits_algorithm,
    loads_strict,
    reject_duplicate_keys,
)
from svidgate.pki.jose import b64url_encode as b64url
from svidgate.pki.spiffe_id import parse_spiffe_id
from svidgate.signer.errors import (
    AlgNotAllowedError,
    BadAudienceError,
    BadIssuerError,
    BadSignatureError,
    BadSubjectError,
    BindingMismatchError,
    ExpiredError,
    InvalidRequestError,
    MalformedTokenError,
    NotYetValidError,
    TooLargeError,
)

ALGORITHMS: Final = ("EdDSA", "ES256", "RS256", "PS256")
MAX_TOKEN_BYTES: Final = 8 * 1024
ALLOWED_HEADERS: Final = frozenset({"alg", "kid", "typ"})
FORBIDDEN_HEADERS: Final = ("jku", "x5u", "jwk", "x5c", "crit", "zip", "cty", "b64")
REGISTERED_CLAIMS: Final = frozenset({"iss", "sub", "aud", "exp", "nbf", "iat", "jti", "cnf"})
REQUIRED_CLAIMS: Final = ("exp", "iat", "iss", "aud", "sub")
CNF_THUMBPRINT: Final = "x5t#S256"
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())  # stateless: one instance serves every call
_P256_BYTES: Final = 32

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key as the verifier sees it: one algorithm per key."""

    kid: str
    algorithm: str
    public_key: PublicKey


@dataclass(frozen=True, slots=True)
class VerifyPolicy:
    issuer: str
    clock_skew: timedelta
    max_ttl: timedelta


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    kid: str
    subject: str
    expires_at: int
    claims: dict[str, Any]


@cache
def jws_algorithm(alg: str) -> Algorithm:
    """pyjwt's algorithm object for one of :data:`ALGORITHMS` (never none / HS*)."""
    if alg not in ALGORITHMS:
        raise AlgNotAllowedError(f"algorithm {alg!r} is not allowed")
    return get_default_algorithms()[alg]


def check_key_algorithm(alg: str, key: PublicKey | PrivateKey) -> None:
    """Raise ValueError unless ``key`` is the key type ``alg`` needs (one algorithm per key)."""
    if not key_fits_algorithm(alg, key):
        raise ValueError(f"key type {type(key).__name__} does not fit algorithm {alg}")


def parse_json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """Decode a JSON object rejecting duplicate keys; raises MalformedTokenError.

    Decoding is :func:`svidgate.pki.jose.loads_strict` (``json.loads`` semantics, one shared
    decoder)."""
    try:
        value = loads_strict(data)
    except ValueError as exc:
        raise MalformedTokenError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MalformedTokenError(f"{what} is not a JSON object")
    return value


def _compact_json(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=False).encode("utf-8")


@lru_cache(maxsize=64)
def _header_b64(alg: str, kid: str) -> str:
    return b64url(_compact_json({"alg": alg, "kid": kid, "typ": "JWT"}))


def signing_input(alg: str, kid: str, claims: Mapping[str, Any]) -> bytes:
    """``BASE64URL(header) . BASE64URL(claims)`` for our fixed header."""
    return f"{_header_b64(alg, kid)}.{b64url(_compact_json(claims))}".encode("ascii")


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) and isinstance(
        key.curve, ec.SECP256R1
    )


def sign_local(alg: str, private_key: PrivateKey, data: bytes) -> bytes:
    """A raw JWS signature (r||s for ECDSA) with a local private key."""
    if alg == "ES256" and _is_p256(private_key):
        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        r, s = decode_dss_signature(private_key.sign(data, _ECDSA_SHA256))
        return r.to_bytes(_P256_BYTES, "big") + s.to_bytes(_P256_BYTES, "big")
    return jws_algorithm(alg).sign(data, private_key)


def verify_signature(alg: str, public_key: PublicKey, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` (raw JWS form) is valid for ``data``; never raises for a bad one.

    ES256 with a P-256 key is what pyjwt's ECAlgorithm.verify does (exactly 64 bytes r||s,
    DER-encode, ECDSA-SHA256 verify) without its per-call objects; the rest goes to pyjwt."""
    if alg == "ES256" and _is_p256(public_key):
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        if len(signature) != 2 * _P256_BYTES:
            return False
        der = encode_dss_signature(
            int.from_bytes(signature[:_P256_BYTES], "big"),
            int.from_bytes(signature[_P256_BYTES:], "big"),
        )
        try:
            public_key.verify(der, data, _ECDSA_SHA256)
        except InvalidSignature:
            return False
        return True
    try:
        return bool(jws_algorithm(alg).verify(data, public_key, signature))
    except Exception:  # a malformed signature can raise inside the backend: fail closed
        return False


def assemble(data: bytes, signature: bytes) -> str:
    return f"{data.decode('ascii')}.{b64url(signature)}"


def parse_extra_claims(claims_json: str) -> dict[str, Any]:
    """The Sign request's extra claims: a JSON object without registered claim names."""
    if not claims_json:
        return {}
    try:
        extra = json.loads(claims_json, object_pairs_hook=reject_duplicate_keys)
    except ValueError as exc:
        raise InvalidRequestError(f"claims_json is not valid JSON ({exc})") from None
    if not isinstance(extra, dict):
        raise InvalidRequestError("claims_json must be a JSON object")
    reserved = sorted(REGISTERED_CLAIMS.intersection(extra))
    if reserved:
        raise InvalidRequestError(f"claims_json may not set registered claims {reserved}")
    return extra


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


@dataclass(frozen=True, slots=True)
class ParsedToken:
    header: dict[str, Any]
    signing_input: bytes
    payload_b64: str
    signature: bytes
    alg: str
    kid: str


def parse_token(token: str) -> ParsedToken:
    """Structure and header checks, before any key is looked up."""
    if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "replace")) > MAX_TOKEN_BYTES:
        raise TooLargeError(f"token is larger than {MAX_TOKEN_BYTES} bytes")
    parts = token.split(".")
    if len(parts) != 3:
        raise MalformedTokenError("not a compact JWS (three dot-separated parts)")
    header_b64, payload_b64, sig_b64 = parts
    try:
        signature = b64url_decode(sig_b64)
    except ValueError:
        raise MalformedTokenError("a part is not base64url") from None
    if not B64URL_ALPHABET.match(payload_b64) or len(payload_b64) % 4 == 1:
        raise MalformedTokenError("a part is not base64url")  # decoded after the signature
    alg, kid, header = _parse_header(header_b64)
    if not signature:
        raise BadSignatureError("empty signature")
    return ParsedToken(
        header=dict(header),
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        payload_b64=payload_b64,
        signature=signature,
        alg=alg,
        kid=kid,
    )


@lru_cache(maxsize=128)
def _parse_header(header_b64: str) -> tuple[str, str, Mapping[str, Any]]:
    """(alg, kid, header) of a header that passes every check; raises otherwise (exceptions
    are not cached). The same few headers recur on every request, one per key."""
    try:
        header_raw = b64url_decode(header_b64)
    except ValueError:
        raise MalformedTokenError("a part is not base64url") from None
    header = parse_json_object(header_raw, "header")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise MalformedTokenError("header alg is missing")
    if alg not in ALGORITHMS:
        raise AlgNotAllowedError(f"algorithm {alg!r} is not allowed")
    for name in FORBIDDEN_HEADERS:
        if name in header:
            if name == "cty":
                raise MalformedTokenError("header cty is not allowed (nested JWTs are refused)")
            raise MalformedTokenError(f"header {name} is not allowed")
    unknown = sorted(set(header) - ALLOWED_HEADERS)
    if unknown:
        raise MalformedTokenError(f"header parameters {unknown} are not allowed")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise MalformedTokenError("header typ must be JWT")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise MalformedTokenError("header kid is missing")
    return alg, kid, MappingProxyType(header)


@lru_cache(maxsize=4096)
def _is_workload_id(text: str) -> bool:
    """A SPIFFE ID with a path (cached: the same few subjects recur on every request)."""
    try:
        parse_spiffe_id(text, require_path=True)
    except PkiError:
        return False
    return True


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedTokenError(f"claim {name} is not a NumericDate")
    return float(value)


def check_claims(
    claims: Mapping[str, Any],
    *,
    policy: VerifyPolicy,
    audiences: Sequence[str],
    now: datetime,
    expected_subject: str = "",
    thumbprint: str = "",
    require_binding: bool = False,
) -> None:
    """Registered-claim checks in a fixed order; raises a TokenError subclass."""
    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise MalformedTokenError(f"required claims missing: {missing}")
    exp = _numeric_date(claims, "exp")
    iat = _numeric_date(claims, "iat")
    skew = policy.clock_skew.total_seconds()
    ts = now.timestamp()
    if exp <= iat:
        raise MalformedTokenError("exp is not after iat")
    if exp - iat > policy.max_ttl.total_seconds():
        raise MalformedTokenError("token lifetime exceeds tokens.max_ttl")
    if ts >= exp + skew:
        raise ExpiredError(f"token expired at {int(exp)}")
    if iat > ts + skew:
        raise NotYetValidError("iat is in the future")
    if "nbf" in claims and _numeric_date(claims, "nbf") > ts + skew:
        raise NotYetValidError("nbf is in the future")
    iss = claims["iss"]
    if not isinstance(iss, str) or iss != policy.issuer:
        raise BadIssuerError("unexpected issuer")
    aud = claims["aud"]
    token_aud = [aud] if isinstance(aud, str) else aud
    if (
        not isinstance(token_aud, list)
        or not token_aud
        or not all(isinstance(a, str) for a in token_aud)
    ):
        raise MalformedTokenError("claim aud is not a string or a list of strings")
    if not audiences:
        raise InvalidRequestError("at least one expected audience is required")
    if not set(token_aud).intersection(audiences):
        raise BadAudienceError("no expected audience in aud")
    sub = claims["sub"]
    if not isinstance(sub, str):
        raise MalformedTokenError("claim sub is not a string")
    if not _is_workload_id(sub):
        raise MalformedTokenError("claim sub is not a SPIFFE ID")
    if expected_subject and sub != expected_subject:
        raise BadSubjectError("sub is not the expected subject")
    cnf = claims.get("cnf")
    if cnf is not None:
        bound = cnf.get(CNF_THUMBPRINT) if isinstance(cnf, dict) else None
        if not isinstance(bound, str) or not bound:
            raise MalformedTokenError("claim cnf has no x5t#S256")
        if not thumbprint:
            raise BindingMismatchError("token is certificate-bound; no certificate was presented")
        if not hmac.compare_digest(bound.encode(), thumbprint.encode()):
            raise BindingMismatchError("cnf.x5t#S256 does not match the presented certificate")
    elif require_binding:
        raise BindingMismatchError("token is not certificate-bound")


def verify_token(
    token: str,
    *,
    lookup: Callable[[str], VerificationKey],
    policy: VerifyPolicy,
    audiences: Sequence[str],
    now: datetime,
    expected_subject: str = "",
    thumbprint: str = "",
    require_binding: bool = False,
) -> VerifiedToken:
    """Fully verify ``token``. ``lookup(kid)`` raises UnknownKidError for an unknown kid."""
    parsed = parse_token(token)
    key = lookup(parsed.kid)
    if parsed.alg != key.algorithm:
        raise AlgNotAllowedError(f"header alg {parsed.alg} is not the key's algorithm")
    if not verify_signature(key.algorithm, key.public_key, parsed.signing_input, parsed.signature):
        raise BadSignatureError("signature does not verify")
    claims = parse_json_object(b64url_decode(parsed.payload_b64), "payload")
    check_claims(
        claims,
        policy=policy,
        audiences=audiences,
        now=now,
        expected_subject=expected_subject,
        thumbprint=thumbprint,
        require_binding=require_binding,
    )
    return VerifiedToken(
        kid=key.kid, subject=claims["sub"], expires_at=int(claims["exp"]), claims=claims
    )


def public_jwk(kid: str, alg: str, key: PublicKey) -> dict[str, Any]:
    """A public JWK with ``kid``, ``alg`` and ``use: sig``."""
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
