"""JWT-SVID verification: the one core behind the signer's ``Verify`` and the gateway's
``verify: local``.

Pure: ``now`` is always passed in, keys come from a lookup callable, nothing does I/O. A token
is checked in a fixed order and the first failure raises a :class:`JwtSvidError` whose
``reason`` is the machine-readable code both services send:

1. size (``too_large``), compact-JWS structure and base64url (``malformed``);
2. header policy: ``alg`` one of :data:`~svidgate.pki.jose.ALGORITHMS` (``alg_not_allowed``);
   no key-selecting or semantics-changing parameter, only alg/kid/typ, ``typ`` JWT, a ``kid``
   (``malformed``);
3. key lookup by ``kid`` (``unknown_kid``), header ``alg`` == the key's algorithm
   (``alg_not_allowed``), signature (``bad_signature``);
4. registered claims: exp/iat/iss/aud/sub present, finite NumericDates in range, ``exp > iat``
   and ``exp - iat <= max_ttl`` (``malformed``); ``exp``, ``iat``, ``nbf`` judged with the clock
   skew (``expired``, ``not_yet_valid``); ``iss`` (``bad_issuer``); ``aud`` (``bad_audience``);
   ``sub`` a SPIFFE ID with a path (``malformed``);
5. binding: the expected subject (``bad_subject``) and RFC 8705 ``cnf.x5t#S256`` against the
   connection certificate's thumbprint (``binding_mismatch``).

Per-request costs are kept off the hot path without changing any decision: a validated header
is remembered by its exact base64url text (a failing header is never cached and fails again),
and ES256 with a P-256 key calls cryptography directly (see :func:`check_signature`).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from types import MappingProxyType
from typing import Any, ClassVar, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from svidgate.pki.errors import PkiError
from svidgate.pki.jose import (
    ALGORITHMS,
    B64URL_ALPHABET,
    b64url_decode,
    jws_algorithm,
    key_fits_algorithm,
    loads_strict,
)
from svidgate.pki.spiffe_id import parse_spiffe_id

MAX_TOKEN_BYTES: Final = 8 * 1024
ALLOWED_HEADERS: Final = frozenset({"alg", "kid", "typ"})
# Header parameters that would let a token pick its own key or demand unknown semantics.
FORBIDDEN_HEADERS: Final = ("jku", "x5u", "jwk", "x5c", "crit", "zip", "cty", "b64")
REQUIRED_CLAIMS: Final = ("exp", "iat", "iss", "aud", "sub")
_REQUIRED_WITHOUT_ISS: Final = tuple(name for name in REQUIRED_CLAIMS if name != "iss")
CNF_THUMBPRINT: Final = "x5t#S256"
MAX_NUMERIC_DATE: Final = 253_402_300_799  # 9999-12-31T23:59:59Z
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())  # stateless: one instance serves every call
_P256_BYTES: Final = 32

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey


# ---------------------------------------------------------------------------------------------
# Errors: one class per reason code, all under JwtSvidError


class JwtSvidError(PkiError):
    """A token failed verification. ``reason`` is the machine-readable code sent to clients;
    ``str(err)`` is ``"reason: detail"`` and never holds the token."""

    reason: ClassVar[str] = "malformed"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class ExpiredError(JwtSvidError):
    reason = "expired"


class NotYetValidError(JwtSvidError):
    reason = "not_yet_valid"


class BadSignatureError(JwtSvidError):
    reason = "bad_signature"


class UnknownKidError(JwtSvidError):
    reason = "unknown_kid"


class BadAudienceError(JwtSvidError):
    reason = "bad_audience"


class BadIssuerError(JwtSvidError):
    reason = "bad_issuer"


class BadSubjectError(JwtSvidError):
    reason = "bad_subject"


class MalformedTokenError(JwtSvidError):
    reason = "malformed"


class AlgNotAllowedError(JwtSvidError):
    reason = "alg_not_allowed"


class BindingMismatchError(JwtSvidError):
    reason = "binding_mismatch"


class TooLargeError(JwtSvidError):
    reason = "too_large"


REASONS: Final = frozenset(cls.reason for cls in JwtSvidError.__subclasses__())


# ---------------------------------------------------------------------------------------------
# Inputs and result


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """A public key as the verifier sees it: one algorithm per key."""

    kid: str
    algorithm: str
    public_key: PublicKey


KeyLookup = Callable[[str], VerificationKey]
"""``lookup(kid)``: the key published under ``kid``; raises :class:`UnknownKidError`."""


@dataclass(frozen=True, slots=True)
class VerificationPolicy:
    """What the verifier expects of every token: its issuer, the clock skew allowed on
    exp/iat/nbf, and the longest lifetime (``exp - iat``) a token may claim. ``issuer=None``
    (another trust domain's JWT-SVIDs, where SPIFFE makes ``iss`` optional): ``iss`` is neither
    required nor checked; the caller pins the trust domain instead."""

    issuer: str | None
    clock_skew: timedelta
    max_ttl: timedelta

    def __post_init__(self) -> None:
        if self.issuer is not None and not self.issuer:
            raise ValueError("issuer must not be empty (None: not checked)")
        if self.clock_skew < timedelta(0) or self.max_ttl <= timedelta(0):
            raise ValueError("clock_skew must be >= 0 and max_ttl > 0")


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed every check; ``claims`` is read-only."""

    kid: str
    subject: str
    expires_at: int
    claims: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ParsedToken:
    """A token whose structure and header passed (nothing about its key or claims yet)."""

    header: dict[str, Any]
    signing_input: bytes
    payload_b64: str
    signature: bytes
    alg: str
    kid: str


# ---------------------------------------------------------------------------------------------
# 1-2: size, structure, header


def parse_json_object(data: bytes | str, what: str) -> dict[str, Any]:
    """A JSON object by :func:`svidgate.pki.jose.loads_strict`; raises MalformedTokenError."""
    try:
        value = loads_strict(data)
    except ValueError as exc:
        raise MalformedTokenError(f"{what} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise MalformedTokenError(f"{what} is not a JSON object")
    return value


def precheck(token: str) -> None:
    """Checks so cheap they may run before anything else (the gateway runs them before an
    RPC): the size limit and three dot-separated parts."""
    if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "replace")) > MAX_TOKEN_BYTES:
        raise TooLargeError(f"token is larger than {MAX_TOKEN_BYTES} bytes")
    if token.count(".") != 2:
        raise MalformedTokenError("not a compact JWS (three dot-separated parts)")


