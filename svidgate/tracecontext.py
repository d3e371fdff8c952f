"""W3C Trace Context (``traceparent`` / ``tracestate``), with no OpenTelemetry import: the
gateway propagates it on every request whether tracing is on or off.

``traceparent`` is ``00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`` (lower-case; an
all-zero id is invalid; a future version may carry more fields after the flags). A request
with exactly one valid ``traceparent`` continues that trace; none, several, or an invalid one
start a new trace (and its ``tracestate`` is dropped, as the spec asks). ``tracestate`` is
passed on only with a valid ``traceparent`` and only when it is bounded (≤ 512 bytes).
"""

from __future__ import annotations

import random
import re
from typing import Final, NamedTuple

TRACEPARENT: Final = "traceparent"
TRACESTATE: Final = "tracestate"
MAX_TRACESTATE: Final = 512  # bytes of tracestate passed on; a longer one is dropped
SAMPLED: Final = 0x01

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


class TraceParent(NamedTuple):
    """One parsed ``traceparent``: the trace, the caller's span, the flags (a tuple: built on
    every request, so it is cheap)."""

    trace_id: str
    parent_id: str
    flags: int

    @property
    def sampled(self) -> bool:
        return bool(self.flags & SAMPLED)

    def header(self) -> str:
        return f"00-{self.trace_id}-{self.parent_id}-{self.flags:02x}"

    def child(self, span_id: str) -> TraceParent:
        """The same trace, with ``span_id`` as the parent the next hop sees."""
        return TraceParent(self.trace_id, span_id, self.flags)


def parse_traceparent(value: str) -> TraceParent | None:
    """The parsed header, or None when it is not a valid ``traceparent``."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None  # ff is forbidden; version 00 has nothing after the flags
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return TraceParent(trace_id, parent_id, int(flags, 16))


def new_traceparent(*, sampled: bool = False) -> TraceParent:
    """A new trace: random ids (``random``, like OpenTelemetry's own id generator: trace ids
    must be unique, not secret), never all zero."""
    bits = _random_bits(192)
    trace, span = bits >> 64, bits & 0xFFFF_FFFF_FFFF_FFFF
    if not trace or not span:  # pragma: no cover - 2**-64
        return new_traceparent(sampled=sampled)
    return TraceParent(f"{trace:032x}", f"{span:016x}", SAMPLED if sampled else 0)


def new_header() -> str:
    """The ``traceparent`` of a new, unsampled trace, built directly (per request when
    tracing is off and the caller sent none)."""
    bits = _random_bits(192)
    trace, span = bits >> 64, bits & 0xFFFF_FFFF_FFFF_FFFF
    if not trace or not span:  # pragma: no cover - 2**-64
        return new_header()
    return f"00-{trace:032x}-{span:016x}-00"


_random_bits = random.getrandbits


def incoming(
    traceparents: list[str], tracestates: list[str]
) -> tuple[TraceParent | None, str | None]:
    """The caller's trace context from the request's header values: (parent or None, the
    tracestate to pass on or None)."""
    if len(traceparents) != 1:
        return None, None
    parent = parse_traceparent(traceparents[0].strip())
    if parent is None:
        return None, None
    state = ",".join(v.strip() for v in tracestates if v.strip())
    if not state or len(state) > MAX_TRACESTATE:
        return parent, None
    return parent, state
