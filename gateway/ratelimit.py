"""Rate limits: the token-bucket core, the per-worker bucket store, and the limiter the pipeline
calls (after policy, before the JWT: a denied caller consumes nothing, a flood never reaches
the signer).

- :func:`take` is the whole algorithm, pure (it takes ``now``, does no I/O): refill a bucket of
  ``burst`` tokens at ``requests_per_second`` since it was last updated, then take one token.
  The Redis backend (:mod:`svidgate.gateway.ratelimit_redis`) runs the same arithmetic in one
  Lua script; both turn the tokens left into a :class:`Verdict` through :func:`verdict`.
- :class:`LocalBuckets`: one worker's buckets, bounded (``rate_limits.max_keys``): idle buckets
  that have refilled to full are dropped as requests pass (forgetting a full bucket loses
  nothing), and beyond the bound the least recently used bucket is evicted.
- :class:`RateLimiter`: picks the backend (``rate_limits.backend``), applies
  ``on_backend_error`` when Redis fails (``local``: per-worker buckets, logged once per outage;
  ``deny``: :class:`RateLimitUnavailable` → 503; ``allow``) and raises :class:`RateLimited`
  (→ 429 through the one table in ``gateway.errors``).
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from svidgate.gateway.config import RateLimitsConfig, RouteRateLimit
from svidgate.gateway.errors import RateLimited, RateLimitUnavailable

log = logging.getLogger("svidgate.gateway")

BACKEND_RETRY_SECONDS = 1.0  # after a Redis failure, Redis is tried again this much later
_IDLE_CHECKS = 2  # least recently used buckets looked at per request (dropped when full)


@dataclass(frozen=True, slots=True)
class Rate:
    """A bucket's shape: ``burst`` tokens, refilled at ``per_second``."""

    per_second: float
    burst: int

    @classmethod
    def from_config(cls, cfg: RouteRateLimit) -> Rate:
        return cls(cfg.requests_per_second, cfg.burst)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One request's outcome and what the ``RateLimit-*`` headers say (whole seconds)."""

    allowed: bool
    limit: int  # the bucket's size (burst)
    remaining: int  # whole tokens left after this request
    reset: int  # seconds until the bucket is full again
    retry_after: int  # seconds until the next token (≥ 1 when refused, 0 when allowed)


def refill(tokens: float, updated: float, now: float, rate: Rate) -> float:
    """The tokens of a bucket that held ``tokens`` at ``updated``, at ``now`` (a clock that went
    back adds nothing)."""
    elapsed = max(now - updated, 0.0)
    return min(float(rate.burst), tokens + elapsed * rate.per_second)


def take(tokens: float | None, updated: float, now: float, rate: Rate) -> tuple[float, Verdict]:
    """Refill, then take one token if there is one. ``tokens`` None: a new (full) bucket.
    Returns the tokens left and the verdict."""
    level = float(rate.burst) if tokens is None else refill(tokens, updated, now, rate)
    allowed = level >= 1.0
    if allowed:
        level -= 1.0
    return level, verdict(allowed, level, rate)


def verdict(allowed: bool, tokens: float, rate: Rate) -> Verdict:
    """The verdict for a bucket left with ``tokens`` (shared by both backends)."""
    missing = max(float(rate.burst) - tokens, 0.0)
    retry = 0 if allowed else max(1, math.ceil((1.0 - tokens) / rate.per_second))
    return Verdict(
        allowed=allowed,
        limit=rate.burst,
        remaining=max(int(tokens + 1e-9), 0),
        reset=math.ceil(missing / rate.per_second - 1e-9),
        retry_after=retry,
    )


class _Bucket:
    __slots__ = ("full_at", "tokens", "updated")

    def __init__(self, tokens: float, updated: float, full_at: float) -> None:
        self.tokens = tokens
        self.updated = updated
        self.full_at = full_at  # when it will hold `burst` tokens again if left alone