def parse_token(token: str) -> ParsedToken:
    """Structure and header checks, before any key is looked up."""
    precheck(token)
    header_b64, payload_b64, sig_b64 = token.split(".")
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
        raise AlgNotAllowedError(f"algorithm {alg[:32]!r} is not allowed")
    for name in FORBIDDEN_HEADERS:
        if name in header:
            if name == "cty":
                raise MalformedTokenError("header cty is not allowed (nested JWTs are refused)")
            raise MalformedTokenError(f"header {name} is not allowed")
    unknown = sorted(set(header) - ALLOWED_HEADERS)
    if unknown:
        names = ", ".join(name[:32] for name in unknown[:4])
        raise MalformedTokenError(f"header parameters [{names}] are not allowed")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise MalformedTokenError("header typ must be JWT")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise MalformedTokenError("header kid is missing")
    return alg, kid, MappingProxyType(header)


# ---------------------------------------------------------------------------------------------
# 3: key and signature


def check_signature(key: VerificationKey, data: bytes, signature: bytes) -> None:
    """Raise BadSignatureError unless ``signature`` (raw JWS form) is ``key``'s over ``data``.

    ES256 with a P-256 key is what pyjwt's ECAlgorithm.verify does (exactly 64 bytes r||s,
    DER-encode, ECDSA-SHA256 verify) without its per-call objects; the rest goes to pyjwt."""
    if not _signature_valid(key.algorithm, key.public_key, data, signature):
        raise BadSignatureError("signature does not verify")


def _signature_valid(alg: str, public_key: PublicKey, data: bytes, signature: bytes) -> bool:
    if alg == "ES256" and isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1) or len(signature) != 2 * _P256_BYTES:
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
    if not key_fits_algorithm(alg, public_key):
        return False
    try:
        return bool(jws_algorithm(alg).verify(data, public_key, signature))
    except Exception:  # a malformed signature can raise inside the backend: fail closed
        return False


# ---------------------------------------------------------------------------------------------
# 4: registered claims


@lru_cache(maxsize=4096)
def _is_workload_id(text: str) -> bool:
    """A SPIFFE ID with a path (cached: the same few subjects recur on every request)."""
    try:
        parse_spiffe_id(text, require_path=True)
    except PkiError:
        return False
    return True


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    """A finite NumericDate between 0 and year 9999; bools, NaN, infinities are malformed."""
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise MalformedTokenError(f"claim {name} is not a NumericDate")
    if not 0 <= value <= MAX_NUMERIC_DATE:  # also false for NaN
        raise MalformedTokenError(f"claim {name} is out of range")
    return float(value)


