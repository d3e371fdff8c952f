"""The shared bucket store: token buckets in Redis, updated by one atomic Lua script.

The script is :func:`svidgate.gateway.ratelimit.take` in Lua: refill by the time elapsed on
Redis' own clock (``TIME``: replicas on different hosts agree on it), take one token, store
the bucket as a hash with a TTL of its refill time plus a second (an expired bucket would have
been full: nothing is lost), and return whether the token was taken and the tokens left. It
runs with EVALSHA (EVAL the first time). One update is bounded by ``rate_limits.redis.timeout``
(waiting for a pooled connection, connecting and the reply together) and the pool by
``max_connections``; there are no retries. Every failure becomes
:class:`~svidgate.gateway.ratelimit.BackendError`, which ``on_backend_error`` handles.
"""

from __future__ import annotations

import asyncio

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from svidgate.gateway.config import RedisConfig
from svidgate.gateway.ratelimit import BackendError, Rate, Verdict, verdict

KEY_PREFIX = "svidgate:ratelimit:"

TAKE_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local state = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(state[1])
local updated = tonumber(state[2])
if tokens == nil or updated == nil then
  tokens = burst
else
  local elapsed = now - updated
  if elapsed < 0 then elapsed = 0 end
  tokens = math.min(burst, tokens + elapsed * rate)
end
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'updated', string.format('%.17g', now))
redis.call('EXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 1)
return {allowed, string.format('%.17g', tokens)}
"""


class RedisBuckets:
    """Buckets shared by every worker and replica that uses the same Redis."""

    def __init__(self, cfg: RedisConfig) -> None:
        self._timeout = cfg.timeout.total_seconds()
        self._pool: BlockingConnectionPool = BlockingConnectionPool.from_url(
            cfg.url,
            max_connections=cfg.max_connections,
            timeout=self._timeout,
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
        )
        self._client = Redis(connection_pool=self._pool, retry=Retry(NoBackoff(), 0))
        self._script = self._client.register_script(TAKE_SCRIPT)

    async def take(self, key: str, rate: Rate) -> Verdict:
        try:
            async with asyncio.timeout(self._timeout):
                reply = await self._script(
                    keys=[KEY_PREFIX + key], args=[repr(rate.per_second), rate.burst]
                )
            allowed, tokens = int(reply[0]), float(reply[1])
        except (RedisError, OSError, TimeoutError) as exc:
            raise BackendError(type(exc).__name__) from None
        except (TypeError, ValueError, IndexError) as exc:
            raise BackendError(f"unexpected reply: {type(exc).__name__}") from None
        return verdict(bool(allowed), tokens, rate)

    async def close(self) -> None:
        await self._client.aclose()
        await self._pool.disconnect()
