"""The one log schema of both services, and the writer that keeps stderr off the event loop.

Every line is one JSON object on stderr: ``time`` (RFC 3339, UTC, milliseconds), ``level``,
``service`` (``gateway`` | ``signer``), ``event``, then the event's own fields. A structured
event is logged with :func:`emit` (fields) or :func:`send` (a prebuilt JSON object, for hot
lines); any other record (``log.info("text %s", x)``) becomes ``event: "log"`` with ``logger``
and ``message`` (and ``exc`` for a traceback).

Once :func:`configure` ran, lines go through a bounded queue to one writer thread, which
writes them in batches with ``os.write``. Nothing that logs ever waits on ``write(2)``: when
the queue is full (stderr blocked, or slower than the lines) a new line is dropped and
counted, and the writer reports the count (``event: "log_lines_dropped"``) as soon as it can
write again. ``urgent`` lines (denials, errors) wake the writer at once instead of waiting
for the next batch. At exit (``logging.shutdown``) what is pending is written out (waiting
at most ``CLOSE_TIMEOUT``); after a fork the child starts with an empty queue (the parent's
writer writes what was pending). Without :func:`configure` (tests in-process) records go
through :mod:`logging` as usual, the message being the JSON object without the three
leading fields.
"""

from __future__ import annotations

import json
import logging
import os
import select
import threading
import time
import weakref
from collections import deque
from typing import Any, Final

SERVICES: Final = ("gateway", "signer")
DEFAULT_CAPACITY: Final = 10_000  # lines waiting in the queue before new ones are dropped
DEFAULT_INTERVAL: Final = 0.01  # seconds the writer waits to batch lines after a wake-up
CLOSE_TIMEOUT: Final = 2.0  # seconds ``close`` waits for the writer at exit
LEVELS: Final = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warning",
    logging.ERROR: "error",
    logging.CRITICAL: "critical",
}

_WRITERS: weakref.WeakSet[LineWriter] = weakref.WeakSet()


class _Clock:
    """RFC 3339 UTC timestamps with milliseconds; the part up to the second is cached."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def format(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"


_CLOCK = _Clock()


def timestamp(now: float) -> str:
    """``now`` (seconds since the epoch) as ``2026-12-02T10:15:00.123Z``."""
    return _CLOCK.format(now)


def level_name(levelno: int) -> str:
    return LEVELS.get(levelno) or logging.getLevelName(levelno).lower()


def line_head(levelno: int, service: str, now: float) -> str:
    """The three fields every line starts with, as the opening of a JSON object."""
    return f'{{"time":"{_CLOCK.format(now)}","level":"{level_name(levelno)}","service":"{service}",'


def fields_json(fields: dict[str, Any]) -> str:
    """An event's fields as one JSON object (``default=str`` for addresses, paths, …)."""
    return json.dumps(fields, separators=(",", ":"), default=str)


