#!/usr/bin/env python3
"""Regenerate the JWT test vectors in this directory (see README.md).

    .venv/bin/python tests/signer/vectors/jwt/generate.py

Keeps signing-key.pem when it exists (a test-only ES256 key), rewrites every *.jwt and
manifest.json. ECDSA signatures are randomized, so the token bytes change on every run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

HERE = Path(__file__).resolve().parent
ISS = "spiffe://example.org/signer"
SUB = "spiffe://example.org/ns/shop/sa/web"
OTHER_SUB = "spiffe://example.org/ns/shop/sa/admin"
IAT = 1767225600  # 2026-01-01T00:00:00Z; the tests verify at IAT + 60
NOW = IAT + 60
MAX_TTL = 900  # the verifier's tokens.max_ttl (15m)
SKEW = 30  # the verifier's tokens.clock_skew
MAX_TOKEN_BYTES = 8 * 1024
NEST = 2800  # levels of nesting that still fit in 8 KiB (deeper than Python's recursion limit)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


CERT = b64(hashlib.sha256(b"leaf").digest())  # x5t#S256 of the presenting certificate
OTHER_CERT = b64(hashlib.sha256(b"another leaf").digest())


def load_key() -> ec.EllipticCurvePrivateKey:
    path = HERE / "signing-key.pem"
    if not path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    return loaded


def rfc7638_kid(key: ec.EllipticCurvePrivateKey) -> str:
    """The kid the signer derives for this key (RFC 7638 thumbprint of its public JWK)."""
    numbers = key.public_key().public_numbers()
    jwk = {
        "crv": "P-256",
        "kty": "EC",
        "x": b64(numbers.x.to_bytes(32, "big")),
        "y": b64(numbers.y.to_bytes(32, "big")),
    }
    canonical = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode()
    return b64(hashlib.sha256(canonical).digest())


def es256(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def token(
    key: ec.EllipticCurvePrivateKey, header: Any, payload: Any, sig: bytes | None = None
) -> str:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    data = f"{b64(h)}.{b64(p)}".encode()
    return f"{data.decode()}.{b64(es256(key, data) if sig is None else sig)}"


def raw_claims(claims: dict[str, Any], **raw: str) -> bytes:
    """``claims`` as JSON with members whose values are raw JSON text (NaN, 1e400, ...)."""
    text = json.dumps({k: v for k, v in claims.items() if k not in raw})
    extra = "".join(f', "{name}": {value}' for name, value in raw.items())
    return (text[:-1] + extra + "}").encode()


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def structural(
    key: ec.EllipticCurvePrivateKey, hdr: dict[str, Any], claims: dict[str, Any]
) -> dict[str, tuple[str, str]]:
    """Vectors about size, structure, header and signature."""
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hs_h, hs_p = b64(json.dumps({**hdr, "alg": "HS256"}).encode()), b64(json.dumps(claims).encode())
    hs256 = (
        f"{hs_h}.{hs_p}.{b64(hmac.new(pem, f'{hs_h}.{hs_p}'.encode(), hashlib.sha256).digest())}"
    )
    ed_data = (
        f"{b64(json.dumps({**hdr, 'alg': 'EdDSA'}).encode())}.{b64(json.dumps(claims).encode())}"
    )
    ed_sig = ed25519.Ed25519PrivateKey.generate().sign(ed_data.encode())
    deep_header = json.dumps(hdr)[:-1].encode() + f', "x": {nested(NEST)}}}'.encode()
    return {
        "good.jwt": ("ok", token(key, hdr, claims)),
        "wrong-signature.jwt": ("bad_signature", token(key, hdr, claims, sig=b"\x01" * 64)),
        "unknown-kid.jwt": ("unknown_kid", token(key, {**hdr, "kid": "nobody"}, claims)),
        "alg-none.jwt": (
            "alg_not_allowed",
            f"{b64(json.dumps({**hdr, 'alg': 'none'}).encode())}.{hs_p}.",
        ),
        "alg-hs256-public-key-as-secret.jwt": ("alg_not_allowed", hs256),
        "alg-eddsa-for-es256-key.jwt": ("alg_not_allowed", f"{ed_data}.{b64(ed_sig)}"),
        "header-jku.jwt": (
            "malformed",
            token(key, {**hdr, "jku": "https://evil.org/jwks"}, claims),
        ),
        "header-x5c.jwt": ("malformed", token(key, {**hdr, "x5c": ["MIIB"]}, claims)),
        "header-crit.jwt": ("malformed", token(key, {**hdr, "crit": ["exp"]}, claims)),
        "nested-cty-jwt.jwt": ("malformed", token(key, {**hdr, "cty": "JWT"}, claims)),
        "duplicate-header-alg.jwt": (
            "malformed",
            token(key, f'{{"alg":"ES256","alg":"none","kid":"{hdr["kid"]}"}}'.encode(), claims),
        ),
        "header-deeply-nested-json.jwt": ("malformed", token(key, deep_header, claims)),
        "oversized.jwt": ("too_large", token(key, hdr, {**claims, "pad": "x" * 9000})),
    }


def claim_vectors(
    key: ec.EllipticCurvePrivateKey, hdr: dict[str, Any], claims: dict[str, Any]
) -> dict[str, tuple[str, str]]:
    """Vectors about the registered claims and the JSON that carries them."""
    return {
        "expired.jwt": ("expired", token(key, hdr, {**claims, "iat": IAT - 400, "exp": IAT - 100})),
        "issued-in-future.jwt": (
            "not_yet_valid",
            token(key, hdr, {**claims, "iat": NOW + 120, "exp": NOW + 300}),
        ),
        "not-before-in-future.jwt": (
            "not_yet_valid",
            token(key, hdr, {**claims, "nbf": NOW + 120}),
        ),
        "wrong-audience.jwt": ("bad_audience", token(key, hdr, {**claims, "aud": "payments"})),
        "wrong-issuer.jwt": (
            "bad_issuer",
            token(key, hdr, {**claims, "iss": "spiffe://evil.org/x"}),
        ),
        "duplicate-claim-sub.jwt": (
            "malformed",
            token(
                key,
                hdr,
                json.dumps(claims)[:-1].encode() + b', "sub": "spiffe://example.org/admin"}',
            ),
        ),
        "missing-exp.jwt": (
            "malformed",
            token(key, hdr, {k: v for k, v in claims.items() if k != "exp"}),
        ),
        "lifetime-at-max-ttl.jwt": ("ok", token(key, hdr, {**claims, "exp": IAT + MAX_TTL})),
        "lifetime-beyond-max-ttl.jwt": (
            "malformed",
            token(key, hdr, {**claims, "exp": IAT + MAX_TTL + 1}),
        ),
        "claim-deeply-nested-json.jwt": (
            "malformed",
            token(key, hdr, raw_claims(claims, x=nested(NEST))),
        ),
        "claim-nested-65-levels.jwt": (
            "malformed",
            token(key, hdr, raw_claims(claims, x=nested(64))),
        ),
        "claim-nested-64-levels.jwt": ("ok", token(key, hdr, raw_claims(claims, x=nested(63)))),
        "exp-nan.jwt": ("malformed", token(key, hdr, raw_claims(claims, exp="NaN"))),
        "exp-infinity.jwt": ("malformed", token(key, hdr, raw_claims(claims, exp="Infinity"))),
        "iat-minus-infinity.jwt": (
            "malformed",
            token(key, hdr, raw_claims(claims, iat="-Infinity")),
        ),
        "nbf-nan.jwt": ("malformed", token(key, hdr, raw_claims(claims, nbf="NaN"))),
        "exp-1e400-overflows-float.jwt": (
            "malformed",
            token(key, hdr, raw_claims(claims, exp="1e400")),
        ),
        "exp-400-digit-integer.jwt": (
            "malformed",
            token(key, hdr, raw_claims(claims, exp="9" * 400)),
        ),
        "exp-after-year-9999.jwt": ("malformed", token(key, hdr, {**claims, "exp": 253402300800})),
        "exp-boolean.jwt": ("malformed", token(key, hdr, {**claims, "exp": True})),
        "extra-claim-nan.jwt": ("malformed", token(key, hdr, raw_claims(claims, score="NaN"))),
        "cnf-bound.jwt": (
            "binding_mismatch",
            token(key, hdr, {**claims, "cnf": {"x5t#S256": CERT}}),
        ),
        "cnf-without-x5t.jwt": ("malformed", token(key, hdr, {**claims, "cnf": {"jkt": CERT}})),
        "cnf-null.jwt": ("malformed", token(key, hdr, {**claims, "cnf": None})),
    }


def binding_cases() -> dict[str, dict[str, Any]]:
    """The same tokens verified with the connection's identity: subject and cnf binding."""
    sub, other_sub = {"expected_subject": SUB}, {"expected_subject": OTHER_SUB}
    cert, other, req = (
        {"certificate_thumbprint": CERT},
        {"certificate_thumbprint": OTHER_CERT},
        {"require_binding": True},
    )
    cases = {
        "subject-match": ("good.jwt", "ok", sub),
        "subject-mismatch": ("good.jwt", "bad_subject", other_sub),
        "cnf-absent-with-certificate": ("good.jwt", "ok", cert),
        "cnf-absent-required": ("good.jwt", "binding_mismatch", {**cert, **req}),
        "cnf-absent-required-no-certificate": ("good.jwt", "binding_mismatch", req),
        "cnf-present-matching": ("cnf-bound.jwt", "ok", cert),
        "cnf-present-matching-required": ("cnf-bound.jwt", "ok", {**cert, **req}),
        "cnf-present-mismatch": ("cnf-bound.jwt", "binding_mismatch", other),
        "cnf-present-mismatch-required": ("cnf-bound.jwt", "binding_mismatch", {**other, **req}),
        "cnf-present-no-certificate-required": ("cnf-bound.jwt", "binding_mismatch", req),
        "cnf-present-matching-subject-match": ("cnf-bound.jwt", "ok", {**sub, **cert, **req}),
        "cnf-present-matching-subject-mismatch": (
            "cnf-bound.jwt",
            "bad_subject",
            {**other_sub, **cert},
        ),
        "cnf-without-x5t-with-certificate": ("cnf-without-x5t.jwt", "malformed", cert),
        "cnf-null-required": ("cnf-null.jwt", "malformed", {**cert, **req}),
    }
    return {name: {"token": f, "reason": r, **opts} for name, (f, r, opts) in cases.items()}


def main() -> None:
    key = load_key()
    kid = rfc7638_kid(key)
    hdr = {"alg": "ES256", "kid": kid, "typ": "JWT"}
    claims = {"iss": ISS, "sub": SUB, "aud": "orders", "iat": IAT, "exp": IAT + 300}
    vectors = {**structural(key, hdr, claims), **claim_vectors(key, hdr, claims)}
    for name, (_reason, text) in vectors.items():
        assert name == "oversized.jwt" or len(text) <= MAX_TOKEN_BYTES, name
    for old in HERE.glob("*.jwt"):
        old.unlink()
    for name, (_reason, text) in vectors.items():
        (HERE / name).write_text(text + "\n")
    cases = {
        name.removesuffix(".jwt"): {"token": name, "reason": r} for name, (r, _t) in vectors.items()
    }
    manifest = {
        "kid": kid,
        "issuer": ISS,
        "audience": "orders",
        "now": NOW,
        "key_activated_at": IAT - 3600,
        "max_ttl_seconds": MAX_TTL,
        "clock_skew_seconds": SKEW,
        "cases": {**cases, **binding_cases()},
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
