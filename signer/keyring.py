"""The key ring: a pure, immutable snapshot of the signing keys and their states at ``now``.

Every key moves ``prepared → active → retired → removed``, and its state is a function of the
ring and ``now`` only, so replicas that see the same keys agree on it:

- prepared: ``now < activate_at``; published (JWKS) but never signs;
- active: the newest key with ``activate_at <= now``; signs;
- retired: a newer key has activated (``retired_at`` = that key's ``activate_at``); verifies;
- removed: ``now >= retired_at + retain`` where ``retain >= max_ttl + clock_skew + poll_interval``.

The source is the truth: a ring built from a successful read (:meth:`KeyRing.from_source`)
holds exactly the keys the source holds, so a key deleted there (revoked) is gone from the ring
at the next read. A failed read builds no ring: the last one stays in use.

A replica that cannot reach its source does not know whether a newer key exists; the earliest a
key it has not seen could activate is ``synced_at + prepare_ahead``. :meth:`KeyRing.sign_deadline`
uses that bound, so a token signed from a stale ring never outlives its key's window.

The ring takes each key's ``activate_at`` as given: a store that delays a key announced too late
(:func:`effective_activation`) passes the delayed time. Time arithmetic saturates
(:func:`later`), so no activation time, however far ahead, can raise.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from svidgate.pki.jwt_svid import PublicKey, UnknownKidError, VerificationKey
from svidgate.signer.jwt import PrivateKey, verification_jwk

RemoteSign = Callable[[bytes], Awaitable[bytes]]
END_OF_TIME = datetime.max.replace(tzinfo=UTC)


def later(when: datetime, delta: timedelta) -> datetime:
    """``when + delta``, saturating at the end of time instead of raising OverflowError."""
    try:
        return when + delta
    except OverflowError:
        return END_OF_TIME


def effective_activation(
    activate_at: datetime,
    first_seen: datetime | None,
    prepare_ahead: timedelta,
    propagation: timedelta,
) -> datetime:
    """When a key may sign on a replica that first saw it at ``first_seen`` (None: no delay).

    A signer writes a key ``prepare_ahead`` before it activates, and every replica reads it
    within ``propagation`` (poll interval + clock skew + Vault timeout) of the write; a key
    first seen with less than ``prepare_ahead - propagation`` to go (or already active) was
    not announced that way, so it waits out ``prepare_ahead`` from ``first_seen``."""
    if first_seen is None:
        return activate_at
    if activate_at > first_seen and activate_at - first_seen >= prepare_ahead - propagation:
        return activate_at
    return max(activate_at, later(first_seen, prepare_ahead))


class KeyState(StrEnum):
    PREPARED = "prepared"
    ACTIVE = "active"
    RETIRED = "retired"
    REMOVED = "removed"


@dataclass(frozen=True, slots=True, eq=False)
class SigningKey:
    """One key as a source delivers it. ``private_key`` for local keys, ``remote_sign`` for
    keys that never leave Vault (Transit); neither for a verify-only cached key."""

    kid: str
    algorithm: str
    public_key: PublicKey
    created_at: datetime
    activate_at: datetime
    private_key: PrivateKey | None = None
    remote_sign: RemoteSign | None = None
    origin: str = ""  # where the source holds it ("vault-kv:… version 3"), for log lines

    @property
    def verification_key(self) -> VerificationKey:
        return VerificationKey(self.kid, self.algorithm, self.public_key)


@dataclass(frozen=True, slots=True)
class Timing:
    """The rotation timing every replica shares (from signer.yaml)."""

    period: timedelta
    prepare_ahead: timedelta
    retain: timedelta
    clock_skew: timedelta
    max_ttl: timedelta


@dataclass(frozen=True, slots=True)
class KeyStatus:
    key: SigningKey
    state: KeyState
    retired_at: datetime | None
    removed_at: datetime | None


class KeyRing:
    """Immutable; build a new ring to change it (build → validate → swap one reference)."""

    __slots__ = ("_by_kid", "keys", "synced_at", "timing")

    def __init__(self, keys: Iterable[SigningKey], timing: Timing, synced_at: datetime) -> None:
        ordered = sorted(keys, key=lambda k: (k.activate_at, k.kid))
        self.keys: tuple[SigningKey, ...] = tuple(ordered)
        self.timing = timing
        self.synced_at = synced_at
        self._by_kid = {k.kid: i for i, k in enumerate(self.keys)}

    @classmethod
    def from_source(
        cls, keys: Iterable[SigningKey], timing: Timing, synced_at: datetime
    ) -> KeyRing:
        """The ring a successful source read describes: the source's keys and nothing else (a
        key the source no longer holds is gone), without those already removed at
        ``synced_at``."""
        ring = cls(keys, timing, synced_at)
        kept = [s.key for s in ring.statuses(synced_at) if s.state != KeyState.REMOVED]
        return cls(kept, timing, synced_at)

    def without(self, kid: str) -> KeyRing:
        """This ring without ``kid`` (a revoked key, dropped before the next source read)."""
        return KeyRing([k for k in self.keys if k.kid != kid], self.timing, self.synced_at)

    def superseded(self, now: datetime) -> frozenset[str]:
        """The kids a newer key has replaced (retired at ``now``): they never sign again."""
        return frozenset(s.key.kid for s in self.statuses(now) if s.state == KeyState.RETIRED)

    def status(self, index: int, now: datetime) -> KeyStatus:
        key = self.keys[index]
        successor = self.keys[index + 1] if index + 1 < len(self.keys) else None
        retired_at = successor.activate_at if successor is not None else None
        removed_at = later(retired_at, self.timing.retain) if retired_at is not None else None
        if now < key.activate_at:
            state = KeyState.PREPARED
        elif retired_at is None or now < retired_at:
            state = KeyState.ACTIVE
        elif removed_at is not None and now >= removed_at:
            state = KeyState.REMOVED
        else:
            state = KeyState.RETIRED
        return KeyStatus(key, state, retired_at, removed_at)

    def statuses(self, now: datetime) -> list[KeyStatus]:
        return [self.status(i, now) for i in range(len(self.keys))]

    def active(self, now: datetime) -> SigningKey | None:
        """The newest key whose activation time has come, or None."""
        for key in reversed(self.keys):
            if key.activate_at <= now:
                return key
        return None

    def lookup(self, kid: str, now: datetime) -> KeyStatus:
        """The status of a published key; raises UnknownKidError (kid is only a dict key)."""
        index = self._by_kid.get(kid)
        if index is None:
            raise UnknownKidError("no such key")
        status = self.status(index, now)
        if status.state == KeyState.REMOVED:
            raise UnknownKidError("key has been removed")
        return status

    def published(self, now: datetime) -> list[KeyStatus]:
        return [s for s in self.statuses(now) if s.state != KeyState.REMOVED]

    def jwks(self, now: datetime) -> dict[str, Any]:
        """Public keys of every prepared, active and retired key."""
        return {
            "keys": [
                verification_jwk(s.key.kid, s.key.algorithm, s.key.public_key)
                for s in self.published(now)
            ]
        }

    def earliest_removal(self, kid: str, now: datetime) -> datetime:
        """The earliest time ``kid`` may disappear from any replica's ring."""
        status = self.lookup(kid, now)
        if status.removed_at is not None:
            return status.removed_at
        unseen = max(later(self.synced_at, self.timing.prepare_ahead), status.key.activate_at)
        return later(unseen, self.timing.retain)

    def sign_deadline(self, now: datetime) -> tuple[SigningKey, datetime] | None:
        """The active key and the latest ``exp`` a token it signs now may carry, or None."""
        key = self.active(now)
        if key is None:
            return None
        return key, self.earliest_removal(key.kid, now) - self.timing.clock_skew

    def next_change(self, now: datetime) -> datetime | None:
        """The next activation or removal after ``now`` (when the JWKS or signer changes)."""
        times: list[datetime] = []
        for s in self.statuses(now):
            times.extend(t for t in (s.key.activate_at, s.removed_at) if t is not None and t > now)
        return min(times, default=None)
