"""Key sources: file, Vault KV v2, Vault Transit. Each implements :class:`KeySource`.

Also the rules every source applies to one entry (a KV version, a ``state.json`` entry, a Transit
version): an entry that is not a usable key of ``keys.algorithm`` (a field of the wrong type, a
time without a time zone, an unreadable PEM, another algorithm, a kid that does not match) is
skipped and logged at ERROR with where it is — never its contents — once while it stays in the
source. One bad entry never stops the others from loading.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from svidgate.signer.keyring import SigningKey
from svidgate.signer.rotation import NewKeyPlan

log = logging.getLogger("svidgate.signer.keys")
_KID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class KeySource(Protocol):
    """Where keys live, and the truth about which keys exist. ``load`` returns exactly the keys
    the source holds, ``[]`` only when it really holds none, and raises KeySourceError when it
    cannot tell. ``create`` is check-and-set against the last ``load``: it raises
    SourceConflictError when another replica wrote first (reload, then plan again), and
    SourceCapacityError when the write would drop a key in ``plan.keep``."""

    description: str

    async def load(self) -> list[SigningKey]: ...

    async def create(self, plan: NewKeyPlan) -> SigningKey: ...

    async def remove(self, kids: Sequence[str]) -> None: ...

    async def revoke(self, kid: str, *, keep: Collection[str]) -> None:
        """Delete ``kid`` from the source now, for every replica; never a key in ``keep`` (the
        other published keys). KeyNotFoundError when the source does not hold it (as of the
        last ``load``), RevokeRefusedError when the source cannot delete it alone."""
        ...

    def version_limit(self) -> int | None:
        """How many versions the source keeps before it prunes the oldest (KV ``max_versions``)
        as of the last ``load``; None when it prunes nothing or does not know yet."""
        ...

    async def background(self) -> None:
        """Long-running upkeep (Vault: log in, renew the token); returns at once if none."""
        ...

    async def close(self) -> None: ...


class BadEntry(Exception):
    """One entry of a source is not a usable signing key; the message says why, without the
    entry's contents."""


def text_field(data: Mapping[str, object], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str) or not value:
        raise BadEntry(f"{name} is missing or not a string")
    return value


def time_field(data: Mapping[str, object], name: str) -> datetime:
    """An ISO 8601 time with a time zone (a naive time cannot be compared with the clock)."""
    try:
        when = datetime.fromisoformat(text_field(data, name))
    except ValueError:
        raise BadEntry(f"{name} is not an ISO 8601 time") from None
    if when.utcoffset() is None:
        raise BadEntry(f"{name} has no time zone")
    return when


def kid_field(data: Mapping[str, object]) -> str:
    kid = text_field(data, "kid")
    if not _KID.match(kid):
        raise BadEntry("kid is not a key thumbprint")
    return kid


def check_algorithm(data: Mapping[str, object], expected: str) -> str:
    alg = text_field(data, "alg")
    if alg != expected:
        shown = alg if alg.isalnum() and len(alg) <= 16 else "another algorithm"
        raise BadEntry(f"alg {shown} is not keys.algorithm {expected}")
    return alg


class Rejections:
    """The entries a source skipped: each is logged (ERROR) once while it stays bad."""

    def __init__(self) -> None:
        self._logged: set[str] = set()
        self._current: set[str] = set()

    def begin(self) -> None:
        self._current = set()

    def reject(self, where: str, problem: BadEntry) -> None:
        line = f"{where}: {problem}"
        self._current.add(line)
        if line not in self._logged:
            self._logged.add(line)
            log.error("%s: skipped, not a usable signing key: %s", where, problem)

    def done(self) -> None:
        """End of a complete load: forget entries that are gone or fixed."""
        self._logged = set(self._current)
