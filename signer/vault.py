"""The signer's only door to Vault / OpenBao: the only module that imports hvac.

hvac is synchronous (requests), so every call runs in a worker thread. Foreign exceptions are
translated here, where they enter: unreachable → SourceUnavailableError, check-and-set mismatch →
SourceConflictError, a 403 that a fresh login does not cure → SourceDeniedError, anything else →
KeySourceError. A 404 means "does not exist" only when Vault says nothing more (``errors: []``,
e.g. KV metadata or a Transit key that was never written or was deleted); a 404 with an error
("no handler for route": a missing mount, a wrong path) is an error, never an empty source.
A 403 (token expired or revoked) triggers one re-login and a retry. A background task renews
the token before it expires and logs in again when renewal fails or the token reached its max
TTL. Tokens never appear in messages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import re
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from svidgate.signer.config import VaultConfig
from svidgate.signer.errors import (
    KeySourceError,
    SourceConflictError,
    SourceDeniedError,
    SourceUnavailableError,
)

log = logging.getLogger("svidgate.signer.vault")
T = TypeVar("T")

_FRACTION = re.compile(r"(\.\d{6})\d+")

TRANSIT_KEY_TYPES = {
    "EdDSA": "ed25519",
    "ES256": "ecdsa-p256",
    "RS256": "rsa-2048",
    "PS256": "rsa-2048",
}


def parse_vault_time(text: str) -> datetime:
    """Vault's RFC 3339 times carry nanoseconds; Python takes microseconds."""
    return datetime.fromisoformat(_FRACTION.sub(r"\1", text).replace("Z", "+00:00"))


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise KeySourceError(f"{what} {path}: cannot read ({exc.strerror})") from None
    if not value:
        raise KeySourceError(f"{what} {path}: empty")
    return value


