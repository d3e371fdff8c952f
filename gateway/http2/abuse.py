"""How much of each cheap-to-send, costly-to-serve frame one HTTP/2 connection may send.

Each kind (stream resets, SETTINGS, PING, PRIORITY, WINDOW_UPDATE, empty DATA) has its own
token bucket (:class:`FloodMeter`: a burst, refilled at a steady rate). A client over any of
them is treated as an attack (rapid reset CVE-2023-44487, the 2019 flood family
CVE-2019-9512/9515/9516/9518): the connection answers GOAWAY ``ENHANCE_YOUR_CALM`` and closes.
Pure: the caller passes ``now``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Flood(enum.Enum):
    """The frame kinds a client could flood with; the value names it in logs and metrics."""

    RESET = "rapid_reset"
    SETTINGS = "settings_flood"
    PING = "ping_flood"
    PRIORITY = "priority_flood"
    WINDOW_UPDATE = "window_update_flood"
    EMPTY_DATA = "empty_data_flood"


@dataclass(frozen=True, slots=True)
class Budget:
    """``burst`` frames at once, then ``rate`` per second."""

    burst: float
    rate: float


# Generous for real clients (a gRPC client cancelling streams, keep-alive pings, a browser's
# PRIORITY frames), tiny against the thousands per second an attack sends.
BUDGETS: dict[Flood, Budget] = {
    Flood.RESET: Budget(200, 100),
    Flood.SETTINGS: Budget(32, 4),
    Flood.PING: Budget(64, 16),
    Flood.PRIORITY: Budget(512, 256),
    Flood.WINDOW_UPDATE: Budget(2048, 1024),
    Flood.EMPTY_DATA: Budget(256, 128),
}


class FloodMeter:
    """One token bucket."""

    __slots__ = ("_at", "_budget", "_tokens")

    def __init__(self, budget: Budget, now: float) -> None:
        self._budget = budget
        self._tokens = budget.burst
        self._at = now

    def hit(self, now: float) -> bool:
        """Count one frame; False once the budget is spent (the client is flooding)."""
        budget = self._budget
        elapsed = now - self._at
        if elapsed > 0:
            self._tokens = min(budget.burst, self._tokens + elapsed * budget.rate)
            self._at = now
        self._tokens -= 1
        return self._tokens >= 0


class FloodGuard:
    """Every meter of one connection. WINDOW_UPDATE frames answering DATA the server sent are
    not a flood (a gRPC client acknowledges every response message, on the stream and on the
    connection): each DATA frame sent earns two that are not metered."""

    __slots__ = ("_meters", "_window_credit")

    def __init__(self, now: float) -> None:
        self._meters = {kind: FloodMeter(budget, now) for kind, budget in BUDGETS.items()}
        self._window_credit = 0

    def sent_data(self, frames: int = 1) -> None:
        """DATA frames went to the client: as many stream and connection updates may follow."""
        self._window_credit = min(self._window_credit + 2 * frames, 1 << 20)

    def hit(self, kind: Flood, now: float) -> bool:
        if kind is Flood.WINDOW_UPDATE and self._window_credit > 0:
            self._window_credit -= 1
            return True
        return self._meters[kind].hit(now)
