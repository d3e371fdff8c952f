"""W3C Trace Context parsing (svidgate.tracecontext): what continues a trace, what starts a
new one, and what tracestate is passed on."""

from __future__ import annotations

import pytest

from svidgate.tracecontext import (
    MAX_TRACESTATE,
    TraceParent,
    incoming,
    new_header,
    new_traceparent,
    parse_traceparent,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


def test_a_valid_traceparent_is_parsed() -> None:
    parent = parse_traceparent(f"00-{TRACE}-{SPAN}-01")
    assert parent == TraceParent(TRACE, SPAN, 1) and parent.sampled
    assert parent.header() == f"00-{TRACE}-{SPAN}-01"
    assert parent.child("b7ad6b7169203331").header() == f"00-{TRACE}-b7ad6b7169203331-01"
    # a later version may add fields after the flags: the known part is used
    assert parse_traceparent(f"01-{TRACE}-{SPAN}-00-more") == TraceParent(TRACE, SPAN, 0)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "garbage",
        f"00-{TRACE}-{SPAN}-1",  # flags too short
        f"00-{TRACE.upper()}-{SPAN}-01",  # upper case
        f"ff-{TRACE}-{SPAN}-01",  # forbidden version
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 ends at the flags
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE}-{SPAN}",
    ],
)
def test_an_invalid_traceparent_is_refused(value: str) -> None:
    assert parse_traceparent(value) is None


def test_incoming_keeps_one_valid_parent_and_a_bounded_tracestate() -> None:
    given = f"00-{TRACE}-{SPAN}-01"
    assert incoming([given], ["a=1", " b=2 "]) == (TraceParent(TRACE, SPAN, 1), "a=1,b=2")
    assert incoming([given], []) == (TraceParent(TRACE, SPAN, 1), None)
    assert incoming([given], ["a=" + "x" * MAX_TRACESTATE]) == (TraceParent(TRACE, SPAN, 1), None)
    assert incoming([given, given], ["a=1"]) == (None, None)  # several: invalid
    assert incoming(["nope"], ["a=1"]) == (None, None)  # no tracestate without a parent
    assert incoming([], ["a=1"]) == (None, None)


def test_new_traces_are_valid_unsampled_and_distinct() -> None:
    headers = {new_header() for _ in range(100)}
    assert len(headers) == 100
    for header in headers:
        parent = parse_traceparent(header)
        assert parent is not None and not parent.sampled
    fresh = new_traceparent(sampled=True)
    assert fresh.sampled and parse_traceparent(fresh.header()) == fresh
