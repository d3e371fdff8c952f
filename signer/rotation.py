"""Rotation planning: a pure decision from the ring, ``now`` and the shared timing.

A rotation creates a prepared key at once with ``activate_at = now + prepare_ahead``; the first
key of an empty ring (bootstrap) activates at once because nobody can hold a token yet.
Scheduled rotation prepares the next key ``prepare_ahead`` before the newest key has been
active for ``period``.

When the active key is revoked (gone from the source), nothing that has been superseded may
sign in its place: if no key is active then, or the active one is a key the revoked one had
replaced, a fresh key is created active at once (replace). That is the price of revocation:
other replicas and verifiers may not know the fresh key for up to ``poll_interval``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from svidgate.signer.keyring import KeyRing


class Action(StrEnum):
    NONE = "none"
    BOOTSTRAP = "bootstrap"
    PREPARE = "prepare"
    REPLACE = "replace"


@dataclass(frozen=True, slots=True)
class NewKeyPlan:
    action: Action
    created_at: datetime
    activate_at: datetime


def next_rotation_at(ring: KeyRing) -> datetime | None:
    """When the scheduled rotation should create the next prepared key."""
    if not ring.keys:
        return None
    newest = ring.keys[-1]
    return newest.activate_at + ring.timing.period - ring.timing.prepare_ahead


def plan_rotation(
    ring: KeyRing,
    now: datetime,
    *,
    forced: bool = False,
    lost_active: Collection[str] | None = None,
) -> NewKeyPlan:
    """What the rotation loop (``forced=False``) or a Rotate call (``forced=True``) must do.

    ``lost_active`` is set while the key that was active is gone from the source (revoked): the
    kids that key had superseded, which never sign again."""
    timing = ring.timing
    if not ring.published(now):
        return NewKeyPlan(Action.BOOTSTRAP, now, now)
    if lost_active is not None:
        active = ring.active(now)
        if active is None or active.kid in lost_active:
            return NewKeyPlan(Action.REPLACE, now, now)
    due = next_rotation_at(ring)
    if forced or (due is not None and now >= due):
        return NewKeyPlan(Action.PREPARE, now, now + timing.prepare_ahead)
    return NewKeyPlan(Action.NONE, now, now)
