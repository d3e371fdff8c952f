"""The signer's only door to Vault / OpenBao: the only module that imports hvac.

hvac is synchronous (requests); every call runs on a thread of one of two bounded pools of its
own (:mod:`svidgate.signer.vault_transport`), never the event loop's default executor: one for
polling, rotation, revocation, login and renewal, one for Transit signatures only, so a flood of
Sign requests cannot delay the others. Each call has an overall deadline (``keys.vault.timeout``,
queueing included); past it the call fails as unavailable, is logged, and its connection is cut.

Transport rules (see docs/operations.md, "The Vault client's rules"): nothing is taken from the
environment (no ``VAULT_TOKEN``, ``~/.vault-token``, ``VAULT_CLIENT_CERT``, proxy variables or
``.netrc``); the only token is the one the configured auth method yields, and with AppRole or
Kubernetes auth no request goes out before that login; a redirect is an error, never followed;
``token_file`` and ``secret_id_file`` are refused when group or others may read them.

Foreign exceptions are translated here, where they enter: unreachable or too slow →
SourceUnavailableError, check-and-set mismatch → SourceConflictError, a 403 that a fresh login
does not cure → SourceDeniedError, anything else → KeySourceError. A 404 means "does not exist"
only when Vault says nothing more (``errors: []``, e.g. KV metadata or a Transit key that was
never written or was deleted); a 404 with an error ("no handler for route": a missing mount, a
wrong path) is an error, never an empty source. A 403 (token expired or revoked) triggers one
re-login and a retry. A background task renews the token at half its remaining TTL and logs in
again when renewal fails or no longer grants a full TTL (the max TTL is near). Tokens never
appear in messages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from svidgate.pki.durations import format_duration
from svidgate.signer.config import VaultConfig, secret_file_problem
from svidgate.signer.errors import (
    KeySourceError,
    SourceConflictError,
    SourceDeniedError,
    SourceUnavailableError,
)
from svidgate.signer.vault_transport import (
    CallAbandoned,
    DeadlineExceeded,
    RedirectRefused,
    WorkerPool,
    new_session,
    run_with_deadline,
)

log = logging.getLogger("svidgate.signer.vault")
T = TypeVar("T")

CONTROL_THREADS = 2  # polling, Rotate, Revoke, login, renewal
SIGNING_THREADS = 4  # Transit signatures only
NO_EXPIRY_RECHECK = 30.0  # seconds between looks at a token that never expires
MIN_NAP = 0.2  # the shortest wait between two renewals
OVERRUN_LOG_INTERVAL = 5.0  # seconds between two log lines about calls past their deadline

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


def token_remaining(info: dict[str, Any]) -> float | None:
    """Seconds a token has left by Vault's own count (``lookup-self``), or None when it never
    expires. Vault counts whole seconds: ``ttl: 0`` with an ``expire_time`` is "less than a
    second left", not "no expiry" (that is ``expire_time: null``)."""
    if info.get("expire_time") is None:
        return None
    return float(info.get("ttl") or 0)


def renewal_is_full(granted: int, info: dict[str, Any]) -> bool:
    """A renewal that grants less than the token's own TTL was capped by its max TTL."""
    return granted > 0 and granted >= int(info.get("creation_ttl") or 0)