class LocalBuckets:
    """One worker's buckets by key, at most ``max_keys`` of them (LRU order)."""

    def __init__(self, max_keys: int) -> None:
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, rate: Rate, now: float) -> Verdict:
        bucket = self._buckets.get(key)
        if bucket is None:
            tokens, result = take(None, now, now, rate)
            self._buckets[key] = bucket = _Bucket(tokens, now, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)  # the least recently used one
        else:
            self._buckets.move_to_end(key)
            tokens, result = take(bucket.tokens, bucket.updated, now, rate)
            bucket.tokens, bucket.updated = tokens, now
        bucket.full_at = now + (rate.burst - tokens) / rate.per_second
        self._drop_full(now)
        return result

    def _drop_full(self, now: float) -> None:
        """Forget the least recently used buckets that have refilled (nothing is lost)."""
        for _ in range(_IDLE_CHECKS):
            if len(self._buckets) <= 1:
                return
            key, oldest = next(iter(self._buckets.items()))
            if oldest.full_at > now:
                return
            del self._buckets[key]


class BackendError(Exception):
    """The shared bucket store did not answer (refused, timed out, or an error reply)."""


class SharedBuckets(Protocol):
    """A bucket store shared by every worker and replica (Redis)."""

    async def take(self, key: str, rate: Rate) -> Verdict: ...

    async def close(self) -> None: ...


def bucket_key(route: str, cfg: RouteRateLimit, identity: str) -> str:
    """One bucket per route (``key: route``) or per caller of a route (``key: identity``); the
    length prefix keeps a route name containing ``|`` from colliding with another key."""
    if cfg.key == "route":
        return f"{len(route)}:{route}"
    return f"{len(route)}:{route}|{identity}"


class RateLimiter:
    """The pipeline's rate-limit step for one worker."""

    def __init__(
        self,
        cfg: RateLimitsConfig,
        *,
        shared: SharedBuckets | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_backend_error: Callable[[], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.local = LocalBuckets(cfg.max_keys)
        self.shared = shared
        self._clock = clock
        self._count_error = on_backend_error
        self._retry_at = 0.0  # Redis is skipped until then after a failure
        self.outage = False  # Redis failed and has not answered since

    @classmethod
    def from_config(
        cls, cfg: RateLimitsConfig, *, on_backend_error: Callable[[], None] | None = None
    ) -> RateLimiter:
        shared: SharedBuckets | None = None
        if cfg.backend == "redis":
            from svidgate.gateway.ratelimit_redis import RedisBuckets

            shared = RedisBuckets(cfg.redis)
        return cls(cfg, shared=shared, on_backend_error=on_backend_error)

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()

    async def admit(self, route: str, cfg: RouteRateLimit, identity: str) -> Verdict:
        """Take one token for this request; raises :class:`RateLimited` when there is none
        (or :class:`RateLimitUnavailable` when Redis failed and the mode is ``deny``)."""
        key = bucket_key(route, cfg, identity)
        result = await self._take(key, Rate.from_config(cfg))
        if not result.allowed:
            raise RateLimited(
                limit=result.limit,
                remaining=result.remaining,
                reset=result.reset,
                retry_after=result.retry_after,
            )
        return result

    async def _take(self, key: str, rate: Rate) -> Verdict:
        if self.shared is None:
            return self.local.take(key, rate, self._clock())
        if self._clock() < self._retry_at:
            return self._fallback(key, rate)
        try:
            result = await self.shared.take(key, rate)
        except BackendError as exc:
            self._retry_at = self._clock() + BACKEND_RETRY_SECONDS
            if self._count_error is not None:
                self._count_error()
            if not self.outage:
                self.outage = True
                log.warning(
                    "rate-limit backend unavailable (%s): on_backend_error=%s until it answers",
                    exc,
                    self.cfg.on_backend_error,
                )
            return self._fallback(key, rate)
        if self.outage:
            self.outage = False
            log.warning("rate-limit backend answers again: shared limits restored")
        return result

    def _fallback(self, key: str, rate: Rate) -> Verdict:
        mode = self.cfg.on_backend_error
        if mode == "deny":
            raise RateLimitUnavailable("the rate-limit backend is unavailable")
        if mode == "allow":
            return Verdict(True, rate.burst, rate.burst, 0, 0)
        return self.local.take(key, rate, self._clock())
