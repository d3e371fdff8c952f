"""What a peer may hold on one worker, and how often each limit tripped.

:class:`Limits` carries DESIGN.md's ``limits:`` defaults (safe on a 512 MiB pod); the gateway's
config maps onto it. :class:`Counters` are plain integers the core bumps when a limit trips
(cheap on the hot path); the gateway exports them as metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-worker limits of the HTTP/1.1 data plane. Times in seconds, sizes in bytes."""

    max_connections: int = 4096  # open TCP connections; beyond: closed before the handshake
    max_connections_per_identity: int = 512  # per admission key; beyond: closed after it
    handshake_timeout: float = 5.0  # the TLS handshake must finish in this time
    # TLS handshakes in progress (ClientHello received, not finished); a new one beyond this
    # resets the oldest (a real client finishes in a round trip; a stalled one holds ~60 KiB).
    max_handshakes: int = 1024
    header_timeout: float = 10.0  # a complete request head must arrive within this: else 408
    idle_timeout: float = 60.0  # a keep-alive connection with no request is closed after this
    max_header_bytes: int = 16384  # request line + header section; 431 beyond
    max_headers: int = 100  # header fields per request; 431 beyond
    max_body_bytes: int = 10 * 1024 * 1024  # 413 beyond; a handler may set its own per request
    body_timeout: float = 30.0  # a client that stalls its body while it is awaited: 408
    write_timeout: float = 30.0  # a client that does not read its response is cut after this
    write_buffer_high: int = 64 * 1024  # a response writer waits for the client above this
    body_buffer_high: int = 256 * 1024  # unread request-body bytes buffered before reading pauses

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not value > 0:
                raise ValueError(f"limits.{f.name} must be positive, got {value!r}")


class Counters:
    """How often each limit or refusal tripped on one listener (monotonic integers)."""

    __slots__ = (
        "accepted",
        "bad_requests",
        "body_timeouts",
        "body_too_large",
        "handshake_failed",
        "head_too_large",
        "header_timeouts",
        "identity_over_cap",
        "identity_refused",
        "idle_closed",
        "over_capacity",
        "requests",
        "write_timeouts",
    )

    def __init__(self) -> None:
        self.accepted = 0  # TCP connections accepted and admitted to the handshake
        self.over_capacity = 0  # closed before the handshake: max_connections reached
        self.handshake_failed = 0  # TLS handshake failed or timed out
        self.identity_refused = 0  # the identity check refused the peer
        self.identity_over_cap = 0  # max_connections_per_identity reached
        self.requests = 0  # request heads parsed and handed to the handler
        self.bad_requests = 0  # refused by the core: malformed or unsupported (4xx/5xx)
        self.head_too_large = 0  # 431
        self.body_too_large = 0  # 413
        self.header_timeouts = 0  # 408: the request head did not arrive in time
        self.body_timeouts = 0  # 408: the client stalled its body
        self.write_timeouts = 0  # the client did not read its response: cut
        self.idle_closed = 0  # keep-alive connections closed after idle_timeout

    def snapshot(self) -> dict[str, int]:
        """Every counter by name (for metrics, logs and tests)."""
        return {name: getattr(self, name) for name in self.__slots__}
