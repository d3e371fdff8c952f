"""Log output off the event loop: records are formatted where they are logged and written to
the stream in batches by a small writer thread, so a request never waits on ``write(2)``.

Nothing is dropped: a *durable* record (an access denial: ``extra={"durable": True}``), any
record at ERROR or above, and every record once ``max_pending`` lines are waiting are written
synchronously together with everything queued before them (order is kept). ``close()`` (called
by ``logging.shutdown`` at exit) and a fork write out what is pending.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import TextIO

DEFAULT_INTERVAL = 0.01  # seconds between two batch writes
DEFAULT_MAX_PENDING = 10_000  # lines waiting before emit() writes synchronously (back-pressure)

_HANDLERS: weakref.WeakSet[BackgroundStreamHandler] = weakref.WeakSet()


class BackgroundStreamHandler(logging.Handler):
    """A ``StreamHandler`` whose writes happen on a daemon thread, in batches."""

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = DEFAULT_INTERVAL,
        max_pending: int = DEFAULT_MAX_PENDING,
    ) -> None:
        super().__init__()
        self.stream = stream
        self.interval = interval
        self.max_pending = max_pending
        self._pending: deque[str] = deque()
        self._io_lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        _HANDLERS.add(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        if (
            self._closed
            or record.levelno >= logging.ERROR
            or getattr(record, "durable", False)
            or len(self._pending) >= self.max_pending
        ):
            self.flush()
        else:
            if self._thread is None:
                self._start_writer()
            if len(self._pending) == 1:  # the writer sleeps until there is something to write
                self._wake.set()

    def flush(self) -> None:
        """Write every pending line now (in order), on the calling thread."""
        with self._io_lock:
            if not self._pending:
                return
            lines: list[str] = []
            try:
                while True:
                    lines.append(self._pending.popleft())
            except IndexError:
                pass
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # closed or broken stream: nothing sensible to do
                pass

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=2.0)
        self.flush()
        super().close()

    def _start_writer(self) -> None:
        with self._io_lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # Idle: blocked on the event, no periodic wake-ups. Busy: one batch per interval.
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                break
            time.sleep(self.interval)
            self.flush()

    def _before_fork(self) -> None:
        self.flush()

    def _after_fork_in_child(self) -> None:
        # The writer thread does not exist in the child; the next record starts a new one.
        self._io_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        self._pending.clear()  # flushed in the parent just before the fork


def _before_fork() -> None:
    for handler in list(_HANDLERS):
        handler._before_fork()


def _after_fork_in_child() -> None:
    for handler in list(_HANDLERS):
        handler._after_fork_in_child()


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