def read_secret_file(path: Path, what: str, *, owner_only: str | None = None) -> str:
    """The stripped text of a credential file. ``owner_only`` (the config field) refuses a
    file that group or others may access; the mode checked is the open file's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise KeySourceError(f"{what} {path}: cannot read ({exc.strerror})") from None
    with open(fd, encoding="utf-8") as file:
        problem = secret_file_problem(path, os.fstat(fd).st_mode) if owner_only else None
        if problem is not None:
            raise KeySourceError(f"{owner_only}: {problem}")
        try:
            value = file.read().strip()
        except UnicodeDecodeError:
            raise KeySourceError(f"{what} {path}: cannot read (not UTF-8 text)") from None
        except OSError as exc:
            raise KeySourceError(f"{what} {path}: cannot read ({exc.strerror})") from None
    if not value:
        raise KeySourceError(f"{what} {path}: empty")
    return value


class VaultClient:
    """An authenticated hvac client with token renewal; every method is a coroutine."""

    def __init__(self, cfg: VaultConfig) -> None:
        self.cfg = cfg
        self.deadline = cfg.timeout.total_seconds()
        self._token = ""  # only ever what a login returned
        self._logged_in = False
        self._login_lock = asyncio.Lock()
        self._control = WorkerPool("vault", CONTROL_THREADS, self._new_hvac, _close_hvac)
        self._signing = WorkerPool("vault-sign", SIGNING_THREADS, self._new_hvac, _close_hvac)
        self.logins = 0
        self.renewals = 0
        self.overruns = 0
        self._overruns_logged = 0
        self._overrun_logged_at = -OVERRUN_LOG_INTERVAL

    def _new_hvac(self) -> hvac.Client:
        """One worker thread's client: explicit in everything hvac would take from the
        environment (token, client certificate, CA, address, proxies)."""
        cfg = self.cfg
        verify: bool | str = str(cfg.ca_cert) if cfg.ca_cert is not None else True
        return hvac.Client(
            url=cfg.address,
            token="",  # hvac's default reads VAULT_TOKEN and ~/.vault-token
            cert=False,  # hvac's default reads VAULT_CLIENT_CERT / VAULT_CLIENT_KEY
            verify=verify,
            timeout=self.deadline,
            session=new_session(verify=verify, proxy=cfg.proxy),
            allow_redirects=False,
            namespace=cfg.namespace,
        )

    # -- running calls, translation of foreign errors -----------------------------------------

    async def _run(
        self,
        fn: Callable[[hvac.Client], T],
        what: str,
        *,
        signing: bool = False,
        with_token: bool = True,
    ) -> T:
        def job(client: hvac.Client) -> T:
            client.token = self._token if with_token else ""
            return fn(client)

        pool = self._signing if signing else self._control
        try:
            return await run_with_deadline(pool, job, self.deadline)
        except DeadlineExceeded:
            limit = format_duration(self.cfg.timeout)
            self._note_overrun(what, limit)
            raise SourceUnavailableError(f"vault did not answer {what} within {limit}") from None
        except CallAbandoned:
            raise SourceUnavailableError(f"vault client closed during {what}") from None
        except RedirectRefused as exc:
            raise KeySourceError(
                f"vault answered {what} with a redirect (HTTP {exc.status}); redirects are "
                "never followed: point keys.vault.address at the server itself"
            ) from None
        except (requests.RequestException, hvac.exceptions.VaultDown) as exc:
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

    def _note_overrun(self, what: str, limit: str) -> None:
        """Count every overrun; log one per OVERRUN_LOG_INTERVAL (a Sign flood could overrun
        hundreds of times a second)."""
        self.overruns += 1
        now = time.monotonic()
        if now - self._overrun_logged_at < OVERRUN_LOG_INTERVAL:
            return
        more = self.overruns - self._overruns_logged - 1
        since = f" ({more} more since the last report)" if more else ""
        log.warning("vault %s overran its deadline (%s): connection cut%s", what, limit, since)
        self._overrun_logged_at, self._overruns_logged = now, self.overruns

    async def call(self, fn: Callable[[hvac.Client], T], what: str, *, signing: bool = False) -> T:
        """Run ``fn(client)`` on a pool thread, after the first login; on 403 log in again
        once and retry. ``signing``: the Transit signing pool."""
        await self._ensure_login()
        try:
            return await self._run(fn, what, signing=signing)
        except hvac.exceptions.Forbidden:
            await self.login()
            try:
                return await self._run(fn, what, signing=signing)
            except hvac.exceptions.Forbidden:
                raise SourceDeniedError(f"vault denied {what} (check the policy)") from None

    # -- authentication -----------------------------------------------------------------------

    def _login_request(self, client: hvac.Client) -> str:
        """The token the configured method yields (token: the file; no request is made)."""
        auth = self.cfg.auth
        if auth.method == "token":
            assert auth.token_file is not None  # checked by the config
            field = "keys.vault.auth.token_file"
            return read_secret_file(auth.token_file, "vault token file", owner_only=field)
        if auth.method == "approle":
            assert auth.secret_id_file is not None  # checked by the config
            field = "keys.vault.auth.secret_id_file"
            secret_id = read_secret_file(
                auth.secret_id_file, "approle secret_id file", owner_only=field
            )
            result = client.auth.approle.login(
                role_id=auth.role_id,
                secret_id=secret_id,
                use_token=False,
                mount_point=auth.mount or "approle",
            )
        else:
            jwt = read_secret_file(auth.jwt_file, "kubernetes service account token")
            result = client.auth.kubernetes.login(
                role=auth.role, jwt=jwt, use_token=False, mount_point=auth.mount or "kubernetes"
            )
        return str(result["auth"]["client_token"])

    async def login(self) -> None:
        """(Re-)acquire a token with the configured auth method."""
        async with self._login_lock:
            await self._login_locked()

    async def _ensure_login(self) -> None:
        if self._logged_in:
            return
        async with self._login_lock:
            if not self._logged_in:
                await self._login_locked()

    async def _login_locked(self) -> None:
        try:
            token = await self._run(self._login_request, "login", with_token=False)
        except hvac.exceptions.Forbidden:
            raise KeySourceError("vault login denied") from None
        self._token, self._logged_in = token, True
        self.logins += 1

    async def token_info(self) -> dict[str, Any]:
        """``auth/token/lookup-self`` data (ttl, renewable, accessor…)."""
        result = await self.call(lambda c: c.auth.token.lookup_self(), "token lookup")
        data: dict[str, Any] = result["data"]
        return data

    async def renew_forever(self, *, retry_after: float = 1.0) -> None:
        """Keep a live token: renew it at half its remaining TTL, log in again when it cannot
        be renewed (further). Errors are logged and retried: the key cache stays in use."""
        while True:
            try:
                await self._renew_once()
            except asyncio.CancelledError:
                raise
            except KeySourceError as exc:
                log.warning("vault token maintenance failed: %s", exc)
                await asyncio.sleep(retry_after)
                with contextlib.suppress(KeySourceError):
                    await self.login()

    async def _renew_once(self) -> None:
        info = await self.token_info()
        remaining = token_remaining(info)
        if remaining is None:  # a token without expiry (a root token): nothing to renew
            await asyncio.sleep(NO_EXPIRY_RECHECK)
            return
        await asyncio.sleep(max(MIN_NAP, remaining / 2))
        if info.get("renewable") and renewal_is_full(await self._renew(), info):
            return
        log.info("vault token cannot be renewed further: logging in again")
        await self.login()

    async def _renew(self) -> int:
        """Seconds granted by ``renew-self``; 0 when it failed."""
        try:
            result = await self.call(lambda c: c.auth.token.renew_self(), "renew")
        except KeySourceError:
            return 0
        self.renewals += 1
        return int(result["auth"]["lease_duration"])

    async def maintain_token(self) -> None:
        """Log in (retrying while Vault is unreachable), then renew forever."""
        while True:
            try:
                await self._ensure_login()
                break
            except KeySourceError as exc:
                log.warning("vault login failed: %s", exc)
                await asyncio.sleep(1.0)
        await self.renew_forever()

    def close(self) -> None:
        """Stop both pools without waiting; calls still running are cut."""
        self._control.close()
        self._signing.close()

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

        text = await self.call(sign, "transit sign", signing=True)
        encoded = text.split(":", 2)[-1]  # "vault:v3:<signature>"
        normalized = encoded.replace("+", "-").replace("/", "_").rstrip("=")
        return base64.urlsafe_b64decode(normalized + "=" * (-len(normalized) % 4))


def _close_hvac(client: hvac.Client) -> None:
    client.adapter.close()


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
