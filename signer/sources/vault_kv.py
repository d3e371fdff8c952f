"""The ``vault-kv`` key source: one KV v2 secret; each version is one key.

A version holds ``{kid, alg, private_key (PEM), created_at, activate_at}``. New keys are written
with check-and-set on the current version, so concurrent replicas cannot both rotate; the loser
reloads and plans again. Versions are immutable, so each is read once and cached.

What the metadata says is the truth: a version that is destroyed, or deleted (its
``deletion_time`` has passed), is not a key, and metadata that does not exist (never written,
or deleted with ``kv metadata delete``) holds no key. Removed and revoked keys are destroyed, so
every replica sees them gone at its next read. Anything Vault cannot answer is an error.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import UTC, datetime
from typing import Any

from svidgate.signer.errors import KeyNotFoundError, KeySourceError
from svidgate.signer.keygen import (
    generate_signing_key,
    local_signing_key,
    parse_private_key,
    private_key_pem,
)
from svidgate.signer.keyring import SigningKey
from svidgate.signer.rotation import NewKeyPlan
from svidgate.signer.vault import VaultClient, parse_vault_time


def version_is_gone(info: dict[str, Any], now: datetime) -> bool:
    """A KV v2 version's metadata says it is destroyed or deleted (a deletion time may lie in
    the future with ``delete_version_after``: the version is there until then)."""
    if info.get("destroyed"):
        return True
    deletion = info.get("deletion_time")
    return bool(deletion) and parse_vault_time(str(deletion)) <= now


class VaultKvKeySource:
    def __init__(self, client: VaultClient, algorithm: str) -> None:
        self.client = client
        self.algorithm = algorithm
        self.description = f"vault-kv:{client.cfg.kv_mount}/{client.cfg.kv_path}"
        self._current_version = 0
        self._cache: dict[tuple[int, str], SigningKey] = {}
        self._versions: dict[str, list[int]] = {}

    async def load(self) -> list[SigningKey]:
        meta = await self.client.kv_metadata()
        if meta is None:  # the metadata does not exist (vault.py tells that from an error)
            self._current_version = 0
            self._cache, self._versions = {}, {}
            return []
        self._current_version = int(meta.get("current_version") or 0)
        now = datetime.now(UTC)
        keys: list[SigningKey] = []
        versions: dict[str, list[int]] = {}
        cache: dict[tuple[int, str], SigningKey] = {}
        for number, info in sorted((meta.get("versions") or {}).items(), key=lambda i: int(i[0])):
            if version_is_gone(info, now):
                continue
            version = int(number)
            cache_key = (version, str(info.get("created_time")))
            key = self._cache.get(cache_key)
            if key is None:
                data = await self.client.kv_read(version)
                if data is None:
                    continue
                key = self._parse(data, version)
            cache[cache_key] = key
            if key.kid not in versions:
                keys.append(key)
            versions.setdefault(key.kid, []).append(version)
        self._cache, self._versions = cache, versions
        return keys

    def _parse(self, data: dict[str, object], version: int) -> SigningKey:
        where = f"{self.description} version {version}"
        try:
            alg = str(data["alg"])
            pem = str(data["private_key"]).encode()
            created = datetime.fromisoformat(str(data["created_at"]))
            activate = datetime.fromisoformat(str(data["activate_at"]))
        except (KeyError, ValueError):
            raise KeySourceError(f"{where}: not a signing key entry") from None
        key = local_signing_key(parse_private_key(pem, alg, where), alg, created, activate)
        if key.kid != data.get("kid"):
            raise KeySourceError(f"{where}: key does not match its kid")
        return key

    async def create(self, plan: NewKeyPlan) -> SigningKey:
        private = generate_signing_key(self.algorithm)
        key = local_signing_key(private, self.algorithm, plan.created_at, plan.activate_at)
        version = await self.client.kv_write(
            {
                "kid": key.kid,
                "alg": key.algorithm,
                "private_key": private_key_pem(private).decode(),
                "created_at": key.created_at.isoformat(),
                "activate_at": key.activate_at.isoformat(),
            },
            cas=self._current_version,
        )
        self._current_version = version
        return key

    async def remove(self, kids: Sequence[str]) -> None:
        versions = [v for kid in kids for v in self._versions.get(kid, ())]
        if versions:
            await self.client.kv_destroy(versions)

    async def revoke(self, kid: str, *, keep: Collection[str]) -> None:
        """Destroy every version holding ``kid`` (as of the last load); nothing else."""
        if kid not in self._versions:
            raise KeyNotFoundError(f"{kid} is not in {self.description}")
        await self.client.kv_destroy(list(self._versions[kid]))

    async def background(self) -> None:
        await self.client.maintain_token()

    async def close(self) -> None:
        self.client.close()
