"""The background log writer: lines leave the caller at once, reach the stream in order within
a bounded time, durable lines and errors are written synchronously, nothing is lost on close
or under back-pressure, and a forked child writes its own lines (not the parent's twice)."""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Iterator

import pytest
from support.waiting import wait_until
from svidgate.gateway.logs import BackgroundStreamHandler


class Recorder(io.StringIO):
    """A stream that counts write calls (batches) and the threads that made them."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.threads: set[str] = set()

    def write(self, text: str) -> int:
        self.writes += 1
        self.threads.add(threading.current_thread().name)
        return super().write(text)


@pytest.fixture
def logger() -> Iterator[tuple[logging.Logger, BackgroundStreamHandler, Recorder]]:
    stream = Recorder()
    handler = BackgroundStreamHandler(stream, interval=0.01)
    log = logging.getLogger(f"test.logs.{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield log, handler, stream
    log.removeHandler(handler)
    handler.close()


def test_lines_are_written_in_order_by_the_writer_thread(
    logger: tuple[logging.Logger, BackgroundStreamHandler, Recorder],
) -> None:
    log, _handler, stream = logger
    for i in range(200):
        log.info("line %d", i)
    wait_until(lambda: stream.getvalue().count("\n") == 200, 5, "200 lines", interval=0.005)
    assert stream.getvalue().splitlines() == [f"line {i}" for i in range(200)]
    assert stream.threads == {"log-writer"}
    assert stream.writes < 200  # batched


def test_durable_and_error_records_are_written_before_logging_returns(
    logger: tuple[logging.Logger, BackgroundStreamHandler, Recorder],
) -> None:
    log, _handler, stream = logger
    log.info("queued")
    log.info("deny", extra={"durable": True})
    assert stream.getvalue().splitlines() == ["queued", "deny"]
    log.info("queued again")
    log.error("boom")
    assert stream.getvalue().splitlines() == ["queued", "deny", "queued again", "boom"]


def test_back_pressure_writes_synchronously_and_close_writes_the_rest() -> None:
    stream = Recorder()
    handler = BackgroundStreamHandler(stream, interval=3600, max_pending=3)
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "x%d", (0,), None)
    for i in range(7):
        record.args = (i,)
        handler.handle(record)
    assert stream.getvalue().splitlines() == [f"x{i}" for i in range(6)]  # two full batches
    handler.close()
    assert stream.getvalue().splitlines() == [f"x{i}" for i in range(7)]
    record.args = (7,)
    handler.handle(record)  # after close: written at once
    assert stream.getvalue().splitlines()[-1] == "x7"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_writes_its_own_lines_once() -> None:
    r, w = os.pipe()
    out = os.fdopen(w, "w")
    handler = BackgroundStreamHandler(out, interval=0.01)
    log = logging.getLogger("test.logs.fork")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        log.info("parent before fork")
        pid = os.fork()
        if pid == 0:  # child: log, then exit the way workers do
            code = 1
            try:
                log.info("child")
                handler.close()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        handler.close()
        out.close()
        with os.fdopen(r) as reader:
            lines = reader.read().splitlines()
    finally:
        log.removeHandler(handler)
    assert lines == ["parent before fork", "child"]
