"""Key sources: file, Vault KV v2, Vault Transit. Each implements :class:`KeySource`."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from svidgate.signer.keyring import SigningKey
from svidgate.signer.rotation import NewKeyPlan


class KeySource(Protocol):
    """Where keys live, and the truth about which keys exist. ``load`` returns exactly the keys
    the source holds, ``[]`` only when it really holds none, and raises KeySourceError when it
    cannot tell. ``create`` is check-and-set against the last ``load``: it raises
    SourceConflictError when another replica wrote first (reload, then plan again)."""

    description: str

    async def load(self) -> list[SigningKey]: ...

    async def create(self, plan: NewKeyPlan) -> SigningKey: ...

    async def remove(self, kids: Sequence[str]) -> None: ...

    async def revoke(self, kid: str, *, keep: Collection[str]) -> None:
        """Delete ``kid`` from the source now, for every replica; never a key in ``keep`` (the
        other published keys). KeyNotFoundError when the source does not hold it (as of the
        last ``load``), RevokeRefusedError when the source cannot delete it alone."""
        ...

    async def background(self) -> None:
        """Long-running upkeep (Vault: log in, renew the token); returns at once if none."""
        ...

    async def close(self) -> None: ...
