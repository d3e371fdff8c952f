"""Local signing keys: generation per algorithm and PEM (de)serialization (file and vault-kv)."""

from __future__ import annotations

from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from svidgate.signer.errors import KeySourceError
from svidgate.signer.jwt import PrivateKey, check_key_algorithm, jwk_thumbprint
from svidgate.signer.keyring import SigningKey


def generate_signing_key(algorithm: str) -> PrivateKey:
    """A new private JWS signing key for ``algorithm`` (RSA: 2048 bits)."""
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise KeySourceError(f"unsupported algorithm {algorithm!r}")


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def parse_private_key(pem: bytes, algorithm: str, where: str) -> PrivateKey:
    """A PEM private key that must fit ``algorithm``; errors name ``where``, never the key."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise KeySourceError(f"{where}: not a readable PEM private key") from None
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise KeySourceError(f"{where}: unsupported key type {type(key).__name__}")
    try:
        check_key_algorithm(algorithm, key)
    except ValueError as exc:
        raise KeySourceError(f"{where}: {exc}") from None
    return key


def local_signing_key(
    key: PrivateKey, algorithm: str, created_at: datetime, activate_at: datetime
) -> SigningKey:
    public = key.public_key()
    return SigningKey(
        kid=jwk_thumbprint(public, algorithm),
        algorithm=algorithm,
        public_key=public,
        created_at=created_at,
        activate_at=activate_at,
        private_key=key,
    )
