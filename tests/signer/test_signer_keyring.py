"""Key ring states and rotation planning: table-driven, pure, ``now`` passed in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from svidgate.pki.jwt_svid import UnknownKidError
from svidgate.signer.errors import RotationPendingError
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


def test_the_source_is_the_truth() -> None:
    # issue 9: a key the source no longer holds is gone at once (it used to be kept until its
    # normal removal); keys already past their retention are not taken back either
    ring = KeyRing.from_source([key("a", 0), key("b", 100), key("c", 200)], TIMING, T0 + 210 * S)
    assert [k.kid for k in ring.keys] == ["b", "c"]  # a was removed at 120
    assert ring.lookup("b", T0 + 210 * S).state == KeyState.RETIRED
    after = KeyRing.from_source([key("c", 200)], TIMING, T0 + 211 * S)
    assert [k.kid for k in after.keys] == ["c"]
    with pytest.raises(UnknownKidError):
        after.lookup("b", T0 + 211 * S)
    assert {k["kid"] for k in after.jwks(T0 + 211 * S)["keys"]} == {"c"}
    assert KeyRing.from_source([], TIMING, T0).keys == ()


def test_without_and_superseded() -> None:
    assert [k.kid for k in RING.without("b").keys] == ["a"]
    assert RING.without("zzz").keys == RING.keys
    assert RING.superseded(T0 + 50 * S) == frozenset()
    assert RING.superseded(T0 + 110 * S) == {"a"}


@pytest.mark.parametrize(
    ("keys", "at", "forced", "action", "activate"),
    [
        ([], 5, False, Action.BOOTSTRAP, 5),
        ([key("a", 0)], 50, False, Action.NONE, None),
        ([key("a", 0)], 89, False, Action.NONE, None),
        ([key("a", 0)], 90, False, Action.PREPARE, 100),
        ([key("a", 0), key("b", 100, 90)], 95, False, Action.NONE, None),
        ([key("a", 0)], 20, True, Action.PREPARE, 30),
        ([key("a", 0), key("b", 100, 90)], 105, True, Action.PREPARE, 115),
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


def test_forced_rotation_is_refused_while_a_key_is_prepared() -> None:
    # issue 10: one rotation at a time (b is prepared until 100)
    ring = KeyRing([key("a", 0), key("b", 100, 90)], TIMING, T0 + 95 * S)
    with pytest.raises(RotationPendingError, match="key b is prepared and activates at"):
        plan_rotation(ring, T0 + 95 * S, forced=True)


def test_plan_replaces_a_lost_active_key() -> None:
    # b (active) was revoked: a, which b had superseded, is active again by the ring's rules
    # but may not sign: a fresh key activates at once
    revived = KeyRing([key("a", 0)], TIMING, T0 + 110 * S)
    plan = plan_rotation(revived, T0 + 110 * S, lost_active={"a"})
    assert plan.action == Action.REPLACE and plan.activate_at == T0 + 110 * S
    # only a prepared key is left: nobody could sign until it activates
    prepared = KeyRing([key("p", 130, 105)], TIMING, T0 + 110 * S)
    plan = plan_rotation(prepared, T0 + 110 * S, lost_active=set())
    assert plan.action == Action.REPLACE and plan.activate_at == T0 + 110 * S
    # a key that was never superseded took over (another replica's fresh key, or a Transit
    # version that is now the oldest): nothing to do
    fresh = KeyRing([key("a", 0), key("f", 110)], TIMING, T0 + 111 * S)
    assert plan_rotation(fresh, T0 + 111 * S, lost_active={"a"}).action == Action.NONE
    # without a loss, a revived ring plans as usual (scheduled rotation only)
    assert plan_rotation(revived, T0 + 50 * S).action == Action.NONE


def test_next_change() -> None:
    assert RING.next_change(T0 + 50 * S) == T0 + 100 * S
    assert RING.next_change(T0 + 100 * S) == T0 + 120 * S
    assert RING.next_change(T0 + 120 * S) is None
