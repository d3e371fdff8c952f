"""The ``file`` key source: a directory of PEM keys (0600) plus ``state.json``.

``state.json`` holds a generation counter and, per key, its kid, algorithm, creation and
activation times. Writers take an exclusive ``flock`` on ``.lock`` and compare the generation,
so replicas sharing the directory get check-and-set semantics like Vault KV.

The directory is the truth: a key whose entry or PEM file is gone is not a key (an operator
revokes one by deleting its file), and no ``state.json`` means no keys. The directory is
created by the first read; once read, a directory that disappears is an error (an unmounted
volume is not an empty source), as is any file that exists but cannot be read. An entry that
is not a usable key of ``keys.algorithm`` (bad fields, a naive time, an unreadable PEM, another
algorithm) is skipped and logged (ERROR, its index) and the others load.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from svidgate.pki.ca import write_private_file
from svidgate.signer.errors import KeyNotFoundError, KeySourceError, SourceConflictError
from svidgate.signer.keygen import (
    generate_signing_key,
    local_signing_key,
    parse_private_key,
    private_key_pem,
)
from svidgate.signer.keyring import SigningKey
from svidgate.signer.rotation import NewKeyPlan
from svidgate.signer.sources import BadEntry, Rejections, check_algorithm, kid_field, time_field

STATE_FILE = "state.json"


def _kid_of(entry: object) -> str | None:
    return str(entry.get("kid")) if isinstance(entry, dict) else None


class FileKeySource:
    def __init__(self, directory: Path, algorithm: str) -> None:
        self.directory = directory
        self.algorithm = algorithm
        self.description = f"file:{directory}"
        self._generation = 0
        self._loaded = False
        self._rejections = Rejections()

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if not self._loaded:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        elif not self.directory.is_dir():
            raise KeySourceError(f"{self.directory}: the key directory is gone")
        try:
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeySourceError(f"{self.directory}: cannot lock ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_state(self) -> dict[str, Any]:
        path = self.directory / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"generation": 0, "keys": []}
        except (OSError, ValueError) as exc:
            raise KeySourceError(f"{path}: unreadable key state ({exc})") from None
        if not isinstance(state, dict) or not isinstance(state.get("keys"), list):
            raise KeySourceError(f"{path}: invalid key state")
        return state

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.directory / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(state, indent=2), encoding="utf-8")
        tmp.replace(self.directory / STATE_FILE)

    def _load_sync(self) -> list[SigningKey]:
        with self._locked():
            state = self._read_state()
        self._loaded = True
        self._generation = int(state.get("generation", 0))
        keys = []
        self._rejections.begin()
        for index, entry in enumerate(state["keys"]):
            where = f"{self.directory / STATE_FILE} entry {index}"
            try:
                key = self._entry_key(entry, where)
            except BadEntry as exc:
                self._rejections.reject(where, exc)
                continue
            if key is not None:
                keys.append(key)
        self._rejections.done()
        return keys

    def _entry_key(self, entry: object, where: str) -> SigningKey | None:
        """The key of one state.json entry; None when its PEM file is gone (deleted)."""
        if not isinstance(entry, dict):
            raise BadEntry("not a key entry")
        alg, kid = check_algorithm(entry, self.algorithm), kid_field(entry)
        created, activate = time_field(entry, "created_at"), time_field(entry, "activate_at")
        path = self.directory / f"{kid}.pem"
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            return None  # deleted (revoked, or removed by another replica since the read)
        except OSError as exc:
            raise KeySourceError(f"{path}: cannot read ({exc.strerror})") from None
        try:
            private = parse_private_key(pem, alg, f"{path.name}")
        except KeySourceError as exc:
            raise BadEntry(str(exc)) from None
        key = local_signing_key(private, alg, created, activate)
        if key.kid != kid:
            raise BadEntry(f"{path.name} does not match its kid")
        return replace(key, origin=where)

    def _create_sync(self, plan: NewKeyPlan) -> SigningKey:
        private = generate_signing_key(self.algorithm)
        key = local_signing_key(private, self.algorithm, plan.created_at, plan.activate_at)
        with self._locked():
            state = self._read_state()
            if int(state.get("generation", 0)) != self._generation:
                raise SourceConflictError("key state changed since the last read")
            write_private_file(self.directory / f"{key.kid}.pem", private_key_pem(private))
            state["keys"].append(
                {
                    "kid": key.kid,
                    "alg": key.algorithm,
                    "created_at": key.created_at.isoformat(),
                    "activate_at": key.activate_at.isoformat(),
                }
            )
            self._generation = int(state.get("generation", 0)) + 1
            state["generation"] = self._generation
            self._write_state(state)
        return key

    def _drop(self, state: dict[str, Any], kids: Collection[str]) -> None:
        """Delete ``kids`` from ``state`` and their PEM files (the lock is held)."""
        state["keys"] = [k for k in state["keys"] if _kid_of(k) not in kids]
        state["generation"] = int(state.get("generation", 0)) + 1
        self._write_state(state)
        for kid in kids:
            (self.directory / f"{kid}.pem").unlink(missing_ok=True)

    def _remove_sync(self, kids: Sequence[str]) -> None:
        with self._locked():
            self._drop(self._read_state(), kids)

    def _revoke_sync(self, kid: str) -> None:
        with self._locked():
            state = self._read_state()
            if kid not in {_kid_of(k) for k in state["keys"]}:
                raise KeyNotFoundError(f"{kid} is not in {self.description}")
            self._drop(state, [kid])

    async def revoke(self, kid: str, *, keep: Collection[str]) -> None:
        """Delete ``kid``'s entry and PEM file; nothing else."""
        await asyncio.to_thread(self._revoke_sync, kid)

    async def load(self) -> list[SigningKey]:
        return await asyncio.to_thread(self._load_sync)

    async def create(self, plan: NewKeyPlan) -> SigningKey:
        return await asyncio.to_thread(self._create_sync, plan)

    async def remove(self, kids: Sequence[str]) -> None:
        await asyncio.to_thread(self._remove_sync, kids)

    def version_limit(self) -> int | None:
        return None

    async def background(self) -> None:
        return None

    async def close(self) -> None:
        return None