class VaultClient:
    """An authenticated hvac client with token renewal; every method is a coroutine."""

    def __init__(self, cfg: VaultConfig, *, env_token: str | None = None) -> None:
        self.cfg = cfg
        self._env_token = env_token
        verify: bool | str = str(cfg.ca_cert) if cfg.ca_cert is not None else True
        self._client = hvac.Client(
            url=cfg.address,
            timeout=max(1, int(cfg.timeout.total_seconds())),
            verify=verify,
            namespace=cfg.namespace,
        )
        self._login_lock = asyncio.Lock()
        self.logins = 0
        self.renewals = 0

    # -- translation of foreign errors --------------------------------------------------------

    async def _run(self, fn: Callable[[], T], what: str) -> T:
        try:
            return await asyncio.to_thread(fn)
        except (requests.ConnectionError, requests.Timeout, hvac.exceptions.VaultDown) as exc:
            raise SourceUnavailableError(f"vault unreachable during {what}") from exc
        except (hvac.exceptions.InternalServerError, hvac.exceptions.BadGateway) as exc:
            raise SourceUnavailableError(f"vault error during {what}") from exc
        except hvac.exceptions.InvalidRequest as exc:
            if "check-and-set" in str(exc):
                raise SourceConflictError(f"{what}: another writer was first") from None
            raise KeySourceError(f"vault refused {what}: {_first_error(exc)}") from None
        except hvac.exceptions.Forbidden:
            raise
        except hvac.exceptions.VaultError as exc:
            raise KeySourceError(f"vault refused {what}: {_first_error(exc)}") from None

    async def call(self, fn: Callable[[hvac.Client], T], what: str) -> T:
        """Run ``fn(client)`` off the loop; on 403 log in again once and retry."""
        try:
            return await self._run(lambda: fn(self._client), what)
        except hvac.exceptions.Forbidden:
            await self.login()
            try:
                return await self._run(lambda: fn(self._client), what)
            except hvac.exceptions.Forbidden:
                raise SourceDeniedError(f"vault denied {what} (check the policy)") from None

    # -- authentication -----------------------------------------------------------------------

    def _login_sync(self) -> None:
        auth = self.cfg.auth
        if auth.method == "token":
            if auth.token_file is not None:
                token = _read_secret_file(auth.token_file, "vault token file")
            elif self._env_token:
                token = self._env_token
            else:
                raise KeySourceError("keys.vault.auth: no token (set token_file or VAULT_TOKEN)")
            self._client.token = token
        elif auth.method == "approle":
            assert auth.secret_id_file is not None  # checked by the config
            secret_id = _read_secret_file(auth.secret_id_file, "approle secret_id file")
            self._client.auth.approle.login(
                role_id=auth.role_id, secret_id=secret_id, mount_point=auth.mount or "approle"
            )
        else:
            jwt = _read_secret_file(auth.jwt_file, "kubernetes service account token")
            self._client.auth.kubernetes.login(
                role=auth.role, jwt=jwt, mount_point=auth.mount or "kubernetes"
            )

    async def login(self) -> None:
        """(Re-)acquire a token with the configured auth method."""
        async with self._login_lock:
            try:
                await self._run(self._login_sync, "login")
            except hvac.exceptions.Forbidden:
                raise KeySourceError("vault login denied") from None
            self.logins += 1

    async def token_info(self) -> dict[str, Any]:
        """``auth/token/lookup-self`` data (ttl, renewable, accessor…)."""
        result = await self.call(lambda c: c.auth.token.lookup_self(), "token lookup")
        data: dict[str, Any] = result["data"]
        return data

    async def renew_forever(self, *, retry_after: float = 1.0) -> None:
        """Renew the token at half its TTL; log in again when renewal fails or cannot extend
        it (max TTL reached). Errors are logged and retried: the key cache stays in use."""
        while True:
            try:
                info = await self.token_info()
                ttl = int(info.get("ttl") or 0)
                if ttl <= 0:  # a token without expiry (root / periodic none): nothing to do
                    await asyncio.sleep(30)
                    continue
                await asyncio.sleep(max(0.2, ttl / 2))
                renewed_ttl = 0
                if info.get("renewable"):
                    try:
                        result = await self.call(lambda c: c.auth.token.renew_self(), "renew")
                        renewed_ttl = int(result["auth"]["lease_duration"])
                        self.renewals += 1
                    except KeySourceError:
                        renewed_ttl = 0
                if renewed_ttl < max(1, ttl // 2):
                    log.info("vault token cannot be renewed further: logging in again")
                    await self.login()
            except asyncio.CancelledError:
                raise
            except KeySourceError as exc:
                log.warning("vault token maintenance failed: %s", exc)
                await asyncio.sleep(retry_after)
                with contextlib.suppress(KeySourceError):
                    await self.login()

    async def maintain_token(self) -> None:
        """Log in (retrying while Vault is unreachable), then renew forever."""
        while True:
            try:
                await self.login()
                break
            except KeySourceError as exc:
                log.warning("vault login failed: %s", exc)
                await asyncio.sleep(1.0)
        await self.renew_forever()

    def close(self) -> None:
        self._client.adapter.close()

    # -- KV v2 --------------------------------------------------------------------------------

    async def kv_metadata(self) -> dict[str, Any] | None:
        """The secret's metadata, or None when it does not exist yet."""
        cfg = self.cfg

        def read(c: hvac.Client) -> dict[str, Any] | None:
            try:
                result = c.secrets.kv.v2.read_secret_metadata(cfg.kv_path, mount_point=cfg.kv_mount)
            except hvac.exceptions.InvalidPath as exc:
                _only_absent(exc)
                return None
            data: dict[str, Any] = result["data"]
            return data

        return await self.call(read, "kv metadata read")

    async def kv_mount_max_versions(self) -> int:
        """The KV mount's ``max_versions`` (``MOUNT/config``; 0: Vault's default of 10)."""
        mount = self.cfg.kv_mount

        def read(c: hvac.Client) -> int:
            result = c.secrets.kv.v2.read_configuration(mount_point=mount)
            return int(result["data"].get("max_versions") or 0)

        return await self.call(read, "kv mount config read")

    async def kv_read(self, version: int) -> dict[str, Any] | None:
        """One version's data, or None if it was deleted or destroyed."""
        cfg = self.cfg

        def read(c: hvac.Client) -> dict[str, Any] | None:
            try:
                result = c.secrets.kv.v2.read_secret_version(
                    cfg.kv_path,
                    version=version,
                    mount_point=cfg.kv_mount,
                    raise_on_deleted_version=True,
                )
            except hvac.exceptions.InvalidPath as exc:
                _only_absent(exc)
                return None
            data: dict[str, Any] = result["data"]["data"]
            return data

        return await self.call(read, f"kv read of version {version}")

    async def kv_write(self, data: dict[str, Any], cas: int) -> int:
        """Write a new version if the current version is still ``cas``; returns the version."""
        cfg = self.cfg

        def write(c: hvac.Client) -> int:
            result = c.secrets.kv.v2.create_or_update_secret(
                cfg.kv_path, secret=data, cas=cas, mount_point=cfg.kv_mount
            )
            return int(result["data"]["version"])

        return await self.call(write, "kv write")

    async def kv_destroy(self, versions: list[int]) -> None:
        cfg = self.cfg
        await self.call(
            lambda c: c.secrets.kv.v2.destroy_secret_versions(
                cfg.kv_path, versions=versions, mount_point=cfg.kv_mount
            ),
            "kv destroy",
        )

    # -- Transit ------------------------------------------------------------------------------

    async def transit_key(self) -> dict[str, Any] | None:
        """``transit/keys/NAME`` data, or None when the key does not exist."""
        cfg = self.cfg

        def read(c: hvac.Client) -> dict[str, Any] | None:
            try:
                result = c.secrets.transit.read_key(cfg.transit_key, mount_point=cfg.transit_mount)
            except hvac.exceptions.InvalidPath as exc:
                _only_absent(exc)
                return None
            data: dict[str, Any] = result["data"]
            return data

        return await self.call(read, "transit key read")

    async def transit_create(self, algorithm: str) -> None:
        cfg = self.cfg
        await self.call(
            lambda c: c.secrets.transit.create_key(
                cfg.transit_key,
                key_type=TRANSIT_KEY_TYPES[algorithm],
                mount_point=cfg.transit_mount,
            ),
            "transit key create",
        )

    async def transit_rotate(self) -> None:
        cfg = self.cfg
        await self.call(
            lambda c: c.secrets.transit.rotate_key(cfg.transit_key, mount_point=cfg.transit_mount),
            "transit rotate",
        )

    async def transit_config_probe(self, min_decryption_version: int) -> None:
        """Write ``min_decryption_version`` unchanged: SourceDeniedError unless the policy
        lets this token configure the key (checked before anything is changed)."""
        cfg = self.cfg
        await self.call(
            lambda c: c.secrets.transit.update_key_configuration(
                cfg.transit_key,
                min_decryption_version=min_decryption_version,
                mount_point=cfg.transit_mount,
            ),
            "transit key config",
        )

    async def transit_trim(self, version: int) -> None:
        """Delete every version below ``version`` for good: raise min_decryption_version and
        min_encryption_version to it (the versions below leave ``transit/keys/NAME`` and can no
        longer sign), then trim them (needs ``keys/NAME/config`` and ``keys/NAME/trim``)."""
        cfg = self.cfg
        transit = cfg.transit_key, cfg.transit_mount

        def trim(c: hvac.Client) -> None:
            name, mount = transit
            # two calls (hvac refuses min_encryption_version == min_decryption_version in one),
            # encryption first: Vault keeps min_encryption_version >= min_decryption_version
            c.secrets.transit.update_key_configuration(
                name, min_encryption_version=version, mount_point=mount
            )
            c.secrets.transit.update_key_configuration(
                name, min_decryption_version=version, mount_point=mount
            )
            c.secrets.transit.trim_key(name, min_version=version, mount_point=mount)

        await self.call(trim, f"transit trim below version {version}")

    async def transit_sign(self, algorithm: str, version: int, data: bytes) -> bytes:
        """A raw JWS signature of ``data`` by one key version (the key never leaves Vault)."""
        cfg = self.cfg
        options: dict[str, Any] = {}
        if algorithm == "ES256":
            options = {"hash_algorithm": "sha2-256", "marshaling_algorithm": "jws"}
        elif algorithm == "RS256":
            options = {"hash_algorithm": "sha2-256", "signature_algorithm": "pkcs1v15"}
        elif algorithm == "PS256":
            options = {
                "hash_algorithm": "sha2-256",
                "signature_algorithm": "pss",
                "salt_length": "hash",
            }

        def sign(c: hvac.Client) -> str:
            result = c.secrets.transit.sign_data(
                cfg.transit_key,
                hash_input=base64.b64encode(data).decode("ascii"),
                key_version=version,
                mount_point=cfg.transit_mount,
                **options,
            )
            signature: str = result["data"]["signature"]
            return signature

        text = await self.call(sign, "transit sign")
        encoded = text.split(":", 2)[-1]  # "vault:v3:<signature>"
        normalized = encoded.replace("+", "-").replace("/", "_").rstrip("=")
        return base64.urlsafe_b64decode(normalized + "=" * (-len(normalized) % 4))


def _only_absent(exc: hvac.exceptions.InvalidPath) -> None:
    """A 404 with no error text means the thing does not exist; with one (``no handler for
    route``: a missing mount or a wrong path) it is a failure, and raising keeps it from ever
    reading as an empty source."""
    if getattr(exc, "errors", None):
        raise KeySourceError(f"vault: {_first_error(exc)}") from None


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return str(errors[0])[:200]
    return type(exc).__name__
