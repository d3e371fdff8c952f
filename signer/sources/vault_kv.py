"""The ``vault-kv`` key source: one KV v2 secret; each version is one key.

A version holds ``{kid, alg, private_key (PEM), created_at, activate_at}``. New keys are written
with check-and-set on the current version, so concurrent replicas cannot both rotate; the loser
reloads and plans again. Versions are immutable, so each is read once and cached.

What the metadata says is the truth: a version that is destroyed, or deleted (its
``deletion_time`` has passed), is not a key, and metadata that does not exist (never written,
or deleted with ``kv metadata delete``) holds no key. Removed and revoked keys are destroyed, so
every replica sees them gone at its next read. Anything Vault cannot answer is an error; a
version whose data is not a usable key of ``keys.algorithm`` is skipped and logged (ERROR, its
number) and the others load.

KV v2 keeps ``max_versions`` versions (the secret's, else the mount's, else 10) and prunes the
oldest on each write, destroyed ones included. :meth:`VaultKvKeySource.create` refuses a write
that would prune a version holding a published key (SourceCapacityError): the ring never loses
a key that still verifies to a rotation.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from svidgate.signer.errors import (
    KeyNotFoundError,
    KeySourceError,
    SourceCapacityError,
    SourceDeniedError,
)
from svidgate.signer.keygen import (
    generate_signing_key,
    local_signing_key,
    parse_private_key,
    private_key_pem,
)
from svidgate.signer.keyring import SigningKey
from svidgate.signer.rotation import NewKeyPlan
from svidgate.signer.sources import (
    BadEntry,
    Rejections,
    check_algorithm,
    kid_field,
    log,
    text_field,
    time_field,
)
from svidgate.signer.vault import VaultClient, parse_vault_time

KV_DEFAULT_MAX_VERSIONS = 10  # what KV v2 keeps when neither the secret nor the mount says


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
        # versions are immutable: each is read once; a bad one is remembered with its problem
        self._cache: dict[tuple[int, str], SigningKey | BadEntry] = {}
        self._versions: dict[str, list[int]] = {}
        self._max_versions: int | None = None
        self._mount_max: int | None = None  # the mount's max_versions, read once
        self._rejections = Rejections()

    async def load(self) -> list[SigningKey]:
        meta = await self.client.kv_metadata()
        if meta is None:  # the metadata does not exist (vault.py tells that from an error)
            self._current_version = 0
            self._cache, self._versions, self._max_versions = {}, {}, None
            return []
        self._current_version = int(meta.get("current_version") or 0)
        self._max_versions = int(meta.get("max_versions") or 0) or await self._mount_limit()
        now = datetime.now(UTC)
        keys: list[SigningKey] = []
        versions: dict[str, list[int]] = {}
        cache: dict[tuple[int, str], SigningKey | BadEntry] = {}
        self._rejections.begin()
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
            if isinstance(key, BadEntry):
                self._rejections.reject(self._where(version), key)
                continue
            if key.kid not in versions:
                keys.append(key)
            versions.setdefault(key.kid, []).append(version)
        self._rejections.done()
        self._cache, self._versions = cache, versions
        return keys

    async def _mount_limit(self) -> int:
        """The mount's max_versions (the secret sets none): read once; KV's default when the
        policy may not read it."""
        if self._mount_max is None:
            try:
                limit = await self.client.kv_mount_max_versions()
            except SourceDeniedError:
                log.warning(
                    "%s: the policy may not read %s/config: assuming KV's default of %d versions",
                    self.description,
                    self.client.cfg.kv_mount,
                    KV_DEFAULT_MAX_VERSIONS,
                )
                limit = 0
            self._mount_max = limit or KV_DEFAULT_MAX_VERSIONS
        return self._mount_max

    def version_limit(self) -> int | None:
        return self._max_versions

    def _where(self, version: int) -> str:
        return f"{self.description} version {version}"

    def _parse(self, data: object, version: int) -> SigningKey | BadEntry:
        """The key a version holds, or the BadEntry saying why it holds none."""
        try:
            if not isinstance(data, dict):
                raise BadEntry("not a key entry")
            alg = check_algorithm(data, self.algorithm)
            kid = kid_field(data)
            pem = text_field(data, "private_key").encode()
            created, activate = time_field(data, "created_at"), time_field(data, "activate_at")
            try:
                private = parse_private_key(pem, alg, "private_key")
            except KeySourceError as exc:
                raise BadEntry(str(exc)) from None
            key = local_signing_key(private, alg, created, activate)
            if key.kid != kid:
                raise BadEntry("kid does not match its key")
        except BadEntry as exc:
            return exc
        return replace(key, origin=self._where(version))

    def _check_capacity(self, keep: Collection[str]) -> None:
        """SourceCapacityError when writing the next version would prune one holding a kid in
        ``keep`` (KV keeps the newest ``max_versions`` versions)."""
        limit = self._max_versions
        if not limit:
            return  # no secret yet: nothing to prune
        following = self._current_version + 1
        oldest_kept = following - limit + 1
        held = sorted((max(self._versions[k]), k) for k in keep if k in self._versions)
        if held and held[0][0] < oldest_kept:
            version, kid = held[0]
            need = following - version + 1
            mount, path = self.client.cfg.kv_mount, self.client.cfg.kv_path
            raise SourceCapacityError(
                f"{self.description} keeps {limit} versions (max_versions): writing version "
                f"{following} would prune version {version}, which holds key {kid} (still "
                f"published); set at least {need} with: bao kv metadata put -mount={mount} "
                f"-max-versions={need} {path}"
            )

    async def create(self, plan: NewKeyPlan) -> SigningKey:
        self._check_capacity(plan.keep)
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
