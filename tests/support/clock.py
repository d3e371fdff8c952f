"""A clock for KeyStore's ``clock`` parameter that a test can move forward: real UTC time plus
an offset. Time keeps flowing as usual; :meth:`JumpClock.jump` skips a stretch the test would
otherwise sit out (a signing window running out) — the store then sees the later time at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class JumpClock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def jump(self, delta: timedelta) -> None:
        assert delta >= timedelta(0), "time only moves forward"
        self.offset += delta
