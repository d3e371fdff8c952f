"""The token-bucket core (pure: it takes ``now``), the bounded per-worker bucket store, the
rate-limit config and the 429 / 503 responses of the one error table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from svidgate.gateway.config import RouteRateLimit, parse_config
from svidgate.gateway.errors import RateLimited, RateLimitUnavailable, response_spec
from svidgate.gateway.ratelimit import LocalBuckets, Rate, bucket_key, take

from svidgate.config import ConfigError

RATE = Rate(per_second=2.0, burst=3)


def drain(buckets: LocalBuckets, key: str, now: float, rate: Rate = RATE) -> int:
    """Requests admitted at ``now`` until the first refusal."""
    admitted = 0
    while buckets.take(key, rate, now).allowed:
        admitted += 1
    return admitted


def test_burst_then_refused_with_whole_seconds() -> None:
    tokens, verdicts = None, []
    for _ in range(4):
        tokens, v = take(tokens, 100.0, 100.0, RATE)
        verdicts.append(v)
    assert [v.allowed for v in verdicts] == [True, True, True, False]
    assert [v.remaining for v in verdicts] == [2, 1, 0, 0]
    refused = verdicts[-1]
    assert refused.retry_after == 1  # 0.5 s to the next token, rounded up to a whole second
    assert refused.reset == 2  # 3 tokens at 2/s: 1.5 s, rounded up
    assert refused.limit == 3


def test_refill_follows_the_clock_and_caps_at_burst() -> None:
    tokens, _ = take(None, 0.0, 0.0, RATE)  # 2 left
    tokens, v = take(tokens, 0.0, 0.25, RATE)  # +0.5 → 2.5, take one → 1.5
    assert v.allowed and tokens == pytest.approx(1.5)
    tokens, v = take(tokens, 0.25, 1000.0, RATE)  # long idle: full (3), take one → 2
    assert tokens == pytest.approx(2.0)
    slow = Rate(per_second=0.1, burst=1)
    tokens, v = take(None, 0.0, 0.0, slow)
    tokens, v = take(tokens, 0.0, 0.0, slow)
    assert not v.allowed and v.retry_after == 10


def test_a_clock_that_goes_back_adds_nothing() -> None:
    tokens, _ = take(None, 10.0, 10.0, RATE)
    tokens, _ = take(tokens, 10.0, 10.0, RATE)
    tokens, _ = take(tokens, 10.0, 10.0, RATE)
    tokens, v = take(tokens, 10.0, 5.0, RATE)
    assert not v.allowed and tokens == pytest.approx(0.0)


def test_local_buckets_are_per_key() -> None:
    buckets = LocalBuckets(max_keys=100)
    assert drain(buckets, "a", 0.0) == 3
    assert drain(buckets, "b", 0.0) == 3
    assert drain(buckets, "a", 0.5) == 1  # one token back after 0.5 s at 2/s


def test_local_buckets_stay_bounded() -> None:
    buckets = LocalBuckets(max_keys=50)
    for i in range(10_000):  # a flood of distinct identities within one instant
        buckets.take(f"id-{i}", RATE, 0.0)
    assert len(buckets) == 50
    # an identity seen recently keeps its (empty) bucket: no fresh burst for it
    drain(buckets, "hot", 0.0)
    buckets.take("other", RATE, 0.0)
    assert not buckets.take("hot", RATE, 0.0).allowed


def test_idle_full_buckets_are_forgotten() -> None:
    buckets = LocalBuckets(max_keys=1000)
    for i in range(100):
        buckets.take(f"id-{i}", RATE, 0.0)
    # 1.5 s later every one of them is full again: requests passing by drop them
    for i in range(100):
        buckets.take("live", RATE, 2.0 + i * 0.01)
    assert len(buckets) < 10


def test_bucket_keys_do_not_collide() -> None:
    by_identity = RouteRateLimit(requests_per_second=1, burst=1, key="identity")
    by_route = RouteRateLimit(requests_per_second=1, burst=1, key="route")
    keys = {
        bucket_key("a|spiffe://x", by_route, "spiffe://y"),
        bucket_key("a", by_identity, "spiffe://x|spiffe://y"),
        bucket_key("a", by_route, "spiffe://y"),
        bucket_key("a", by_identity, "spiffe://y"),
    }
    assert len(keys) == 4


def test_429_and_503_come_from_the_one_table() -> None:
    spec = response_spec(RateLimited(limit=3, remaining=0, reset=2, retry_after=1))
    assert (spec.status, spec.error) == (429, "rate_limited")
    assert dict(spec.headers) == {
        "Retry-After": "1",
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "2",
    }
    spec = response_spec(RateLimitUnavailable("down"))
    assert (spec.status, spec.error, dict(spec.headers)) == (
        503,
        "rate_limit_unavailable",
        {"Retry-After": "1"},
    )


def _doc(**extra: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "tls": {"cert": "g.crt", "key": "g.key"},
        "trust_domains": {"example.org": {"bundle": "b.pem"}},
        "upstreams": {"u": {"url": "http://127.0.0.1:1"}},
        "routes": [
            {
                "name": "r",
                "match": {"path_prefix": "/"},
                "upstream": "u",
                "rate_limit": {"requests_per_second": 100, "burst": 200, "key": "route"},
            }
        ],
        **extra,
    }


def test_config_reads_the_documented_keys(tmp_path: Path) -> None:
    cfg = parse_config(
        _doc(
            rate_limits={
                "backend": "redis",
                "redis": {"url": "redis://127.0.0.1:6379/0", "timeout": "50ms"},
                "on_backend_error": "deny",
            }
        ),
        base_dir=tmp_path,
    )
    assert cfg.rate_limits.backend == "redis" and cfg.rate_limits.on_backend_error == "deny"
    assert cfg.rate_limits.redis.timeout.total_seconds() == pytest.approx(0.05)
    rl = cfg.routes[0].rate_limit
    assert rl is not None and (rl.requests_per_second, rl.burst, rl.key) == (100, 200, "route")
    assert parse_config(_doc(), base_dir=tmp_path).rate_limits.backend == "local"


@pytest.mark.parametrize(
    ("extra", "route_limit", "field"),
    [
        ({"rate_limits": {"backend": "memcached"}}, None, "rate_limits.backend"),
        ({"rate_limits": {"on_backend_error": "retry"}}, None, "rate_limits.on_backend_error"),
        ({"rate_limits": {"redis": {"url": "http://x"}}}, None, "rate_limits.redis.url"),
        ({"rate_limits": {"redis": {"timeout": "0s"}}}, None, "rate_limits.redis.timeout"),
        ({}, {"requests_per_second": 0, "burst": 1}, "routes.0.rate_limit.requests_per_second"),
        ({}, {"requests_per_second": 1, "burst": 0}, "routes.0.rate_limit.burst"),
        ({}, {"requests_per_second": 1, "burst": 1, "key": "ip"}, "routes.0.rate_limit.key"),
    ],
)
def test_config_errors_name_the_field(
    tmp_path: Path, extra: dict[str, Any], route_limit: dict[str, Any] | None, field: str
) -> None:
    doc = _doc(**extra)
    if route_limit is not None:
        doc["routes"][0]["rate_limit"] = route_limit
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_config(doc, base_dir=tmp_path)


def test_a_redis_password_is_never_echoed(tmp_path: Path) -> None:
    doc = _doc(rate_limits={"redis": {"url": "http://:hunter2@127.0.0.1:6379"}})
    with pytest.raises(ConfigError) as info:
        parse_config(doc, base_dir=tmp_path)
    assert "hunter2" not in str(info.value)
