"""What one HTTP/2 connection may hold: DESIGN.md's ``limits.h2`` plus the windows."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class H2Limits:
    """Per-connection limits of the HTTP/2 core (sizes in bytes)."""

    max_concurrent_streams: int = 100  # advertised in SETTINGS; one more: GOAWAY
    max_header_list_bytes: int = 16384  # advertised; a larger header list: GOAWAY
    stream_window: int = 256 * 1024  # request-body bytes a stream may have unread
    connection_window: int = 1024 * 1024  # the same over every stream of the connection

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"limits.h2.{f.name} must be positive, got {value!r}")
        if self.connection_window < 65535:
            raise ValueError("limits.h2.connection_window must be at least 65535")
