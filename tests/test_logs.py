"""The shared log schema and its writer (svidgate.logs): every record becomes one schema line;
lines reach the stream in order, batched, from the writer thread; a full queue (a stream nobody
reads) drops new lines without blocking the caller and reports how many once it can write;
urgent lines do not wait for the batch; close writes the rest (and gives up on a blocked
stream); a forked child writes its own lines only. The gateway's access line and the
rate-limited handshake line are checked here as pure functions."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator

import pytest
from support.logschema import check_line
from support.waiting import wait_until
from svidgate.gateway.logs import HandshakeLog, access_line

from svidgate.logs import JsonLineHandler, LineWriter, timestamp


class Pipe:
    """A real pipe: the writer writes to ``w``; the test reads ``r`` (non-blocking)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.text = ""

    def read(self) -> list[str]:
        while True:
            try:
                chunk = os.read(self.r, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            self.text += chunk.decode()
        return self.text.rpartition("\n")[0].splitlines()

    def fill(self) -> None:
        """Fill the pipe's buffer so the next write blocks (nobody reads)."""
        os.set_blocking(self.w, False)
        try:
            while True:
                os.write(self.w, b"x" * 4096)
        except BlockingIOError:
            pass
        os.set_blocking(self.w, True)

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


@pytest.fixture
def logger(pipe: Pipe) -> Iterator[tuple[logging.Logger, LineWriter]]:
    writer = LineWriter(pipe.w, "signer", interval=0.01)
    log = logging.getLogger(f"test.logs.{id(writer)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    handler = JsonLineHandler(writer)
    log.addHandler(handler)
    yield log, writer
    log.removeHandler(handler)
    writer.close(timeout=0.5)


def test_timestamp_is_rfc3339_utc_with_milliseconds() -> None:
    assert timestamp(1_796_206_500.1234) == "2026-12-02T10:15:00.123Z"
    assert timestamp(1_796_206_500.0) == "2026-12-02T10:15:00.000Z"
    assert timestamp(1_796_206_501.999) == "2026-12-02T10:15:01.999Z"


def test_every_record_becomes_one_schema_line_in_order(
    pipe: Pipe, logger: tuple[logging.Logger, LineWriter]
) -> None:
    log, _writer = logger
    for i in range(200):
        log.info('{"event":"thing","n":%d}', i)
    log.warning("plain text %s", "here")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("it failed")
    wait_until(lambda: len(pipe.read()) == 202, 10, "202 lines", interval=0.005)
    docs = [check_line(line, "signer") for line in pipe.read()]
    assert [d["n"] for d in docs[:200]] == list(range(200))
    assert docs[200]["event"] == "log" and docs[200]["message"] == "plain text here"
    assert docs[200]["level"] == "warning" and docs[200]["logger"] == log.name
    assert docs[201]["level"] == "error" and "RuntimeError: boom" in docs[201]["exc"]


def test_a_stream_nobody_reads_drops_lines_without_blocking_and_reports_the_count(
    pipe: Pipe,
) -> None:
    writer = LineWriter(pipe.w, "gateway", capacity=50, interval=0.001)
    pipe.fill()
    accepted = [writer.put(f'{{"time":"t","n":{i}}}') for i in range(500)]  # never blocks
    # the writer thread took at most one batch off the queue before blocking on the pipe
    assert accepted.count(False) >= 500 - 50 - 50
    assert writer.dropped == accepted.count(False)
    os.set_blocking(pipe.w, True)
    # someone reads again: what was queued is written, then how many lines were dropped
    wait_until(lambda: "log_lines_dropped" in "".join(pipe.read()), 10, "the drop report")
    lines = [line.lstrip("x") for line in pipe.read()]
    written = [json.loads(x)["n"] for x in lines if '"n":' in x]
    assert written == [i for i, ok in enumerate(accepted) if ok]
    (report,) = [check_line(x, "gateway") for x in lines if "log_lines_dropped" in x]
    assert report["level"] == "warning" and report["dropped"] == writer.dropped
    writer.close(timeout=0.5)


def test_urgent_lines_do_not_wait_for_the_batch(pipe: Pipe) -> None:
    writer = LineWriter(pipe.w, "gateway", interval=3600)
    writer.put("first")  # the writer now sleeps an hour before this batch...
    writer.put("deny", urgent=True)  # ...unless an urgent line wakes it
    wait_until(lambda: pipe.read() == ["first", "deny"], 10, "the urgent line", interval=0.005)
    writer.close(timeout=0.5)


def test_close_writes_the_rest_and_gives_up_on_a_blocked_stream(pipe: Pipe) -> None:
    writer = LineWriter(pipe.w, "gateway", interval=3600)
    writer.put("a")
    writer.put("b")
    writer.close()
    assert pipe.read() == ["a", "b"]
    blocked = LineWriter(pipe.w, "gateway", interval=0.001)
    pipe.fill()
    blocked.put("stuck")
    done = threading.Event()
    closer = threading.Thread(target=lambda: (blocked.close(timeout=0.2), done.set()))
    closer.start()
    assert done.wait(30), "close() hung on a blocked stream"
    closer.join()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_writes_its_own_lines_once(pipe: Pipe) -> None:
    writer = LineWriter(pipe.w, "gateway", interval=3600)
    writer.put("parent before fork")
    pid = os.fork()
    if pid == 0:  # child: log, then exit the way workers do
        code = 1
        try:
            writer.put("child")
            writer.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    writer.close()
    assert sorted(pipe.read()) == ["child", "parent before fork"]


def test_access_line_is_valid_json_with_every_field() -> None:
    body = access_line(
        request_id="r-1",
        client="127.0.0.1",
        method="GET",
        path='/a"b\\c/\u00e9',
        status=200,
        bytes_in=0,
        bytes_out=12,
        route="orders",
        spiffe_id="spiffe://example.org/web",
        upstream="echo",
        duration_ms=1.234,
        error=None,
    )
    doc = check_line(
        '{"time":"2026-12-02T10:15:00.123Z","level":"info","service":"gateway",' + body[1:],
        "gateway",
    )
    assert doc["path"] == '/a"b\\c/\u00e9' and doc["upstream"] == "echo" and doc["error"] is None
    assert "trace_id" not in doc
    with_trace = json.loads(access_line(**{**_fields(), "trace_id": "ab" * 16}))
    assert with_trace["trace_id"] == "ab" * 16 and with_trace["bytes_in"] is None


def _fields() -> dict[str, object]:
    return dict(
        request_id=None,
        client=None,
        method="POST",
        path="/",
        status=502,
        bytes_in=None,
        bytes_out=None,
        route="-",
        spiffe_id="spiffe://example.org/web",
        upstream=None,
        duration_ms=0.5,
        error="upstream_unavailable",
    )


def test_handshake_lines_are_rate_limited_and_say_how_many_were_suppressed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    handshakes = HandshakeLog(per_second=3, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="svidgate.gateway.handshake")
    for _ in range(10):
        handshakes.failed(("127.0.0.1", 5555), "no_client_certificate")
    now[0] += 1.0
    handshakes.failed(("::1", 6666), "unknown_ca", "unable to get local issuer certificate")
    docs = [json.loads(r.getMessage()) for r in caplog.records]
    assert len(docs) == 4
    assert docs[0] == {
        "event": "handshake_failed",
        "peer": "127.0.0.1:5555",
        "reason": "no_client_certificate",
    }
    assert docs[3]["peer"] == "[::1]:6666" and docs[3]["suppressed"] == 7
    assert docs[3]["detail"] == "unable to get local issuer certificate"
