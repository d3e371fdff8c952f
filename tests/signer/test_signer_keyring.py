"""Key ring states and rotation planning: table-driven, pure, ``now`` passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from svidgate.pki.jwt_svid import UnknownKidError
from svidgate.signer.keyring import KeyRing, KeyState, SigningKey, Timing
from svidgate.signer.rotation import Action, plan_rotation

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)
# period 100s, prepare_ahead 10s, retain 20s (max_ttl 15 + skew 3 + poll 2), skew 3s
TIMING = Timing(
    period=100 * S, prepare_ahead=10 * S, retain=20 * S, clock_skew=3 * S, max_ttl=15 * S
)
PUB = ec.generate_private_key(ec.SECP256R1()).public_key()


def key(kid: str, activate: int, created: int | None = None) -> SigningKey:
    created_at = T0 + (activate if created is None else created) * S
    return SigningKey(kid, "ES256", PUB, created_at, T0 + activate * S)


# a bootstrapped at 0; b prepared at 90, active at 100; a retired at 100, removed at 120
RING = KeyRing([key("b", 100, 90), key("a", 0)], TIMING, synced_at=T0 + 95 * S)


@pytest.mark.parametrize(
    ("at", "states", "active"),
    [
        (0, {"a": "active", "b": "prepared"}, "a"),
        (99, {"a": "active", "b": "prepared"}, "a"),
        (100, {"a": "retired", "b": "active"}, "b"),
        (119, {"a": "retired", "b": "active"}, "b"),
        (120, {"a": "removed", "b": "active"}, "b"),
        (10_000, {"a": "removed", "b": "active"}, "b"),
    ],
)
def test_states_over_time(at: int, states: dict[str, str], active: str) -> None:
    now = T0 + at * S
    got = {s.key.kid: s.state.value for s in RING.statuses(now)}
    assert got == states
    found = RING.active(now)
    assert found is not None and found.kid == active
    published = {k["kid"] for k in RING.jwks(now)["keys"]}
    assert published == {kid for kid, st in states.items() if st != "removed"}


def test_prepared_key_is_published_before_it_signs() -> None:
    now = T0 + 91 * S
    assert "b" in {k["kid"] for k in RING.jwks(now)["keys"]}
    assert RING.lookup("b", now).state == KeyState.PREPARED
    deadline = RING.sign_deadline(now)
    assert deadline is not None and deadline[0].kid == "a"


def test_lookup_of_removed_or_unknown_kid_raises() -> None:
    with pytest.raises(UnknownKidError):
        RING.lookup("a", T0 + 120 * S)
    with pytest.raises(UnknownKidError):
        RING.lookup("zzz", T0)


def test_sign_deadline_never_outlives_the_key() -> None:
    # a is active with a known successor: removal at 120, deadline = 120 - skew
    deadline = RING.sign_deadline(T0 + 50 * S)
    assert deadline is not None and deadline[1] == T0 + 117 * S
    # b has no known successor: an unseen key could activate synced_at + prepare_ahead at the
    # earliest (105), so b may vanish at 125 at the earliest.
    stale = KeyRing([key("b", 100, 90)], TIMING, synced_at=T0 + 95 * S)
    deadline = stale.sign_deadline(T0 + 200 * S)
    assert deadline is not None and deadline[1] == T0 + (105 + 20 - 3) * S
    fresh = KeyRing([key("b", 100, 90)], TIMING, synced_at=T0 + 200 * S)
    deadline = fresh.sign_deadline(T0 + 200 * S)
    assert deadline is not None
    assert deadline[1] - (T0 + 200 * S) >= TIMING.max_ttl


def test_missing_keys_are_kept_until_their_removal() -> None:
    # the source lost everything and bootstrapped c at 200: a and b stay until due
    ring = KeyRing([key("a", 0), key("b", 100)], TIMING, T0 + 150 * S)
    after = ring.with_keys([key("c", 200)], T0 + 200 * S)
    assert [k.kid for k in after.keys] == ["b", "c"]  # a was removed at 120
    assert after.lookup("b", T0 + 210 * S).state == KeyState.RETIRED
    with pytest.raises(UnknownKidError):
        after.lookup("b", T0 + 220 * S)


@pytest.mark.parametrize(
    ("keys", "at", "forced", "action", "activate"),
    [
        ([], 5, False, Action.BOOTSTRAP, 5),
        ([key("a", 0)], 50, False, Action.NONE, None),
        ([key("a", 0)], 89, False, Action.NONE, None),
        ([key("a", 0)], 90, False, Action.PREPARE, 100),
        ([key("a", 0), key("b", 100, 90)], 95, False, Action.NONE, None),
        ([key("a", 0)], 20, True, Action.PREPARE, 30),
        ([key("a", 0), key("b", 100, 90)], 95, True, Action.PREPARE, 105),
        ([key("a", 0)], 5000, False, Action.PREPARE, 5010),
    ],
)
def test_plan_rotation(
    keys: list[SigningKey], at: int, forced: bool, action: Action, activate: int | None
) -> None:
    ring = KeyRing(keys, TIMING, T0 + at * S)
    plan = plan_rotation(ring, T0 + at * S, forced=forced)
    assert plan.action == action
    if activate is not None:
        assert plan.activate_at == T0 + activate * S


def test_plan_prepares_when_the_source_lost_the_newest_key() -> None:
    ring = KeyRing([key("a", 0)], TIMING, T0 + 20 * S)
    assert plan_rotation(ring, T0 + 20 * S, source_kids={"a"}).action == Action.NONE
    plan = plan_rotation(ring, T0 + 20 * S, source_kids=set())
    assert plan.action == Action.PREPARE and plan.activate_at == T0 + 30 * S
    # once the new key is in the source (and the ring), nothing more is planned
    after = KeyRing([key("a", 0), key("n", 30, 20)], TIMING, T0 + 21 * S)
    assert plan_rotation(after, T0 + 21 * S, source_kids={"n"}).action == Action.NONE


def test_next_change() -> None:
    assert RING.next_change(T0 + 50 * S) == T0 + 100 * S
    assert RING.next_change(T0 + 100 * S) == T0 + 120 * S
    assert RING.next_change(T0 + 120 * S) is None