class LineWriter:
    """A bounded queue of lines and the daemon thread that writes them to a file descriptor.

    :meth:`put` never blocks: over ``capacity`` waiting lines it drops the line and counts it
    (``dropped``, for metrics; the writer logs the count once it can write again)."""

    def __init__(
        self,
        fd: int,
        service: str,
        *,
        capacity: int = DEFAULT_CAPACITY,
        interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.fd = fd
        self.service = service
        self.capacity = capacity
        self.interval = interval
        self.dropped = 0  # every line dropped since start
        self._unreported = 0  # dropped lines not yet reported in a log_lines_dropped line
        self._pending: deque[str] = deque()
        self._io_lock = threading.Lock()
        self._wake = threading.Event()  # something to write
        self._hurry = threading.Event()  # write it now: an urgent line, or close()
        self._closed = False
        self._thread: threading.Thread | None = None
        _WRITERS.add(self)

    def put(self, line: str, *, urgent: bool = False) -> bool:
        """Queue one line (no newline); False when it was dropped."""
        pending = self._pending
        if len(pending) >= self.capacity:
            self.dropped += 1
            self._unreported += 1
            return False
        pending.append(line)
        if self._thread is None:
            self._start()
        if urgent:
            self._hurry.set()
            self._wake.set()
        elif len(pending) == 1:  # the writer sleeps until there is something to write
            self._wake.set()
        return True

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the writer once it wrote what is pending; a writer stuck on a blocked stream
        is given ``timeout`` seconds, then abandoned (it is a daemon thread)."""
        self._closed = True
        self._hurry.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                return
        if self._io_lock.acquire(timeout=timeout):
            try:
                self._write_pending()
            finally:
                self._io_lock.release()

    def _start(self) -> None:
        with self._io_lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # Idle: blocked on the event, no periodic wake-ups. Busy: one batch per interval.
        while True:
            self._wake.wait()
            self._wake.clear()
            self._hurry.wait(self.interval)
            self._hurry.clear()
            with self._io_lock:
                self._write_pending()
            if self._closed and not self._pending:
                return

    def _write_pending(self) -> None:
        """Pop every pending line and write them (caller holds the I/O lock)."""
        lines: list[str] = []
        pending = self._pending
        try:
            while True:
                lines.append(pending.popleft())
        except IndexError:
            pass
        if self._unreported:
            count, self._unreported = self._unreported, 0
            head = line_head(logging.WARNING, self.service, time.time())
            lines.append(f'{head}"event":"log_lines_dropped","dropped":{count}}}')
        if lines:
            self._write_all(("\n".join(lines) + "\n").encode("utf-8", "backslashreplace"))

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except InterruptedError:
                continue
            except BlockingIOError:  # a stream someone else set O_NONBLOCK: wait, then retry
                select.select([], [self.fd], [])
                continue
            except OSError:  # closed or broken stream: nothing sensible to do
                return
            view = view[written:]

    def _after_fork_in_child(self) -> None:
        # The writer thread does not exist in the child; the next line starts a new one.
        self._io_lock = threading.Lock()
        self._wake = threading.Event()
        self._hurry = threading.Event()
        self._thread = None
        self._pending.clear()  # the parent's writer writes these
        self._unreported = 0


class JsonLineHandler(logging.Handler):
    """Formats every record to the schema and queues it on a :class:`LineWriter`."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format_line(record)
        except Exception:
            self.handleError(record)
            return
        urgent = record.levelno >= logging.ERROR or getattr(record, "urgent", False)
        self.writer.put(line, urgent=urgent)

    def format_line(self, record: logging.LogRecord) -> str:
        head = line_head(record.levelno, self.writer.service, record.created)
        message = record.getMessage()
        if message.startswith("{") and message.endswith("}"):
            return head + message[1:]  # a structured event (emit / send)
        fields: dict[str, Any] = {"event": "log", "logger": record.name, "message": message}
        if record.exc_info:
            fields["exc"] = logging.Formatter().formatException(record.exc_info)
        return head + fields_json(fields)[1:]

    def flush(self) -> None:
        """Nothing to do here: the writer thread writes; :meth:`close` waits for it."""

    def close(self) -> None:
        self.writer.close()
        super().close()


class _Direct:
    """Where :func:`send` writes once :func:`configure` ran (hot lines skip LogRecord)."""

    writer: LineWriter | None = None


_DIRECT = _Direct()


def configure(service: str, *, fd: int = 2, capacity: int = DEFAULT_CAPACITY) -> LineWriter:
    """Make this process log the schema to ``fd`` (stderr) through a :class:`LineWriter`;
    the root logger gets the one handler, at INFO."""
    if service not in SERVICES:
        raise ValueError(f"service must be one of {SERVICES}")
    writer = LineWriter(fd, service, capacity=capacity)
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [JsonLineHandler(writer)]
    root.setLevel(logging.INFO)
    _DIRECT.writer = writer
    return writer


def writer() -> LineWriter | None:
    """The writer :func:`configure` installed (None in a process that did not call it)."""
    return _DIRECT.writer


def send(
    logger: logging.Logger, body: str, *, level: int = logging.INFO, urgent: bool = False
) -> None:
    """Log one structured event given as a JSON object ``{"event":…,…}``. Once
    :func:`configure` ran it goes straight to the writer (no LogRecord: the access line is
    per request); otherwise through ``logger``. Callers never pass a token or a key."""
    if not logger.isEnabledFor(level):
        return
    direct = _DIRECT.writer
    if direct is not None:
        direct.put(line_head(level, direct.service, time.time()) + body[1:], urgent=urgent)
    else:
        logger.log(level, body, extra={"urgent": urgent})


def emit(
    logger: logging.Logger,
    event: str,
    *,
    level: int = logging.INFO,
    urgent: bool = False,
    **fields: Any,
) -> None:
    """Log one structured event: ``event`` and ``fields`` (JSON values, or str()-able)."""
    if logger.isEnabledFor(level):
        send(logger, fields_json({"event": event, **fields}), level=level, urgent=urgent)


def _after_fork_in_child() -> None:
    for w in list(_WRITERS):
        w._after_fork_in_child()


# No flush before a fork (it could block on a full pipe): the parent's writer writes what is
# pending, the child starts empty.
os.register_at_fork(after_in_child=_after_fork_in_child)
