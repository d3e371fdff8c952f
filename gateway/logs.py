"""The gateway's own lines on the shared schema (:mod:`svidgate.logs`): the per-request access
line, built as one f-string with no LogRecord once logging is configured (it is per request),
and failed TLS handshakes, at most ``per_second`` lines a second per worker (the next line
says how many were ``suppressed``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _json_str
from typing import Any

from svidgate.logs import emit, send

access_log = logging.getLogger("svidgate.access")
handshake_log = logging.getLogger("svidgate.gateway.handshake")

HANDSHAKE_LINES_PER_SECOND = 10


def _opt(text: str | None) -> str:
    return "null" if text is None else _json_str(text)


def _num(value: int | None) -> str:
    return "null" if value is None else str(value)


def access_line(
    *,
    request_id: str | None,
    client: str | None,
    method: str,
    path: str,
    status: int,
    bytes_in: int | None,
    bytes_out: int | None,
    route: str,
    spiffe_id: str,
    upstream: str | None,
    duration_ms: float,
    error: str | None,
    trace_id: str | None = None,
) -> str:
    """The access line's JSON object (``path`` never carries the query)."""
    line = (
        f'{{"event":"access","request_id":{_opt(request_id)},"client":{_opt(client)},'
        f'"method":{_json_str(method)},"path":{_json_str(path)},"status":{status},'
        f'"bytes_in":{_num(bytes_in)},"bytes_out":{_num(bytes_out)},"route":{_json_str(route)},'
        f'"spiffe_id":{_json_str(spiffe_id)},"upstream":{_opt(upstream)},'
        f'"duration_ms":{duration_ms},"error":{_opt(error)}'
    )
    if trace_id is not None:
        return f'{line},"trace_id":{_json_str(trace_id)}}}'
    return line + "}"


def log_access(**fields: Any) -> None:
    """Write one access line (the caller checked ``access_log`` is on)."""
    send(access_log, access_line(**fields))


class HandshakeLog:
    """Failed handshakes, one line each (``event: "handshake_failed"``, ``peer``, ``reason``),
    at most ``per_second`` a second: past that they are counted, and the next line written
    carries ``suppressed`` (how many were not written since the previous one)."""

    def __init__(
        self,
        per_second: int = HANDSHAKE_LINES_PER_SECOND,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_second = per_second
        self.clock = clock
        self._window = -1
        self._written = 0
        self.suppressed = 0

    def failed(self, peer: object, reason: str, detail: str | None = None) -> None:
        if not handshake_log.isEnabledFor(logging.INFO):
            return
        window = int(self.clock())
        if window != self._window:
            self._window, self._written = window, 0
        if self._written >= self.per_second:
            self.suppressed += 1
            return
        self._written += 1
        fields: dict[str, Any] = {"peer": _address(peer), "reason": reason}
        if detail:
            fields["detail"] = detail
        if self.suppressed:
            fields["suppressed"], self.suppressed = self.suppressed, 0
        emit(handshake_log, "handshake_failed", **fields)


def _address(peer: object) -> str | None:
    """``host:port`` (``[v6]:port``) of a peername tuple."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return None if peer is None else str(peer)
