"""The HTTP/1.1 core's parts without sockets: the state table, the head parser's Request, the
response encoder and framing, the body's limits and timeout, the connection's clocks, and
Limits validation."""

from __future__ import annotations

import asyncio

import pytest
from svidgate.gateway.http1 import (
    Body,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    Counters,
    Limits,
    ProtocolError,
    Request,
    Responder,
    WriteTimeout,
)
from svidgate.gateway.http1.flow import Deadline, WriteFlow
from svidgate.gateway.http1.parse import HeadParser
from svidgate.gateway.http1.respond import encode_head
from svidgate.gateway.http1.state import TRANSITIONS, Event, State, StateError, transition


def parse(head: bytes) -> Request:
    return HeadParser(100).parse(head)


# -- state table ------------------------------------------------------------------------------


def test_the_request_cycle_follows_the_table() -> None:
    state = State.HANDSHAKE
    for event in (Event.ADMITTED, Event.BYTES, Event.HEAD_DONE, Event.KEEP_ALIVE):
        state = transition(state, event)
    assert state is State.IDLE
    assert transition(State.BUSY, Event.CLOSE) is State.CLOSING
    assert transition(State.HANDSHAKE, Event.REFUSE) is State.REFUSED


def test_illegal_moves_are_loud_and_closed_is_final() -> None:
    with pytest.raises(StateError):
        transition(State.BUSY, Event.HEAD_DONE)  # never two requests at once
    with pytest.raises(StateError):
        transition(State.REFUSED, Event.ADMITTED)
    assert not [k for k in TRANSITIONS if k[0] is State.CLOSED]
    assert all(transition(s, Event.LOST) is State.CLOSED for s in State if s is not State.CLOSED)


# -- the parsed request -------------------------------------------------------------------------


def test_request_fields() -> None:
    req = parse(
        b"POST /a/b?x=1&y HTTP/1.1\r\nHost: svc:8443\r\nX-A: 1\r\nx-a:  2 \r\n"
        b"Content-Length: 3\r\nConnection: keep-alive\r\n\r\n"
    )
    assert (req.method, req.target, req.path, req.query) == ("POST", b"/a/b?x=1&y", "/a/b", "x=1&y")
    assert req.headers[1:3] == ((b"x-a", b"1"), (b"x-a", b"2"))
    assert req.header_values(b"x-a") == [b"1", b"2"] and req.header(b"host") == b"svc:8443"
    assert (req.content_length, req.chunked, req.keep_alive, req.has_body) == (3, False, True, True)
    assert parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n").query is None
    assert parse(b"GET /? HTTP/1.1\r\nHost: a\r\n\r\n").query == ""


@pytest.mark.parametrize(
    ("version", "connection", "keep"),
    [
        ("1.1", None, True),
        ("1.1", "close", False),
        ("1.1", "Keep-Alive, Close", False),
        ("1.0", None, False),
        ("1.0", "keep-alive", True),
        ("1.0", "Keep-Alive", True),
        ("1.0", "te, keep-alive", True),
    ],
)
def test_keep_alive(version: str, connection: str | None, keep: bool) -> None:
    extra = f"Connection: {connection}\r\n" if connection else ""
    req = parse(f"GET / HTTP/{version}\r\nHost: a\r\n{extra}\r\n".encode())
    assert req.keep_alive is keep


