"""The signer's resource bounds at run time: gRPC server options per listener, long-lived stream
slots, the Sign concurrency gate and the file descriptor limit.

Every number comes from ``limits:`` in signer.yaml (:class:`svidgate.signer.config.LimitsConfig`)
except the message size, which the contract fixes (:data:`MAX_MESSAGE_BYTES`). A limit that trips
raises :class:`LimitExceededError` (RESOURCE_EXHAUSTED ``limit_exceeded: NAME (N) reached``) — or,
for the transport options, is enforced by gRPC core itself before the servicer runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

from svidgate.signer.config import LimitsConfig
from svidgate.signer.errors import SignerError

# The largest request the contract needs: a token (8 KiB), claims_json (limits.claims_bytes,
# at most 8 KiB) and audiences (at most 64 x 512 bytes) fit with room to spare. Larger messages
# are refused by gRPC core (RESOURCE_EXHAUSTED) before they are parsed.
MAX_MESSAGE_BYTES: Final = 64 * 1024
# Keepalive policy: the signer pings a silent connection every minute and drops it when the ping
# is not answered in 20 s (a vanished gateway frees its stream slots); clients may ping at most
# once a minute and only while they have calls (the gateway pings every 5 minutes, with its
# WatchKeys stream open); two strikes and a client gets GOAWAY.
KEEPALIVE_TIME_MS: Final = 60_000
KEEPALIVE_TIMEOUT_MS: Final = 20_000
MIN_CLIENT_PING_INTERVAL_MS: Final = 60_000
MAX_PING_STRIKES: Final = 2


class LimitExceededError(SignerError):
    """A resource limit of ``limits:`` is reached; the caller may retry later."""


def _ms(value: timedelta) -> int:
    return max(1, int(value.total_seconds() * 1000))


def server_options(limits: LimitsConfig, *, tcp: bool) -> list[tuple[str, int]]:
    """gRPC core channel arguments for one listener's server (``tcp``: the mTLS listener)."""
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_concurrent_streams", limits.streams_per_connection),
        ("grpc.server_handshake_timeout_ms", _ms(limits.handshake_timeout)),
        ("grpc.max_connection_idle_ms", _ms(limits.connection_idle)),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
        # the signer's own keepalive pings go on while a WatchKeys stream is silent for hours
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if tcp:
        # Unix callers hold no certificate that could expire or lose its trust
        options += [
            ("grpc.max_connection_age_ms", _ms(limits.connection_age)),
            ("grpc.max_connection_age_grace_ms", _ms(limits.connection_age_grace)),
            ("grpc.max_allowed_incoming_connections", limits.tcp_connections),
        ]
    return options


@dataclass(frozen=True, slots=True)
class FdLimit:
    before: int
    after: int
    hard: int


def raise_fd_limit() -> FdLimit:
    """Raise the soft RLIMIT_NOFILE to the hard limit (idle connections cost descriptors)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return FdLimit(soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard)


@dataclass
class StreamSlots:
    """Long-lived streams held at once: in total, per caller identity and per connection.

    The caller is a SPIFFE ID over TCP; every Unix caller is the one caller ``unix`` (gRPC does
    not tell Unix connections apart, so only the total and that caller's count apply there)."""

    name: str
    total: int
    per_caller: int
    per_connection: int | None = None
    _callers: Counter[str] = field(default_factory=Counter)
    _connections: Counter[str] = field(default_factory=Counter)
    _held: int = 0

    def acquire(self, caller: str, connection: str | None) -> StreamSlot:
        """A slot for one stream (release it when the stream ends); LimitExceededError when
        none is free."""
        if self._held >= self.total:
            raise LimitExceededError(f"{self.name} ({self.total}) reached")
        if self._callers[caller] >= self.per_caller:
            raise LimitExceededError(f"{self.name}_per_caller ({self.per_caller}) reached")
        limit = self.per_connection
        if connection is not None and limit is not None and self._connections[connection] >= limit:
            raise LimitExceededError(f"{self.name}_per_connection ({limit}) reached")
        self._held += 1
        self._callers[caller] += 1
        if connection is not None:
            self._connections[connection] += 1
        return StreamSlot(self, caller, connection)

    def _release(self, caller: str, connection: str | None) -> None:
        self._held -= 1
        _decrement(self._callers, caller)
        if connection is not None:
            _decrement(self._connections, connection)

    @property
    def held(self) -> int:
        return self._held


@dataclass
class StreamSlot:
    slots: StreamSlots
    caller: str
    connection: str | None
    released: bool = False

    def release(self) -> None:
        """Give the slot back (idempotent)."""
        if not self.released:
            self.released = True
            self.slots._release(self.caller, self.connection)


def _decrement(counter: Counter[str], key: str) -> None:
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


class SignGate:
    """At most ``concurrency`` Sign calls at work (a Transit call included) and ``queue`` more
    waiting; beyond that, Sign fails at once with RESOURCE_EXHAUSTED. Verify never passes
    through here, so a Sign flood cannot make it wait for a slot."""

    def __init__(self, concurrency: int, queue: int) -> None:
        self._free = asyncio.Semaphore(concurrency)
        self._queue = queue
        self._waiting = 0

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._free.locked():
            if self._waiting >= self._queue:
                raise LimitExceededError(f"sign_queue ({self._queue}) reached")
            self._waiting += 1
            try:
                await self._free.acquire()
            finally:
                self._waiting -= 1
        else:
            await self._free.acquire()
        try:
            yield
        finally:
            self._free.release()
