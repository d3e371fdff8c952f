"""The ``vault-transit`` key source: private keys never leave Vault.

Each version of the transit key is one signing key; ``transit/sign`` signs a given version,
public keys come from ``transit/keys/NAME`` (PEM for EC/RSA, raw base64 for ed25519).
Transit stores no activation time, so it is derived: the oldest version the key lists (version 1
at bootstrap) activates at its creation, later versions ``rotation.prepare_ahead`` after theirs;
every replica computes the same. Old versions stay in Vault; the ring stops publishing them once
they are removed.

The listing is the truth: a version below ``min_decryption_version`` (archived) or trimmed is
not listed and is not a key; a key that does not exist (deleted) holds none. Vault cannot delete
one version alone, only every version below one (``min_decryption_version``, then ``trim``), so
:meth:`VaultTransitKeySource.revoke` drops a version only when every older version is already
unpublished; revoking the newest version first rotates, so a fresh version takes over (it is
then the oldest listed and active at once). The signer's default policy may not trim: revoke
then answers with the operator's commands.

A key of another type than ``keys.algorithm`` is an error (no version can be used); a version
whose public key or creation time is unusable is skipped and logged (ERROR, its number).
"""

from __future__ import annotations

import base64
from collections.abc import Collection, Sequence
from datetime import timedelta
from functools import partial
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from svidgate.pki.jwt_svid import PublicKey
from svidgate.signer.errors import (
    KeyNotFoundError,
    KeySourceError,
    RevokeRefusedError,
    SourceConflictError,
    SourceDeniedError,
)
from svidgate.signer.jwt import check_key_algorithm, jwk_thumbprint
from svidgate.signer.keyring import SigningKey, later
from svidgate.signer.rotation import NewKeyPlan
from svidgate.signer.sources import BadEntry, Rejections
from svidgate.signer.vault import TRANSIT_KEY_TYPES, VaultClient, parse_vault_time


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
        self._rejections = Rejections()

    async def load(self) -> list[SigningKey]:
        data = await self.client.transit_key()
        if data is None:  # the key does not exist (vault.py tells that from an error)
            self._latest = 0
            return []
        self._latest = int(data.get("latest_version") or 0)
        self._rejections.begin()
        keys = [key for _, key in self._listed(data)]
        self._rejections.done()
        return keys

    def version_limit(self) -> int | None:
        return None

    def _listed(self, data: dict[str, Any]) -> list[tuple[int, SigningKey]]:
        """(version, key) for every version ``transit/keys/NAME`` lists, oldest first."""
        if data.get("type") != TRANSIT_KEY_TYPES[self.algorithm]:
            raise KeySourceError(
                f"{self.description}: key type {data.get('type')!r} does not fit {self.algorithm}"
            )
        listed = sorted((int(n), info) for n, info in (data.get("keys") or {}).items())
        out = []
        for version, info in listed:
            where = f"{self.description} version {version}"
            try:
                key = self._version_key(version, info, oldest=version == listed[0][0])
            except BadEntry as exc:
                self._rejections.reject(where, exc)
                continue
            out.append((version, key))
        return out

    def _version_key(self, version: int, info: object, *, oldest: bool) -> SigningKey:
        if not isinstance(info, dict):
            raise BadEntry("not a key version")
        try:
            public = parse_transit_public_key(str(info["public_key"]), self.algorithm)
            created = parse_vault_time(str(info["creation_time"]))
        except KeyError as exc:
            raise BadEntry(f"{exc.args[0]} is missing") from None
        except (KeySourceError, ValueError) as exc:
            raise BadEntry(str(exc) if isinstance(exc, KeySourceError) else "bad time") from None
        if created.utcoffset() is None:
            raise BadEntry("creation_time has no time zone")
        return SigningKey(
            kid=jwk_thumbprint(public, self.algorithm),
            algorithm=self.algorithm,
            public_key=public,
            created_at=created,
            activate_at=created if oldest else later(created, self.prepare_ahead),
            remote_sign=partial(self.client.transit_sign, self.algorithm, version),
            origin=f"{self.description} version {version}",
        )

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

    async def revoke(self, kid: str, *, keep: Collection[str]) -> None:
        """Delete ``kid``'s version and every older one (all of them unpublished, else refused)."""
        data = await self.client.transit_key()
        listed = self._listed(data) if data is not None else []
        version = next((v for v, key in listed if key.kid == kid), None)
        if data is None or version is None:
            raise KeyNotFoundError(f"{kid} is not in {self.description}")
        older = [key.kid for v, key in listed if v < version and key.kid in keep]
        if older:
            raise RevokeRefusedError(
                f"{self.description} can only drop versions from the oldest end: version "
                f"{version} ({kid}) has older versions that still verify ({', '.join(older)}); "
                "revoke those first"
            )
        try:
            await self.client.transit_config_probe(int(data.get("min_decryption_version") or 1))
        except SourceDeniedError:
            steps = self._operator_steps(version, int(data["latest_version"]))
            raise RevokeRefusedError(steps) from None
        if version == int(data["latest_version"]):
            await self.client.transit_rotate()  # a fresh version takes over
        await self.client.transit_trim(version + 1)

    def _operator_steps(self, version: int, latest: int) -> str:
        mount, name = self.client.cfg.transit_mount, self.client.cfg.transit_key
        rotate = f"bao write -f {mount}/keys/{name}/rotate; " if version == latest else ""
        return (
            f"the signer's Vault policy may not trim {mount}/keys/{name} (it needs "
            f"{mount}/keys/{name}/config and /trim): as an operator run {rotate}"
            f"bao write {mount}/keys/{name}/config min_decryption_version={version + 1} "
            f"min_encryption_version={version + 1}; bao write {mount}/keys/{name}/trim "
            f"min_available_version={version + 1} (every signer drops the key at its next poll)"
        )

    async def background(self) -> None:
        await self.client.maintain_token()

    async def close(self) -> None:
        self.client.close()