def test_http10_may_omit_host_but_not_send_it_twice() -> None:
    assert parse(b"GET / HTTP/1.0\r\n\r\n").host is None
    with pytest.raises(ProtocolError, match="duplicate_host"):
        parse(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n")


def test_expect_continue_only_with_a_body_in_http11() -> None:
    def expect(version: str, length: int) -> bool:
        head = f"POST / HTTP/{version}\r\nHost: a\r\nContent-Length: {length}\r\n"
        return parse((head + "Expect: 100-Continue\r\n\r\n").encode()).expect_continue

    assert expect("1.1", 5) and not expect("1.1", 0) and not expect("1.0", 5)


def test_a_parser_serves_many_heads_and_recovers_after_bodies() -> None:
    parser = HeadParser(100)
    for _ in range(3):
        assert parser.parse(b"GET /k HTTP/1.1\r\nHost: a\r\n\r\n").path == "/k"
    assert parser.parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9\r\n\r\n").has_body
    assert parser.parse(b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n").path == "/after"
    upgrade = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    assert parser.parse(upgrade).path == "/ws"  # served as a plain request
    assert parser.parse(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n").path == "/next"


# -- responses -----------------------------------------------------------------------------------


class Sink:
    """Stands in for the connection: records what would be written."""

    def __init__(self, keep: bool = True) -> None:
        self.writes: list[bytes] = []
        self.keep = keep
        self.cut_called = False

    def may_keep_alive(self) -> bool:
        return self.keep

    def send(self, data: bytes) -> None:
        self.writes.append(data)

    async def drain(self) -> None:
        return None

    def cut(self) -> None:
        self.cut_called = True


def responder(
    head: bytes = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", keep: bool = True
) -> tuple[Responder, Sink]:
    sink = Sink(keep)
    return Responder(sink, parse(head)), sink


def test_encode_head_refuses_injection_and_framing_headers() -> None:
    for bad in [(b"X-A", b"a\r\nX-B: b"), (b"X-A", b"a\nb"), (b"X-A", b"a\x00"), (b"X\rA", b"v")]:
        with pytest.raises(ValueError):
            encode_head(200, [bad], b"")
    for owned in (b"Content-Length", b"transfer-encoding", b"Connection"):
        with pytest.raises(ValueError):
            encode_head(200, [(owned, b"1")], b"")


def test_a_whole_response_is_one_write() -> None:
    r, sink = responder()
    r.respond(201, [(b"X-A", b"1")], b"body")
    assert sink.writes == [b"HTTP/1.1 201 Created\r\nX-A: 1\r\nContent-Length: 4\r\n\r\nbody"]
    assert r.done and r.keep_alive


def test_head_and_204_carry_no_body() -> None:
    r, sink = responder(b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n")
    r.respond(200, [], b"body")
    assert sink.writes == [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"]
    r, sink = responder()
    r.respond(204, [])
    assert sink.writes == [b"HTTP/1.1 204 No Content\r\n\r\n"]


def test_simple_answers_are_json_with_server_and_date() -> None:
    r, sink = responder(keep=False)
    r.simple(403, {"error": "forbidden"}, [(b"X-R", b"1")])
    (data,) = sink.writes
    assert data.startswith(b"HTTP/1.1 403 Forbidden\r\nServer: svidgate\r\nDate: ")
    assert b"Content-Type: application/json\r\nX-R: 1\r\n" in data
    assert data.endswith(b'Connection: close\r\n\r\n{"error": "forbidden"}')


async def test_streams_are_chunked_in_11_and_close_delimited_in_10() -> None:
    r, sink = responder()
    r.start(200, [])
    await r.write(b"ab")
    await r.end()
    assert sink.writes == [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n",
        b"0\r\n\r\n",
    ]
    r, sink = responder(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r.start(200, [])
    await r.write(b"ab")
    await r.end()
    assert sink.writes == [b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nab"]
    assert not r.keep_alive


async def test_a_stream_cannot_break_its_content_length() -> None:
    r, _ = responder()
    r.start(200, [], content_length=3)
    with pytest.raises(RuntimeError):
        await r.write(b"abcd")
    r, sink = responder()
    r.start(200, [], content_length=3)
    await r.write(b"ab")
    with pytest.raises(RuntimeError):
        await r.end()
    assert sink.cut_called and not r.keep_alive


def test_http10_keep_alive_is_said_and_a_closing_connection_says_close() -> None:
    r, sink = responder(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r.respond(200, [], b"")
    assert b"Connection: keep-alive\r\n" in sink.writes[0]
    r, sink = responder(keep=False)  # the connection cannot keep it (body unread, draining)
    r.respond(200, [], b"")
    assert b"Connection: close\r\n" in sink.writes[0] and not r.keep_alive


# -- bodies -------------------------------------------------------------------------------------


class Source:
    def __init__(self) -> None:
        self.wanted = 0

    def want_body(self) -> None:
        self.wanted += 1

    def body_consumed(self) -> None:
        return None


def body_for(head: bytes, *, limit: int = 100, timeout: float = 1.0) -> tuple[Body, Counters]:
    counters = Counters()
    body = Body(
        Source(),
        parse(head),
        default_limit=limit,
        timeout=timeout,
        buffer_high=1024,
        max_trailer_bytes=1024,
        counters=counters,
    )
    return body, counters


POST5 = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n"
CHUNKED = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_content_length_body_returns_what_follows() -> None:
    body, _ = body_for(POST5)
    assert body.feed(b"hel") == b""
    assert body.feed(b"loGET") == b"GET"
    assert body.complete and await body.read_all() == b"hello"


async def test_limits_apply_when_set_even_to_a_body_already_received() -> None:
    body, counters = body_for(POST5)
    body.feed(b"hello")
    with pytest.raises(BodyTooLarge):
        body.set_limit(4)
    with pytest.raises(BodyTooLarge):
        await body.read()
    assert counters.body_too_large == 1
    body, _ = body_for(CHUNKED, limit=4)
    body.feed(b"5\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(BodyTooLarge, match="body_over_limit"):
        await body.read()
    body, _ = body_for(CHUNKED)
    body.set_limit(1000)  # a route's own limit, larger than the default
    body.feed(b"%x\r\n%s\r\n0\r\n\r\n" % (500, b"a" * 500))
    assert len(await body.read_all()) == 500


async def test_a_stalled_body_times_out_as_the_clients_fault() -> None:
    body, counters = body_for(POST5, timeout=0.05)
    body.feed(b"he")
    assert await body.read() == b"he"
    with pytest.raises(BodyTimeout):
        await body.read()
    assert counters.body_timeouts == 1


async def test_the_reader_wakes_when_bytes_arrive() -> None:
    body, _ = body_for(POST5)
    reader = asyncio.ensure_future(body.read_all())
    await asyncio.sleep(0)
    body.feed(b"hel")
    await asyncio.sleep(0)
    body.feed(b"lo")
    assert await reader == b"hello"


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"limits\.idle_timeout"):
        Limits(idle_timeout=0)
    assert Limits().max_header_bytes == 16384


# -- the connection's clocks ----------------------------------------------------------------


async def test_deadline_fires_once_at_its_latest_setting_and_not_when_cleared() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    deadline = Deadline(loop, lambda: fired.append(loop.time()))
    start = loop.time()
    deadline.set(0.05)
    await asyncio.sleep(0.03)
    deadline.set(0.1)  # moved later: no new timer, the first one re-arms itself
    await asyncio.sleep(0.2)
    assert len(fired) == 1 and fired[0] - start >= 0.125
    deadline.set(10)
    deadline.set(0.02)  # moved earlier: fires at the earlier time
    await asyncio.sleep(0.1)
    assert len(fired) == 2
    deadline.set(0.02)
    deadline.clear()
    await asyncio.sleep(0.1)
    assert len(fired) == 2


async def test_write_flow_waits_for_the_client_and_cuts_a_silent_one() -> None:
    loop = asyncio.get_running_loop()
    cuts: list[bool] = []
    flow = WriteFlow(loop, 0.05, lambda: cuts.append(True))
    await flow.wait()  # not paused: returns at once
    flow.pause()
    waiter = asyncio.ensure_future(flow.wait())
    await asyncio.sleep(0.01)
    flow.resume()
    await waiter
    flow.pause()
    with pytest.raises(WriteTimeout):
        await flow.wait()
    assert cuts == [True]
    flow.lose()
    with pytest.raises(ClientDisconnected):
        await flow.wait()
