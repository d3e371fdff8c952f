"""Go-style durations (``250ms``, ``90s``, ``15m``, ``1h30m``) used throughout the config."""

from __future__ import annotations

import re
from datetime import timedelta

from svidgate.pki.errors import DurationError

# Go's units: ns, us / µs (micro sign) / μs (Greek mu), ms, s, m, h. Nanoseconds round to µs.
_UNITS_US = {
    "ns": 0.001,
    "us": 1,
    "µs": 1,  # U+00B5 MICRO SIGN, as Go accepts
    "μs": 1,  # U+03BC GREEK SMALL LETTER MU, as Go accepts
    "ms": 1_000,
    "s": 1_000_000,
    "m": 60_000_000,
    "h": 3_600_000_000,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> timedelta:
    """Parse a non-negative Go-style duration; a bare ``0`` is allowed."""
    if not isinstance(text, str):
        raise DurationError(f"duration must be a string like '90s', got {type(text).__name__}")
    if text == "0":
        return timedelta(0)
    pos = 0
    total_us = 0.0
    for match in _PART.finditer(text):
        if match.start() != pos:
            break
        total_us += float(match.group(1)) * _UNITS_US[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise DurationError(f"{text!r} is not a duration (use forms like '250ms', '90s', '1h30m')")
    try:
        return timedelta(microseconds=round(total_us))
    except OverflowError:
        raise DurationError(f"{text!r} is too large a duration") from None


def format_duration(value: timedelta) -> str:
    """Format a duration the way Go would print it for whole units (``1h30m``, ``250ms``)."""
    total_us = round(value.total_seconds() * 1_000_000)
    if total_us == 0:
        return "0s"
    sign = "-" if total_us < 0 else ""
    total_us = abs(total_us)
    if total_us < 1_000_000:
        if total_us % 1000 == 0:
            return f"{sign}{total_us // 1000}ms"
        return f"{sign}{total_us}us"
    parts = []
    hours, rem = divmod(total_us, 3_600_000_000)
    minutes, rem = divmod(rem, 60_000_000)
    if hours:
        parts.append(f"{hours}h")
    if minutes:
        parts.append(f"{minutes}m")
    if rem:
        whole, frac = divmod(rem, 1_000_000)
        parts.append(f"{whole}.{frac:06d}".rstrip("0").rstrip(".") + "s")
    return sign + "".join(parts)
