"""The signer's JWT minting core (signer.jwt): Sign→Verify per algorithm through the shared
verifier (pki.jwt_svid), extra claims, keys and thumbprints, interop with pyjwt. Every
verification rule is tested in tests/pki/test_pki_jwt_svid.py and by the vectors."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from svidgate.pki.jose import ALGORITHMS
from svidgate.pki.jwt_svid import (
    UnknownKidError,
    VerificationKey,
    VerificationPolicy,
    VerifiedToken,
    verify_jwt_svid,
)
from svidgate.signer import jwt as sjwt
from svidgate.signer.errors import InvalidRequestError

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
ISS = "spiffe://example.org/signer"
SUB = "spiffe://example.org/ns/shop/sa/web"
POLICY = VerificationPolicy(ISS, timedelta(seconds=30), timedelta(minutes=15))


def _key(alg: str) -> sjwt.PrivateKey:
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


KEYS = {alg: _key(alg) for alg in ALGORITHMS}


def claims(**overrides: Any) -> dict[str, Any]:
    base = sjwt.build_claims(
        issuer=ISS, subject=SUB, audience=["orders"], now=NOW, ttl=timedelta(minutes=5)
    )
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(alg: str = "ES256", claim_set: dict[str, Any] | None = None) -> str:
    data = sjwt.signing_input(alg, "k1", claims() if claim_set is None else claim_set)
    return sjwt.assemble(data, sjwt.sign_local(alg, KEYS[alg], data))


def verify(token: str, *, alg: str = "ES256", **kw: Any) -> VerifiedToken:
    def lookup(kid: str) -> VerificationKey:
        if kid != "k1":
            raise UnknownKidError("no such key")
        return VerificationKey("k1", alg, KEYS[alg].public_key())

    kw.setdefault("audiences", ["orders"])
    return verify_jwt_svid(token, lookup=lookup, policy=POLICY, now=NOW, **kw)


@pytest.mark.parametrize("alg", ALGORITHMS)
def test_sign_then_verify_each_algorithm(alg: str) -> None:
    result = verify(mint(alg), alg=alg)
    assert result.subject == SUB
    assert result.expires_at == int(NOW.timestamp()) + 300


def test_minted_header_and_claims() -> None:
    token = mint()
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"alg": "ES256", "kid": "k1", "typ": "JWT"}
    bound = sjwt.build_claims(
        issuer=ISS,
        subject=SUB,
        audience=["a", "b"],
        now=NOW,
        ttl=timedelta(seconds=0),
        thumbprint="T" * 43,
    )
    assert bound["aud"] == ["a", "b"] and bound["exp"] - bound["iat"] == 1
    assert bound["cnf"] == {"x5t#S256": "T" * 43}
    with pytest.raises(InvalidRequestError):
        sjwt.build_claims(issuer=ISS, subject=SUB, audience=[""], now=NOW, ttl=timedelta(1))


def test_extra_claims_cannot_override_registered() -> None:
    with pytest.raises(Exception, match="registered claims"):
        sjwt.parse_extra_claims('{"sub": "spiffe://example.org/admin"}')
    with pytest.raises(Exception, match="duplicate"):
        sjwt.parse_extra_claims('{"a": 1, "a": 2}')
    assert sjwt.parse_extra_claims('{"scope": "read"}') == {"scope": "read"}


@pytest.mark.parametrize(
    "text", ['{"score": NaN}', '{"score": Infinity}', '{"x": 1e400}', '{"x": ' + "[" * 5000 + "}"]
)
def test_extra_claims_no_verifier_would_accept_are_refused(text: str) -> None:
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        sjwt.parse_extra_claims(text)


def test_key_type_must_fit_algorithm() -> None:
    sjwt.check_key_algorithm("ES256", KEYS["ES256"].public_key())
    with pytest.raises(ValueError, match="does not fit"):
        sjwt.check_key_algorithm("ES256", KEYS["EdDSA"].public_key())
    with pytest.raises(ValueError, match="does not fit"):
        sjwt.check_key_algorithm("RS256", ec.generate_private_key(ec.SECP384R1()))


def test_jwk_thumbprint_is_stable_per_key() -> None:
    pub = KEYS["ES256"].public_key()
    assert sjwt.jwk_thumbprint(pub, "ES256") == sjwt.jwk_thumbprint(pub, "ES256")
    assert sjwt.jwk_thumbprint(pub, "ES256") != sjwt.jwk_thumbprint(
        KEYS["EdDSA"].public_key(), "EdDSA"
    )
    jwk = sjwt.verification_jwk("k1", "ES256", pub)
    assert jwk["kid"] == "k1" and jwk["alg"] == "ES256" and "d" not in jwk
    assert jwk["use"] == "sig"


def test_es256_interoperates_with_pyjwt_both_ways() -> None:
    import jwt as pyjwt

    key = KEYS["ES256"]
    ours = mint()
    decoded = pyjwt.decode(
        ours,
        key.public_key(),
        algorithms=["ES256"],
        audience="orders",
        issuer=ISS,
        options={"verify_exp": False},  # NOW is a fixed past date
    )
    assert decoded["sub"] == SUB
    theirs = pyjwt.encode(claims(), key, algorithm="ES256", headers={"kid": "k1"})
    assert verify(theirs).subject == SUB


def test_es256_needs_a_p256_key() -> None:
    with pytest.raises(ValueError, match="P-256"):
        sjwt.sign_local("ES256", ec.generate_private_key(ec.SECP384R1()), b"data")
