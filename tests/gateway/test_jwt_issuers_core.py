"""The pure parts of gateway/jwt_issuers.py: which issuer a token selects, and how another
issuer's JWKS / SPIFFE bundle becomes a key set (no sockets)."""

from __future__ import annotations

import json

import pytest
from support.jwt_keys import Signer as KeyPair
from svidgate.gateway.errors import TokenRejected
from svidgate.gateway.jwt_issuers import Candidate, TokenOrigin, select_issuer, token_origin
from svidgate.gateway.signer_client import KeySet, KeySetError
from svidgate.pki.jwt_svid import JwtSvidError

SIGNER = Candidate("signer", "spiffe://example.org/signer", None)
SPIRE = Candidate("spire", None, "example.org")
PARTNER = Candidate("partner", "https://partner.example", "partner.org")
ALL = (SIGNER, SPIRE, PARTNER)


@pytest.mark.parametrize(
    ("origin", "accepted", "chosen"),
    [
        # iss first: the signer's tokens share example.org with SPIRE
        (TokenOrigin("spiffe://example.org/signer", "example.org"), {"signer", "spire"}, "signer"),
        (TokenOrigin(None, "example.org"), {"signer", "spire"}, "spire"),
        (TokenOrigin("https://partner.example", "example.org"), {"partner"}, "partner"),
        # nothing matches: the signer answers if the route takes it (bad_issuer there)
        (TokenOrigin("https://unknown", "nowhere.org"), {"signer"}, "signer"),
        # an issuer with `issuer` set is not selected by trust domain alone
        (TokenOrigin(None, "partner.org"), {"signer", "partner"}, "signer"),
    ],
)
def test_selection(origin: TokenOrigin, accepted: set[str], chosen: str) -> None:
    assert select_issuer(origin, ALL, accepted) == chosen


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        (TokenOrigin(None, "example.org"), {"signer"}),  # SPIRE's token, signer-only route
        (TokenOrigin("spiffe://example.org/signer", "example.org"), {"spire"}),
        (TokenOrigin("https://unknown", "nowhere.org"), {"spire", "partner"}),
    ],
)
def test_selection_refuses_issuers_the_route_does_not_list(
    origin: TokenOrigin, accepted: set[str]
) -> None:
    with pytest.raises(TokenRejected) as err:
        select_issuer(origin, ALL, accepted)
    assert err.value.reason == "issuer_not_allowed"


def test_token_origin_reads_claims_without_trusting_them() -> None:
    token = KeyPair("k").token(iss=None, sub="spiffe://third.org/x")
    assert token_origin(token) == TokenOrigin(None, "third.org")
    token = KeyPair("k").token(sub="not a spiffe id")
    assert token_origin(token).trust_domain is None
    with pytest.raises(JwtSvidError):
        token_origin("a.b")


def test_bundle_key_sets_skip_what_cannot_verify_jwts() -> None:
    es, ed, rs = KeyPair("es"), KeyPair("ed", "EdDSA"), KeyPair("rs", "RS256")
    bare = ("alg", "use")
    members = [{k: v for k, v in key.jwk.items() if k not in bare} for key in (es, ed, rs)]
    doc = {
        "keys": [
            *[{**m, "use": "jwt-svid"} for m in members],
            {**es.jwk, "kid": "x509", "use": "x509-svid"},  # an X.509 authority
            {**es.jwk, "kid": "enc", "use": "enc"},
            {**es.jwk, "kid": "es384", "alg": "ES384"},  # an algorithm svidgate never takes
        ],
        "spiffe_sequence": 7,
    }
    keyset = KeySet.parse(json.dumps(doc), 1, bundle=True)
    assert {kid: key.algorithm for kid, key in keyset.keys.items()} == {
        "es": "ES256",
        "ed": "EdDSA",
        "rs": "RS256",
    }
    # the signer's own JWKS stays strict: no alg is an error there
    with pytest.raises(KeySetError):
        KeySet.parse(json.dumps({"keys": members[:1]}), 1)
    # private key material is never accepted, in either form
    leaked = {**es.jwk, "d": "AAAA"}
    with pytest.raises(KeySetError, match="private"):
        KeySet.parse(json.dumps({"keys": [leaked]}), 1, bundle=True)
    with pytest.raises(KeySetError, match="duplicate"):
        KeySet.parse(json.dumps({"keys": [es.jwk, es.jwk]}), 1, bundle=True)
