"""A throwaway JWT signing key for tests of the verifiers (the pki core and the gateway's local
mode): a key pair, its public JWK, and tokens with the usual claims at a fixed time."""

from __future__ import annotations

from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from svidgate.pki.jwt_svid import VerificationKey

ISS = "spiffe://example.org/signer"
SUB = "spiffe://example.org/ns/shop/sa/web"
AUD = "orders"
NOW = 1_800_000_000.0  # Unix seconds the tokens are minted around


class Signer:
    """A key pair and its public JWK, standing in for one signer key."""

    def __init__(self, kid: str, alg: str = "ES256") -> None:
        self.kid = kid
        self.alg = alg
        if alg == "ES256":
            self.private: Any = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif alg == "EdDSA":
            self.private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk: dict[str, Any] = {**jwk, "kid": kid, "alg": alg, "use": "sig"}

    @property
    def key(self) -> VerificationKey:
        return VerificationKey(self.kid, self.alg, self.private.public_key())

    def token(self, headers: dict[str, Any] | None = None, **overrides: Any) -> str:
        """iss/sub/aud/iat/exp at NOW; an override of None removes that claim."""
        claims: dict[str, Any] = {
            "iss": ISS,
            "sub": SUB,
            "aud": AUD,
            "iat": int(NOW) - 10,
            "exp": int(NOW) + 300,
        }
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        hdr = {"kid": self.kid, **(headers or {})}
        return jwt.encode(claims, self.private, algorithm=self.alg, headers=hdr)
