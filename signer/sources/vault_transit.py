"""The ``vault-transit`` key source: private keys never leave Vault.

Each version of the transit key is one signing key; ``transit/sign`` signs a given version,
public keys come from ``transit/keys/NAME`` (PEM for EC/RSA, raw base64 for ed25519).
Transit stores no activation time, so it is derived: version 1 (bootstrap) activates at its
creation, later versions ``rotation.prepare_ahead`` after theirs; every replica computes the same.
Old versions stay in Vault; the ring stops publishing them once they are removed.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import partial

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from svidgate.pki.jwt_svid import PublicKey
from svidgate.signer.errors import KeySourceError, SourceConflictError
from svidgate.signer.jwt import check_key_algorithm, jwk_thumbprint
from svidgate.signer.keyring import SigningKey
from svidgate.signer.rotation import NewKeyPlan
from svidgate.signer.vault import TRANSIT_KEY_TYPES, VaultClient

_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_vault_time(text: str) -> datetime:
    """Vault's RFC 3339 times carry nanoseconds; Python takes microseconds."""
    return datetime.fromisoformat(_FRACTION.sub(r"\1", text).replace("Z", "+00:00"))


def parse_transit_public_key(text: str, algorithm: str) -> PublicKey:
    try:
        if algorithm == "EdDSA":
            key: object = ed25519.Ed25519PublicKey.from_public_bytes(base64.b64decode(text))
        else:
            key = serialization.load_pem_public_key(text.encode())
    except ValueError:
        raise KeySourceError("transit returned an unreadable public key") from None
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise KeySourceError("transit returned an unsupported public key")
    try:
        check_key_algorithm(algorithm, key)
    except ValueError as exc:
        raise KeySourceError(f"transit key: {exc}") from None
    return key


class VaultTransitKeySource:
    def __init__(self, client: VaultClient, algorithm: str, prepare_ahead: timedelta) -> None:
        self.client = client
        self.algorithm = algorithm
        self.prepare_ahead = prepare_ahead
        self.description = f"vault-transit:{client.cfg.transit_mount}/{client.cfg.transit_key}"
        self._latest = 0

    async def load(self) -> list[SigningKey]:
        data = await self.client.transit_key()
        if data is None:
            self._latest = 0
            return []
        if data.get("type") != TRANSIT_KEY_TYPES[self.algorithm]:
            raise KeySourceError(
                f"{self.description}: key type {data.get('type')!r} does not fit {self.algorithm}"
            )
        self._latest = int(data.get("latest_version") or 0)
        keys = []
        for number, info in (data.get("keys") or {}).items():
            version = int(number)
            public = parse_transit_public_key(str(info["public_key"]), self.algorithm)
            created = parse_vault_time(str(info["creation_time"]))
            activate = created if version == 1 else created + self.prepare_ahead
            keys.append(
                SigningKey(
                    kid=jwk_thumbprint(public, self.algorithm),
                    algorithm=self.algorithm,
                    public_key=public,
                    created_at=created,
                    activate_at=activate,
                    remote_sign=partial(self.client.transit_sign, self.algorithm, version),
                )
            )
        return keys

    async def create(self, plan: NewKeyPlan) -> SigningKey:
        before = self._latest
        current = await self.client.transit_key()
        latest = int(current.get("latest_version") or 0) if current else 0
        if latest != before:
            raise SourceConflictError("transit key changed since the last read")
        if current is None:
            # version 1 activates at its creation (see the module doc): right for a bootstrap;
            # after Vault lost the key it is the best that can be done
            await self.client.transit_create(self.algorithm)
        else:
            await self.client.transit_rotate()
        keys = await self.load()
        return max(keys, key=lambda k: k.created_at)

    async def remove(self, kids: Sequence[str]) -> None:
        return None

    async def background(self) -> None:
        await self.client.maintain_token()

    async def close(self) -> None:
        self.client.close()
