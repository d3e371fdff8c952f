"""The JWT vectors in tests/signer/vectors/jwt (files named for their defect, see README)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from svidgate.signer import jwt as sjwt
from svidgate.signer.errors import TokenError, UnknownKidError

VECTORS = Path(__file__).resolve().parent / "vectors" / "jwt"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())


def lookup(kid: str) -> sjwt.VerificationKey:
    if kid != MANIFEST["kid"]:
        raise UnknownKidError("no such key")
    key = serialization.load_pem_private_key((VECTORS / "signing-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return sjwt.VerificationKey(kid, "ES256", key.public_key())


def test_every_vector_file_is_in_the_manifest() -> None:
    assert {p.name for p in VECTORS.glob("*.jwt")} == set(MANIFEST["expect"])


@pytest.mark.parametrize(("name", "reason"), sorted(MANIFEST["expect"].items()))
def test_vector(name: str, reason: str) -> None:
    token = (VECTORS / name).read_text().strip()
    policy = sjwt.VerifyPolicy(MANIFEST["issuer"], timedelta(seconds=30), timedelta(minutes=15))
    now = datetime.fromtimestamp(MANIFEST["now"], UTC)

    def verify() -> sjwt.VerifiedToken:
        return sjwt.verify_token(
            token, lookup=lookup, policy=policy, audiences=[MANIFEST["audience"]], now=now
        )

    if reason == "ok":
        assert verify().kid == MANIFEST["kid"]
        return
    with pytest.raises(TokenError) as info:
        verify()
    assert info.value.reason == reason
