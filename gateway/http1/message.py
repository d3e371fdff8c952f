"""What the core hands to the request pipeline: the parsed :class:`Request` (immutable, one per
request), and per connection the :class:`Admission` an identity check returns and the
:class:`ConnectionInfo` every request of that connection shares."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

P = TypeVar("P")

Headers = tuple[tuple[bytes, bytes], ...]


class Request(NamedTuple):
    """One request head, validated by the core (a NamedTuple: immutable and cheap to build).

    ``path``/``query`` come from the raw target (an absolute-form target is reduced to its
    origin-form after its authority was checked against ``Host``); nothing is decoded or
    canonicalized here. ``headers`` keep the client's order, names lower-cased, values without
    surrounding whitespace."""

    method: str
    target: bytes  # the request-target exactly as received
    path: str  # origin-form path, raw (percent-escapes untouched)
    query: str | None  # after '?', raw; None without '?'
    version: tuple[int, int]  # (1, 0) or (1, 1)
    headers: Headers
    host: bytes | None  # the one Host value (None only for HTTP/1.0 without Host)
    content_length: int | None  # None: no Content-Length (chunked, or no body)
    chunked: bool
    keep_alive: bool  # what the client asked for (HTTP/1.0 keep-alive included)
    expect_continue: bool

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case bytes), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of header ``name`` (lower-case bytes), in order."""
        return [value for key, value in self.headers if key == name]


@dataclass(frozen=True, slots=True)
class Admission(Generic[P]):
    """What an identity check returns for an accepted connection.

    ``peer`` is the caller's own per-connection object (identity, pre-encoded identity header
    bytes …) handed back with every request; ``key`` is what
    ``max_connections_per_identity`` counts; the connection is closed ``expires_in`` seconds
    from now (the client certificate's notAfter)."""

    peer: P
    key: Hashable
    expires_in: float | None = None


@dataclass(frozen=True, slots=True)
class ConnectionInfo(Generic[P]):
    """Per-connection data every request on the connection sees."""

    peer: P
    key: Hashable
    peername: Any  # the transport's ``peername`` (host, port, …) or None
