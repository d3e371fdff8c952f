"""Rotation planning: a pure decision from the ring, ``now`` and the shared timing.

A rotation creates a prepared key at once with ``activate_at = now + prepare_ahead``; the first
key of an empty ring (bootstrap) activates at once because nobody can hold a token yet.
Scheduled rotation prepares the next key ``prepare_ahead`` before the newest key has been
active for ``period``.

One rotation at a time: ``Rotate`` while a prepared key has not activated yet is refused
(:class:`RotationPendingError`), so rotations are at least ``prepare_ahead`` apart and the number
of keys published at once stays bounded (:func:`versions_needed`); a KV secret must keep that
many versions, or a write would prune a key that still verifies.

When the active key is revoked (gone from the source), nothing that has been superseded may
sign in its place: if no key is active then, or the active one is a key the revoked one had
replaced, a fresh key is created active at once (replace). That is the price of revocation:
other replicas and verifiers may not know the fresh key for up to ``poll_interval``.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from enum import StrEnum
from typing import NamedTuple

from svidgate.signer.errors import RotationPendingError
from svidgate.signer.keyring import KeyRing, KeyState, Timing, later

# versions beyond the published keys that a KV secret should keep: a key that replaces a revoked
# active key at once, and one version written by an operator (or a bad one) in between
VERSION_MARGIN = 2


class Action(StrEnum):
    """What the source must do now: nothing, write the first key, prepare the next, or replace
    an active key that was lost (revoked or deleted in the source)."""

    NONE = "none"
    BOOTSTRAP = "bootstrap"
    PREPARE = "prepare"
    REPLACE = "replace"


class NewKeyPlan(NamedTuple):
    """A key the source must write: its times are decided here, the key material there."""

    action: Action
    created_at: datetime
    activate_at: datetime
    keep: frozenset[str] = frozenset()  # the published kids: writing the key must not drop one


def next_rotation_at(ring: KeyRing) -> datetime | None:
    """When the scheduled rotation should create the next prepared key."""
    if not ring.keys:
        return None
    newest = ring.keys[-1]
    return later(newest.activate_at, ring.timing.period - ring.timing.prepare_ahead)


def versions_needed(timing: Timing) -> int:
    """How many versions a KV secret must keep so that no published key is pruned: one
    prepared, one active, and the retired keys still verifying (activations are at least
    ``prepare_ahead`` apart, each retired key verifies for ``retain``), plus VERSION_MARGIN."""
    retired = timing.retain // timing.prepare_ahead + 1 if timing.prepare_ahead else 1
    return 2 + retired + VERSION_MARGIN


def plan_rotation(
    ring: KeyRing,
    now: datetime,
    *,
    forced: bool = False,
    lost_active: Collection[str] | None = None,
) -> NewKeyPlan:
    """What the rotation loop (``forced=False``) or a Rotate call (``forced=True``) must do.

    ``lost_active`` is set while the key that was active is gone from the source (revoked): the
    kids that key had superseded, which never sign again. Raises RotationPendingError for a
    forced rotation while a prepared key is waiting to activate."""
    timing = ring.timing
    published = ring.published(now)
    keep = frozenset(s.key.kid for s in published)
    if not published:
        return NewKeyPlan(Action.BOOTSTRAP, now, now)
    if lost_active is not None:
        active = ring.active(now)
        if active is None or active.kid in lost_active:
            return NewKeyPlan(Action.REPLACE, now, now, keep)
    pending = [s.key for s in published if s.state == KeyState.PREPARED]
    if forced and pending:
        raise RotationPendingError(
            f"key {pending[-1].kid} is prepared and activates at "
            f"{pending[-1].activate_at.isoformat()}; rotate again once it is active"
        )
    due = next_rotation_at(ring)
    if forced or (due is not None and now >= due):
        return NewKeyPlan(Action.PREPARE, now, later(now, timing.prepare_ahead), keep)
    return NewKeyPlan(Action.NONE, now, now)
