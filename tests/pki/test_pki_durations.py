"""Go-style durations."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from svidgate.pki.durations import format_duration, parse_duration
from svidgate.pki.errors import DurationError, PkiError

VALID = [
    ("0", timedelta(0)),
    ("0s", timedelta(0)),
    ("250ms", timedelta(milliseconds=250)),
    ("90s", timedelta(seconds=90)),
    ("15m", timedelta(minutes=15)),
    ("24h", timedelta(hours=24)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
    ("2h45m0.5s", timedelta(hours=2, minutes=45, milliseconds=500)),
    ("1.5h", timedelta(minutes=90)),
    ("0.25s", timedelta(milliseconds=250)),
    ("10us", timedelta(microseconds=10)),
    ("10µs", timedelta(microseconds=10)),  # U+00B5 micro sign
    ("10\u03bcs", timedelta(microseconds=10)),  # U+03BC Greek mu (Go accepts both)
    ("1000ns", timedelta(microseconds=1)),
    ("1500ns", timedelta(microseconds=2)),  # rounded to the microsecond
    (".5s", timedelta(milliseconds=500)),
    ("5.s", timedelta(seconds=5)),
    ("1h.5m", timedelta(hours=1, seconds=30)),
    ("1s500ms", timedelta(milliseconds=1500)),
    ("8760h", timedelta(days=365)),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_parse_go_forms(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


INVALID = [
    "",
    "5",
    "1d",
    "1w",
    "-5s",
    "+5s",
    "1h 30m",
    " 1h",
    "1h ",
    "1H",
    "h",
    "s5",
    ".s",
    ".",
    "5..s",
    "1.2.3s",
    "5ns5",
    "1e3s",
    "1,5s",
    "ms",
    "5 s",
    "1hh",
    "0x10s",
]


@pytest.mark.parametrize("text", INVALID)
def test_refused_with_a_hint(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    assert repr(text) in str(info.value)
    assert "'90s'" in str(info.value)
    assert issubclass(DurationError, PkiError)


def test_non_string_is_refused() -> None:
    with pytest.raises(DurationError, match="must be a string"):
        parse_duration(90)  # type: ignore[arg-type]


def test_absurdly_large_is_a_duration_error_not_a_crash() -> None:
    with pytest.raises(DurationError, match="too large"):
        parse_duration("99999999999999999999h")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(0), "0s"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(microseconds=1500), "1500us"),
        (timedelta(seconds=90), "1m30s"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(days=365), "8760h"),
        (timedelta(seconds=59, microseconds=123456), "59.123456s"),
        (timedelta(seconds=1, microseconds=1), "1.000001s"),
        (timedelta(hours=2, milliseconds=500), "2h0.5s"),
    ],
)
def test_format(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@settings(max_examples=300, deadline=None)
@given(st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=3650)))
def test_format_then_parse_round_trips(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value