def _same(a: str, b: str) -> bool:
    """Constant-time equality of two texts (any code points, lone surrogates included)."""
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )


def check_registered_claims(
    claims: Mapping[str, Any],
    *,
    policy: VerificationPolicy,
    audiences: Sequence[str],
    now: datetime,
) -> str:
    """The registered-claim checks in their fixed order; returns ``sub``."""
    required = REQUIRED_CLAIMS if policy.issuer is not None else _REQUIRED_WITHOUT_ISS
    missing = [name for name in required if name not in claims]
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
    if policy.issuer is not None:
        iss = claims["iss"]
        if not isinstance(iss, str) or not _same(iss, policy.issuer):
            raise BadIssuerError("unexpected issuer")
    aud = claims["aud"]
    token_aud = [aud] if isinstance(aud, str) else aud
    if (
        not isinstance(token_aud, list)
        or not token_aud
        or not all(isinstance(a, str) for a in token_aud)
    ):
        raise MalformedTokenError("claim aud is not a string or a list of strings")
    if not set(token_aud).intersection(audiences):
        raise BadAudienceError("no expected audience in aud")
    sub = claims["sub"]
    if not isinstance(sub, str):
        raise MalformedTokenError("claim sub is not a string")
    if not _is_workload_id(sub):
        raise MalformedTokenError("claim sub is not a SPIFFE ID")
    return sub


# ---------------------------------------------------------------------------------------------
# 5: binding


def check_binding(
    claims: Mapping[str, Any],
    *,
    expected_subject: str | None,
    certificate_thumbprint: str | None,
    require_binding: bool,
) -> None:
    """``sub`` must equal ``expected_subject`` (when given). RFC 8705: a certificate-bound
    token (``cnf``) always needs ``certificate_thumbprint`` to match its ``x5t#S256``, and
    ``require_binding`` refuses an unbound token."""
    if expected_subject:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not _same(sub, expected_subject):
            raise BadSubjectError("sub is not the expected subject")
    if "cnf" not in claims:
        if require_binding:
            raise BindingMismatchError("token is not certificate-bound")
        return
    cnf = claims["cnf"]
    bound = cnf.get(CNF_THUMBPRINT) if isinstance(cnf, dict) else None
    if not isinstance(bound, str) or not bound:
        raise MalformedTokenError("claim cnf has no x5t#S256")
    if not certificate_thumbprint:
        raise BindingMismatchError("token is certificate-bound; no certificate was presented")
    if not _same(bound, certificate_thumbprint):
        raise BindingMismatchError("cnf.x5t#S256 does not match the presented certificate")


# ---------------------------------------------------------------------------------------------
# The whole verification


def verify_jwt_svid(
    token: str,
    *,
    lookup: KeyLookup,
    policy: VerificationPolicy,
    audiences: Sequence[str],
    now: datetime,
    expected_subject: str | None = None,
    certificate_thumbprint: str | None = None,
    require_binding: bool = False,
) -> VerifiedToken:
    """Fully verify ``token``; raises a :class:`JwtSvidError` (ValueError without audiences).

    ``audiences``: the token's ``aud`` must name one of them. ``expected_subject``: ``sub``
    must equal it. ``certificate_thumbprint``: base64url SHA-256 of the presenting peer's leaf
    DER, checked against ``cnf.x5t#S256``; ``require_binding`` refuses unbound tokens."""
    if not audiences:
        raise ValueError("at least one expected audience is required")
    parsed = parse_token(token)
    key = lookup(parsed.kid)
    if parsed.alg != key.algorithm:
        raise AlgNotAllowedError(f"header alg {parsed.alg} is not the key's algorithm")
    check_signature(key, parsed.signing_input, parsed.signature)
    claims = parse_json_object(b64url_decode(parsed.payload_b64), "payload")
    subject = check_registered_claims(claims, policy=policy, audiences=audiences, now=now)
    check_binding(
        claims,
        expected_subject=expected_subject,
        certificate_thumbprint=certificate_thumbprint,
        require_binding=require_binding,
    )
    return VerifiedToken(
        kid=key.kid,
        subject=subject,
        expires_at=int(claims["exp"]),
        claims=MappingProxyType(claims),
    )
