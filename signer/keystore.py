"""The live key store: the current :class:`KeyRing`, its source, polling, scheduled rotation,
revocation and key-set change notifications (WatchKeys). Sign and Verify read one immutable ring
reference.

The source is the truth: every successful read replaces the ring with exactly the keys the
source holds, so a key deleted there (revoked) stops signing and verifying at the next poll,
and :meth:`KeyStore.revoke` deletes one from the source and the ring at once. Every kid that
appears or disappears is logged (INFO, the kid only). Source errors never empty the cache: a
failed read changes nothing, the ring keeps serving verification, the store reports itself
degraded, and signing goes on until the cached active key's window runs out.

What enters the ring is checked here, once per kid: a key whose activation lies more than
``rotation.period`` ahead is refused (ERROR; no signer writes one, and it would stall rotation),
and a key this replica first sees with less than ``prepare_ahead`` to go (planted by another
Vault principal, say) signs ``prepare_ahead`` after it was first seen at the earliest (WARNING;
:func:`~svidgate.signer.keyring.effective_activation`). Keys on the first read, keys this
replica wrote, and every key while the active key is lost (revoked: whatever can sign must,
at once) are taken as they are, and so is a key once it was announced in time. The polling loop
survives whatever one round raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from svidgate.pki.durations import format_duration
from svidgate.pki.jwt_svid import (
    MAX_TOKEN_BYTES,
    VerificationKey,
    VerificationPolicy,
    VerifiedToken,
    verify_jwt_svid,
)
from svidgate.signer import jwt as sjwt
from svidgate.signer.config import SignerConfig
from svidgate.signer.errors import (
    InvalidRequestError,
    KeyNotFoundError,
    KeySourceError,
    NotReadyError,
    SigningUnavailableError,
    SourceCapacityError,
    SourceConflictError,
)
from svidgate.signer.keyring import (
    KeyRing,
    KeyState,
    SigningKey,
    Timing,
    effective_activation,
    later,
)
from svidgate.signer.rotation import Action, next_rotation_at, plan_rotation, versions_needed
from svidgate.signer.sources import KeySource

log = logging.getLogger("svidgate.signer.keys")
Clock = Callable[[], datetime]
MIN_TOKEN_LIFETIME = timedelta(seconds=1)


def utcnow() -> datetime:
    return datetime.now(UTC)


class SignedToken(NamedTuple):
    """What Sign returns: the compact JWS, the key that signed it, its ``exp`` and ``jti``."""

    token: str
    kid: str
    expires_at: int
    jti: str = ""


@dataclass(frozen=True, slots=True)
class VerifyResult:
    token: VerifiedToken
    key_valid_until: int


def timing_from(cfg: SignerConfig) -> Timing:
    return Timing(
        period=cfg.rotation.period,
        prepare_ahead=cfg.rotation.prepare_ahead,
        retain=cfg.retain_retired,
        clock_skew=cfg.tokens.clock_skew,
        max_ttl=cfg.tokens.max_ttl,
    )


class KeyStore:
    def __init__(self, source: KeySource, cfg: SignerConfig, *, clock: Clock = utcnow) -> None:
        self.source = source
        self.cfg = cfg
        self.clock = clock
        self.timing = timing_from(cfg)
        self.policy = VerificationPolicy(cfg.issuer, cfg.tokens.clock_skew, cfg.tokens.max_ttl)
        self.ring: KeyRing | None = None
        # Sequence numbers start from the wall clock (ms) so they keep growing across restarts:
        # a watcher that reconnects with its last sequence is never left waiting for a number
        # this process has not reached.
        self.sequence = int(time.time() * 1000)
        self.jwks_json = json.dumps({"keys": [], "issuer": cfg.issuer})
        self.source_healthy = False
        self.source_errors = 0  # failed rounds of the background loop (for metrics)
        self.last_error: str | None = None
        self._changed = asyncio.Condition()
        self._closing = False
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._write_lock = asyncio.Lock()
        self._source_kids: frozenset[str] = frozenset()
        # kids revoked by this process: a read that started before the deletion cannot
        # bring one back
        self._revoked: set[str] = set()
        # while the active key is gone from the source: the kids it had superseded (they never
        # sign again; a fresh key replaces it), else None
        self._lost_active: frozenset[str] | None = None
        # kid -> when this replica first saw it (None: taken as it is, see the module doc)
        self._first_seen: dict[str, datetime | None] = {}
        self._reported: set[str] = set()  # kids whose refusal or delay was logged
        self._version_limit: int | None = None
        self._rotation_refusal = ""  # the last refused rotation's message (logged once)

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="signer-keystore"),
            asyncio.create_task(self._background(), name="signer-source-upkeep"),
        ]

    async def _background(self) -> None:
        try:
            await self.source.background()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("key source upkeep stopped")

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.source.close()

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                await self.refresh()
                await self.maintain()
                backoff = 0.2
            except KeySourceError as exc:
                self._mark_unhealthy(exc)
            except SourceCapacityError:
                pass  # logged where it was raised; the ring keeps every key
            except Exception as exc:  # never let the loop die; the cache stays in use
                log.exception("key store maintenance failed")
                self._mark_unhealthy(exc)
            delay = self._settle()
            if not self.source_healthy:
                delay = min(delay, backoff)
                backoff = min(backoff * 2, self.timing.prepare_ahead.total_seconds() / 4, 5.0)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, delay))

    def _mark_unhealthy(self, exc: Exception) -> None:
        self.source_errors += 1
        if self.source_healthy or self.last_error != str(exc):
            log.warning("key source %s unavailable: %s", self.source.description, exc)
        self.source_healthy = False
        self.last_error = str(exc)

    def _settle(self) -> float:
        """Publish the key set and return the seconds until the next round; never raises."""
        try:
            self.publish()
            return self._next_wake()
        except Exception:
            log.exception("key store publication failed")
            return self.cfg.rotation.poll_interval.total_seconds()

    def _next_wake(self) -> float:
        now = self.clock()
        candidates = [self.cfg.rotation.poll_interval.total_seconds()]
        if self.ring is not None:
            for when in (self.ring.next_change(now), next_rotation_at(self.ring)):
                if when is not None and when > now:
                    candidates.append((when - now).total_seconds() + 0.01)
        return min(candidates)

    def wake(self) -> None:
        self._wake.set()

    # -- source synchronisation ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the source and swap in the ring it describes; removed keys are deleted from it."""
        # the read's start time is what the ring is fresh as of: a key another replica creates
        # while the read is in flight is unseen, and activates prepare_ahead after it at least
        started = self.clock()
        loaded = [k for k in await self.source.load() if k.kid not in self._revoked]
        self._source_kids = frozenset(k.kid for k in loaded)
        old = self.ring or KeyRing([], self.timing, started)
        keys = self._admit(loaded, old, started)
        ring = KeyRing.from_source(keys, self.timing, started)
        self._note_changes(old, ring, started)
        self.ring = ring
        self.source_healthy = True
        self.last_error = None
        self._check_version_limit()
        kept = {k.kid for k in ring.keys}
        removed = [k.kid for k in keys if k.kid not in kept]
        if removed:
            try:
                await self.source.remove(removed)
            except KeySourceError as exc:
                log.warning("could not delete removed keys from the source: %s", exc)
        self.publish()

    def _admit(self, loaded: list[SigningKey], old: KeyRing, now: datetime) -> list[SigningKey]:
        """The loaded keys the ring may hold, at their effective activation times."""
        active = old.active(now)
        as_given = (
            not old.published(now)  # the first read, or nothing to sign with yet
            or self._lost_active is not None
            or (active is not None and active.kid not in self._source_kids)  # lost just now
        )
        # first seen: after the read (a key written while it was in flight counts from here)
        seen = None if as_given else self.clock()
        admitted = [self._admit_one(key, seen, now) for key in loaded]
        self._first_seen = {k: v for k, v in self._first_seen.items() if k in self._source_kids}
        self._reported &= self._source_kids
        return [key for key in admitted if key is not None]

    def _admit_one(
        self, key: SigningKey, seen: datetime | None, now: datetime
    ) -> SigningKey | None:
        """``key`` as the ring takes it (first seen ``seen`` unless known), or None (refused)."""
        period = self.cfg.rotation.period
        if key.activate_at > later(now, period):
            self._report(
                key,
                logging.ERROR,
                f"skipped, not a usable signing key: activate_at {key.activate_at.isoformat()} "
                f"is more than rotation.period ({format_duration(period)}) ahead",
            )
            return None
        first_seen = self._first_seen.setdefault(key.kid, seen) if seen is not None else None
        effective = effective_activation(
            key.activate_at, first_seen, self.timing.prepare_ahead, self.cfg.key_propagation
        )
        if effective == key.activate_at:
            # announced in time (or taken as given): trusted from now on, even if its
            # activation moves (a Transit version that becomes the oldest activates at once)
            self._first_seen[key.kid] = None
            return key
        self._report(
            key,
            logging.WARNING,
            f"activates at {key.activate_at.isoformat()}, less than rotation.prepare_ahead "
            f"after this replica first saw it: it signs from {effective.isoformat()} at the "
            "earliest",
        )
        return replace(key, activate_at=effective)

    def _report(self, key: SigningKey, level: int, message: str) -> None:
        """Log a refused or delayed key once while it stays in the source."""
        if key.kid not in self._reported:
            self._reported.add(key.kid)
            log.log(level, "key %s (%s) %s", key.kid, key.origin or "?", message)

    def _check_version_limit(self) -> None:
        """Warn (once per value) when the source keeps fewer versions than the ring may need."""
        limit, needed = self.source.version_limit(), versions_needed(self.timing)
        if limit is not None and limit < needed and limit != self._version_limit:
            log.warning(
                "key source %s keeps %d versions (max_versions), fewer than the %d the key ring "
                "may need (prepared, active and retired keys: retain_retired / prepare_ahead + "
                "3, and 2 spare); a rotation that would prune a published key is refused: "
                "bao kv metadata put -max-versions=%d %s",
                self.source.description,
                limit,
                needed,
                needed,
                self.source.description.partition(":")[2],
            )
        self._version_limit = limit

    def _note_changes(self, old: KeyRing, new: KeyRing, now: datetime) -> None:
        """Log every kid that appeared or disappeared; notice a lost active key."""
        before, after = {k.kid for k in old.keys}, {k.kid for k in new.keys}
        for kid in sorted(after - before):
            log.info("key %s appeared in the key source", kid)
        for kid in sorted(before - after):
            if kid in self._source_kids:
                log.info("key %s removed (its retention is over)", kid)
            else:
                log.info("key %s is gone from the key source (revoked)", kid)
        active = old.active(now)
        if active is not None and active.kid not in self._source_kids:
            self._lose_active(old, now)

    def _lose_active(self, ring: KeyRing, now: datetime) -> None:
        self._lost_active = (self._lost_active or frozenset()) | ring.superseded(now)

    async def maintain(self) -> None:
        """Bootstrap an empty source, replace a lost active key, run the scheduled rotation."""
        if self.ring is None:
            return
        plan = plan_rotation(self.ring, self.clock(), lost_active=self._lost_active)
        if plan.action == Action.NONE:
            self._lost_active = None  # a key that was never superseded is active (or none was lost)
            return
        await self._create(forced=False)

    async def _create(self, *, forced: bool) -> SigningKey | None:
        async with self._write_lock:
            return await self._create_locked(forced=forced)

    async def _create_locked(self, *, forced: bool) -> SigningKey | None:
        for _ in range(5):
            assert self.ring is not None
            plan = plan_rotation(
                self.ring, self.clock(), forced=forced, lost_active=self._lost_active
            )
            if plan.action == Action.NONE:
                self._lost_active = None
                return None
            try:
                key = await self.source.create(plan)
            except SourceConflictError:
                await self.refresh()
                continue
            except SourceCapacityError as exc:
                if str(exc) != self._rotation_refusal:
                    log.error("%s rotation refused: %s", plan.action, exc)
                self._rotation_refusal = str(exc)
                raise
            self._rotation_refusal = ""
            self._first_seen[key.kid] = None  # this replica wrote it: no delay
            log.info("created %s key %s (activates %s)", plan.action, key.kid, key.activate_at)
            if plan.action in (Action.BOOTSTRAP, Action.REPLACE):
                self._lost_active = None
            await self.refresh()
            return key
        raise SourceConflictError("gave up after repeated check-and-set conflicts")

    async def rotate(self) -> tuple[str, str]:
        """Start a rotation now: a prepared key that activates ``prepare_ahead`` later."""
        await self.refresh()
        key = await self._create(forced=True)
        assert key is not None and self.ring is not None
        active = self.ring.active(self.clock())
        self.wake()
        return key.kid, active.kid if active is not None else ""

    async def revoke(self, kid: str) -> tuple[str, str]:
        """Delete ``kid`` from the source and the ring now and publish the new key set; a
        revoked active key is replaced by a fresh key at once. Returns (revoked, active kid)."""
        async with self._write_lock:
            await self.refresh()
            ring = self.ring
            assert ring is not None
            if kid not in self._source_kids:
                raise KeyNotFoundError(f"{kid} is not in {self.source.description}")
            now = self.clock()
            others = [s.key.kid for s in ring.published(now) if s.key.kid != kid]
            await self.source.revoke(kid, keep=others)
            self._revoked.add(kid)
            log.info("key %s revoked", kid)
            active = ring.active(now)
            if active is not None and active.kid == kid:
                self._lose_active(ring, now)
            self.ring = ring.without(kid)
            self.publish()
            try:
                await self.refresh()
                await self._create_locked(forced=False)
            except (KeySourceError, SourceCapacityError) as exc:  # gone: the loop retries the rest
                log.warning("key %s revoked; then the key source failed: %s", kid, exc)
        self.wake()
        return kid, self.signing_kid()

    # -- publication --------------------------------------------------------------------------

    def publish(self) -> None:
        if self.ring is None:
            return
        document = {**self.ring.jwks(self.clock()), "issuer": self.cfg.issuer}
        text = json.dumps(document, separators=(",", ":"))
        if text != self.jwks_json:
            self.jwks_json = text
            self.sequence += 1
            asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def watch(self, after: int) -> AsyncIterator[tuple[int, str]]:
        """Yield (sequence, jwks) whenever the key set changes past ``after``. A watcher ahead
        of this process (another replica's numbers, a clock step) gets the current set now."""
        if after > self.sequence and self.ring is not None:
            after = self.sequence - 1
        while not self._closing:
            async with self._changed:
                while self.sequence <= after and not self._closing:
                    await self._changed.wait()
                if self._closing:
                    return
                after, text = self.sequence, self.jwks_json
            yield after, text

    async def end_watches(self) -> None:
        """End every WatchKeys stream (graceful shutdown: streams would never finish)."""
        self._closing = True
        await self._notify()

    def statuses(self) -> list[dict[str, Any]]:
        if self.ring is None:
            return []
        return [
            {"kid": s.key.kid, "state": s.state.value, "activate_at": s.key.activate_at}
            for s in self.ring.statuses(self.clock())
        ]

    @property
    def can_verify(self) -> bool:
        return self.ring is not None and bool(self.ring.keys)

    @property
    def can_sign(self) -> bool:
        return bool(self.signing_kid())

    def signing_kid(self) -> str:
        """The kid that signs now, or "" when none can."""
        if self.ring is None:
            return ""
        now = self.clock()
        found = self.ring.sign_deadline(now)
        if found is None or found[1] - now < MIN_TOKEN_LIFETIME or self._superseded(found[0]):
            return ""
        return found[0].kid

    def _superseded(self, key: SigningKey) -> bool:
        return self._lost_active is not None and key.kid in self._lost_active

    # -- tokens -------------------------------------------------------------------------------

    async def sign(
        self,
        *,
        subject: str,
        audience: Sequence[str],
        ttl: timedelta | None,
        extra: dict[str, Any],
        thumbprint: str | None,
    ) -> SignedToken:
        ring = self.ring
        if ring is None:
            raise SigningUnavailableError("no keys loaded yet")
        now = self.clock()
        found = ring.sign_deadline(now)
        if found is None:
            raise SigningUnavailableError("no active key")
        key, deadline = found
        if self._superseded(key):
            raise SigningUnavailableError("the active key was revoked; a fresh key is on its way")
        if key.private_key is None and key.remote_sign is None:
            raise SigningUnavailableError("the active key cannot sign here")
        wanted = self.cfg.tokens.default_ttl if ttl is None else ttl
        if wanted < timedelta(0):
            raise InvalidRequestError("ttl_seconds must not be negative")
        lifetime = min(wanted, self.cfg.tokens.max_ttl, deadline - now)
        lifetime = timedelta(seconds=int(lifetime.total_seconds()))
        if lifetime < MIN_TOKEN_LIFETIME:
            raise SigningUnavailableError(
                "the cached active key's verification window has run out (key source unreachable)"
            )
        claims = sjwt.build_claims(
            issuer=self.cfg.issuer,
            subject=subject,
            audience=audience,
            now=now,
            ttl=lifetime,
            extra=extra,
            thumbprint=thumbprint,
        )
        data = sjwt.signing_input(key.algorithm, key.kid, claims)
        if key.private_key is not None:
            signature = sjwt.sign_local(key.algorithm, key.private_key, data)
        else:
            assert key.remote_sign is not None
            signature = await key.remote_sign(data)
        token = sjwt.assemble(data, signature)
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidRequestError(
                f"the token would exceed {MAX_TOKEN_BYTES} bytes (too many extra claims)"
            )
        return SignedToken(token, key.kid, int(claims["exp"]), str(claims["jti"]))

    def verify(
        self,
        token: str,
        *,
        audiences: Sequence[str],
        expected_subject: str = "",
        thumbprint: str = "",
        require_binding: bool = False,
    ) -> VerifyResult:
        """Verify with :func:`svidgate.pki.jwt_svid.verify_jwt_svid` against the ring's
        published keys; raises its JwtSvidError, or InvalidRequestError without audiences."""
        ring = self.ring
        if ring is None:
            raise NotReadyError("no keys loaded yet")
        if not audiences:
            raise InvalidRequestError("at least one expected audience is required")
        now = self.clock()

        def lookup(kid: str) -> VerificationKey:
            status = ring.lookup(kid, now)
            assert status.state != KeyState.REMOVED
            return status.key.verification_key

        result = verify_jwt_svid(
            token,
            lookup=lookup,
            policy=self.policy,
            audiences=audiences,
            now=now,
            expected_subject=expected_subject,
            certificate_thumbprint=thumbprint,
            require_binding=require_binding,
        )
        valid_until = ring.earliest_removal(result.kid, now)
        return VerifyResult(result, int(valid_until.timestamp()))
