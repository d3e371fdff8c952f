"""Rotation planning: a pure decision from the ring, ``now`` and the shared timing.

A rotation creates a prepared key at once with ``activate_at = now + prepare_ahead``; the first
key of an empty ring (bootstrap) activates at once because nobody can hold a token yet.
Scheduled rotation prepares the next key ``prepare_ahead`` before the newest key has been
active for ``period``.
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
    source_kids: Collection[str] | None = None,
) -> NewKeyPlan:
    """What the rotation loop (``forced=False``) or a Rotate call (``forced=True``) must do.

    ``source_kids`` are the kids the source holds now: when the newest cached key is missing
    from it (the source lost data), a new key is prepared; the cached key keeps signing until
    the new one activates, so verifiers still see every key before it signs."""
    timing = ring.timing
    if not ring.published(now):
        return NewKeyPlan(Action.BOOTSTRAP, now, now)
    due = next_rotation_at(ring)
    lost = source_kids is not None and ring.keys[-1].kid not in source_kids
    if forced or lost or (due is not None and now >= due):
        return NewKeyPlan(Action.PREPARE, now, now + timing.prepare_ahead)
    return NewKeyPlan(Action.NONE, now, now)
