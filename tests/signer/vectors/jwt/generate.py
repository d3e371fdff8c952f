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
KID = "vector-es256"
ISS = "spiffe://example.org/signer"
SUB = "spiffe://example.org/ns/shop/sa/web"
IAT = 1767225600  # 2026-01-01T00:00:00Z; the test verifies at IAT + 60
NOW = IAT + 60


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


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


def main() -> None:
    key = load_key()
    hdr = {"alg": "ES256", "kid": KID, "typ": "JWT"}
    claims = {"iss": ISS, "sub": SUB, "aud": "orders", "iat": IAT, "exp": IAT + 300}
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
    vectors = {
        "good.jwt": ("ok", token(key, hdr, claims)),
        "expired.jwt": ("expired", token(key, hdr, {**claims, "iat": IAT - 400, "exp": IAT - 100})),
        "issued-in-future.jwt": (
            "not_yet_valid",
            token(key, hdr, {**claims, "iat": NOW + 120, "exp": NOW + 300}),
        ),
        "wrong-signature.jwt": ("bad_signature", token(key, hdr, claims, sig=b"\x01" * 64)),
        "unknown-kid.jwt": ("unknown_kid", token(key, {**hdr, "kid": "nobody"}, claims)),
        "wrong-audience.jwt": ("bad_audience", token(key, hdr, {**claims, "aud": "payments"})),
        "wrong-issuer.jwt": (
            "bad_issuer",
            token(key, hdr, {**claims, "iss": "spiffe://evil.org/x"}),
        ),
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
            token(key, b'{"alg":"ES256","alg":"none","kid":"vector-es256"}', claims),
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
        "oversized.jwt": ("too_large", token(key, hdr, {**claims, "pad": "x" * 9000})),
        "cnf-bound-no-certificate.jwt": (
            "binding_mismatch",
            token(key, hdr, {**claims, "cnf": {"x5t#S256": b64(hashlib.sha256(b"leaf").digest())}}),
        ),
    }
    for old in HERE.glob("*.jwt"):
        old.unlink()
    for name, (_reason, text) in vectors.items():
        (HERE / name).write_text(text + "\n")
    manifest = {"kid": KID, "issuer": ISS, "audience": "orders", "now": NOW}
    manifest["expect"] = {name: reason for name, (reason, _t) in vectors.items()}
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
