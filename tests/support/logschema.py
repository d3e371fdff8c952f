"""The log schema both services write (DESIGN.md "Observability"), as one check tests apply to
every line a gateway or signer process wrote: a JSON object with ``time`` (RFC 3339, UTC,
milliseconds), ``level``, ``service``, ``event`` first, in that order; access lines carry
every access field."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warning", "error", "critical"}
HEAD = ["time", "level", "service", "event"]
ACCESS_FIELDS = {
    "request_id",
    "client",
    "method",
    "path",
    "status",
    "bytes_in",
    "bytes_out",
    "route",
    "spiffe_id",
    "upstream",
    "duration_ms",
}


def check_line(line: str, service: str) -> dict[str, Any]:
    """Parse one line and assert it follows the schema; returns the object."""
    doc = json.loads(line)
    assert isinstance(doc, dict), line
    assert list(doc)[:4] == HEAD, f"the line does not start with {HEAD}: {line}"
    assert TIME.match(doc["time"]), f"time is not RFC 3339 UTC with ms: {line}"
    assert doc["level"] in LEVELS, line
    assert doc["service"] == service, line
    assert isinstance(doc["event"], str) and doc["event"], line
    if doc["event"] == "access":
        missing = ACCESS_FIELDS - set(doc)
        assert not missing, f"access line without {sorted(missing)}: {line}"
        assert "?" not in doc["path"], f"the access path carries a query: {line}"
    return doc


def read_events(path: Path, service: str) -> list[dict[str, Any]]:
    """Every complete line of a process's stderr file, each checked against the schema (a
    line still being written is left out)."""
    complete = path.read_text(errors="replace").rpartition("\n")[0]
    return [check_line(line, service) for line in complete.splitlines() if line.strip()]


def messages(events: list[dict[str, Any]], level: str | None = None) -> list[str]:
    """The ``message`` of every plain log line (``event: "log"``) among ``events``, only those
    at ``level`` when it is given."""
    return [
        str(e.get("message", ""))
        for e in events
        if e["event"] == "log" and (level is None or e["level"] == level)
    ]
