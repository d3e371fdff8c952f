"""The HTTP/1.1 core over real TLS on loopback (uvloop and the stock asyncio loop): keep-alive,
HTTP/1.0, HEAD, streaming, pipelining in order, every timeout and size limit, 100-continue,
the request shapes the core refuses, and its own error answers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from h1_harness import ALICE, Client, Pki, Server, get
from svidgate.gateway.http1 import Limits

LIMITS = Limits(
    handshake_timeout=2.0,
    header_timeout=0.5,
    idle_timeout=0.5,
    body_timeout=0.5,
    write_timeout=0.5,
    max_header_bytes=4096,
    max_headers=20,
    max_body_bytes=1000,
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(Path(tmp_path_factory.mktemp("pki")))


@pytest.fixture(params=["uvloop", "asyncio"])
def server(request: pytest.FixtureRequest, pki: Pki) -> Iterator[Server]:
    srv = Server(pki, LIMITS, loop_kind=request.param).start()
    yield srv
    srv.stop()


def wait_until(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def client(server: Server, name: str = "alice") -> Client:
    return Client(server.port, server.pki.client_context(name))


def post(path: str, body: bytes, headers: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n{headers}"
    return head.encode() + b"\r\n" + body


# -- keep-alive, versions, methods ---------------------------------------------------------------


def test_keep_alive_serves_requests_in_turn_with_the_connection_identity(server: Server) -> None:
    with client(server) as c:
        first = c.exchange(get("/a?x=1", headers="X-Trace: one \r\n"))
        second = c.exchange(get("/b"))
    assert first is not None and second is not None
    assert (first.status, second.status) == (200, 200)
    doc = first.json()
    assert (doc["path"], doc["query"], doc["target"]) == ("/a", "x=1", "/a?x=1")
    assert doc["headers"] == [["host", "localhost"], ["x-trace", "one"]]  # OWS stripped
    assert doc["peer"] == second.json()["peer"] == ALICE
    assert first.header("Connection") is None  # HTTP/1.1 keep-alive says nothing
    assert server.counters()["requests"] == 2


def test_http10_keep_alive_as_ab_sends_it(server: Server) -> None:
    ab = b"GET /ab HTTP/1.0\r\nConnection: Keep-Alive\r\nHost: localhost\r\nAccept: */*\r\n\r\n"
    with client(server) as c:
        for _ in range(2):
            resp = c.exchange(ab)
            assert resp is not None and resp.status == 200
            assert resp.header("Connection") == "keep-alive"
            assert resp.header("Content-Length") is not None
        resp = c.exchange(get("/plain", version="1.0"))
        assert resp is not None and resp.status == 200
        assert resp.header("Connection") == "close"
        assert c.closed()


def test_connection_close_is_honoured(server: Server) -> None:
    with client(server) as c:
        resp = c.exchange(get("/x", headers="Connection: close\r\n"))
        assert resp is not None and resp.status == 200
        assert resp.header("Connection") == "close"
        assert c.closed()


def test_head_gets_the_length_but_no_body(server: Server) -> None:
    with client(server) as c:
        c.send(b"HEAD /h HTTP/1.1\r\nHost: localhost\r\n\r\n")
        head = c.read_response(head_only=True)
        assert head is not None and head.status == 200
        assert int(head.header("Content-Length") or 0) > 0
        nxt = c.exchange(get("/next"))  # no stray body bytes before the next response
        assert nxt is not None and nxt.json()["path"] == "/next"


def test_streamed_response_is_chunked_for_11_and_close_delimited_for_10(server: Server) -> None:
    with client(server) as c:
        resp = c.exchange(get("/stream"))
        assert resp is not None and resp.header("Transfer-Encoding") == "chunked"
        assert resp.json()["path"] == "/stream"
    with client(server) as c:
        resp = c.exchange(get("/stream", version="1.0", headers="Connection: keep-alive\r\n"))
        assert resp is not None and resp.header("Transfer-Encoding") is None
        assert resp.header("Connection") == "close"
        assert resp.json()["path"] == "/stream"


def test_a_small_response_is_one_tls_record(server: Server) -> None:
    # SSL_read returns at most one record: head and body arriving in one recv() is one write.
    for path in ("/one", "/stream"):  # respond(), and start()+write() with the head deferred
        with client(server) as c:
            c.send(get(path))
            data = c.sock.recv(65536)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b'{"method"' in data  # the first body bytes came in the same record
    with client(server) as c:
        c.send(b"TRACE / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        data = c.sock.recv(65536)
        assert data.startswith(b"HTTP/1.1 405 ") and data.endswith(b"}")


def test_chunked_request_body_is_decoded(server: Server) -> None:
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    head = b"POST /c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    with client(server) as c:
        resp = c.exchange(head + body)
        assert resp is not None and resp.status == 200
        assert resp.json()["body"] == "hello world"
        again = c.exchange(get("/after"))  # the body ended exactly where the framing said
        assert again is not None and again.json()["path"] == "/after"


# -- pipelining ---------------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order_one_at_a_time(server: Server) -> None:
    with client(server) as c:
        c.send(get("/slow") + post("/p", b"abc") + get("/c"))
        paths = [(r := c.read_response()) and r.json()["path"] for _ in range(3)]
    assert paths == ["/slow", "/p", "/c"]
    events = server.call(lambda: list(server.seen.events))
    assert events == [
        ("/slow", "start"),
        ("/slow", "done"),
        ("/p", "start"),
        ("/p", "done"),
        ("/c", "start"),
        ("/c", "done"),
    ]


def test_pipelined_after_a_chunked_body_starts_exactly_after_it(server: Server) -> None:
    chunked = b"POST /c HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    with client(server) as c:
        c.send(chunked + b"3\r\nabc\r\n0\r\n\r\n" + get("/next"))
        first, second = c.read_response(), c.read_response()
    assert first is not None and first.json()["body"] == "abc"
    assert second is not None and second.json()["path"] == "/next"


def test_a_refused_pipelined_request_leaves_the_earlier_response_whole(server: Server) -> None:
    with client(server) as c:
        c.send(get("/slow") + b"GET /bad HTTP/9.9\r\nHost: localhost\r\n\r\n" + get("/never"))
        first = c.read_response()
        second = c.read_response()
        assert first is not None and first.status == 200 and first.json()["path"] == "/slow"
        assert second is not None and second.status == 505
        assert c.closed()
    assert server.call(lambda: server.seen.paths) == ["/slow"]


# -- timeouts -----------------------------------------------------------------------------------


def test_slowloris_head_gets_408_then_close(server: Server) -> None:
    with client(server) as c:
        started = time.monotonic()
        c.send(b"GET /slow HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(3):  # trickling more bytes does not extend the deadline
            time.sleep(0.15)
            c.send(b"X-A: b\r\n")
        resp = c.read_response()
        assert resp is not None and resp.status == 408
        assert resp.json() == {"error": "request_timeout", "reason": "head_timeout"}
        assert time.monotonic() - started < 2.0
        assert c.closed()
    assert server.counters()["header_timeouts"] == 1
    assert server.call(lambda: server.seen.paths) == []


def test_later_head_timeout_counts_from_its_first_byte(server: Server) -> None:
    with client(server) as c:
        assert (r := c.exchange(get("/one"))) is not None and r.status == 200
        time.sleep(0.3)  # idle, under idle_timeout
        c.send(b"GET /two HTTP/1.1\r\n")
        resp = c.read_response()
        assert resp is not None and resp.status == 408


def test_stalled_body_gets_408_and_the_handler_sees_the_clients_fault(server: Server) -> None:
    with client(server) as c:
        resp = c.exchange(b"POST /p HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc")
        assert resp is not None and resp.status == 408
        assert resp.json()["reason"] == "body_stalled"
        assert c.closed()
    assert ("/p", "BodyTimeout") in server.call(lambda: list(server.seen.events))
    assert server.counters()["body_timeouts"] == 1


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(server: Server) -> None:
    with client(server) as c:
        assert (r := c.exchange(get("/x"))) is not None and r.status == 200
        started = time.monotonic()
        assert c.closed()  # blocks until the server closes
        assert 0.3 < time.monotonic() - started < 3.0
    assert server.counters()["idle_closed"] == 1


def test_a_client_that_never_reads_is_cut_after_the_write_timeout(server: Server) -> None:
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(5)
    raw.connect(("127.0.0.1", server.port))
    tls = server.pki.client_context().wrap_socket(raw, server_hostname="localhost")
    try:
        tls.sendall(get("/big?200000000"))
        deadline = time.monotonic() + 10
        while ("/big", "WriteTimeout") not in server.seen.events and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ("/big", "WriteTimeout") in server.call(lambda: list(server.seen.events))
        assert server.counters()["write_timeouts"] == 1
    finally:
        tls.close()


def test_a_client_that_leaves_mid_body_is_the_clients_fault(server: Server) -> None:
    with client(server) as c:
        c.send(b"POST /p HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\nabc")
        assert wait_until(lambda: "/p" in server.call(lambda: server.seen.paths))
    assert wait_until(lambda: ("/p", "BodyIncomplete") in server.call(lambda: server.seen.events))


def test_reading_pauses_while_the_handler_does_not_take_the_body(server: Server) -> None:
    size = 4 * 1024 * 1024
    with client(server) as c:
        head = f"POST /drip?{size} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {size}\r\n\r\n"
        c.send(head.encode() + b"a" * size)  # blocks while the server does not read
        resp = c.read_response()
        assert resp is not None and resp.status == 200 and len(resp.json()["body"]) == size
    (buffered,) = [e for p, e in server.call(lambda: list(server.seen.events)) if "=" in e]
    # body_buffer_high (256 KiB) plus what the TLS layer hands over in one delivery (its own
    # bounded buffer; ~512 KiB seen with uvloop), not the 4 MiB the client sent
    assert int(buffered.split("=")[1]) <= 1024 * 1024, buffered


# -- size limits --------------------------------------------------------------------------------


def test_oversized_head_gets_431(server: Server) -> None:
    with client(server) as c:
        resp = c.exchange(get("/", headers="X-Big: " + "a" * 5000 + "\r\n"))
        assert resp is not None and resp.status == 431
        assert c.closed()
    with client(server) as c:  # no end of head in sight within the limit
        c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 5000)
        resp = c.read_response()
        assert resp is not None and resp.status == 431


def test_too_many_headers_get_431(server: Server) -> None:
    many = "".join(f"X-{i}: v\r\n" for i in range(25))
    with client(server) as c:
        resp = c.exchange(get("/", headers=many))
        assert resp is not None and resp.status == 431
        assert resp.json()["reason"] == "too_many_headers"
    assert server.counters()["head_too_large"] == 1


def test_content_length_over_the_limit_gets_413_before_the_body_is_sent(server: Server) -> None:
    with client(server) as c:
        c.send(b"POST /p HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n\r\n")
        resp = c.read_response()  # without a byte of the body
        assert resp is not None and resp.status == 413
        assert resp.json()["reason"] == "content_length_over_limit"
        assert c.closed()


def test_chunked_body_over_the_limit_gets_413_and_close(server: Server) -> None:
    head = b"POST /p HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (600, b"a" * 600)
    with client(server) as c:
        resp = c.exchange(head + chunk + chunk + b"0\r\n\r\n")
        assert resp is not None and resp.status == 413
        assert c.closed()


def test_a_handler_sets_its_own_body_limit(server: Server) -> None:
    with client(server) as c:
        resp = c.exchange(post("/limit?5000", b"a" * 2000))
        assert resp is not None and resp.status == 200 and len(resp.json()["body"]) == 2000
    with client(server) as c:
        resp = c.exchange(post("/limit?10", b"a" * 20))
        assert resp is not None and resp.status == 413


# -- 100-continue ---------------------------------------------------------------------------------


def test_100_continue_is_sent_when_the_handler_reads_the_body(server: Server) -> None:
    with client(server) as c:
        c.send(b"POST /p HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n")
        c.send(b"Expect: 100-continue\r\n\r\n")
        interim = c.read_response()
        assert interim is not None and interim.status == 100
        resp = c.exchange(b"hello")
        assert resp is not None and resp.json()["body"] == "hello"


def test_no_100_continue_when_the_handler_answers_without_the_body(server: Server) -> None:
    with client(server) as c:
        c.send(b"POST /refuse HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n")
        c.send(b"Expect: 100-continue\r\n\r\n")
        resp = c.read_response()
        assert resp is not None and resp.status == 403
        assert resp.header("Connection") == "close"  # the unread body cannot be skipped
        assert c.closed()


def test_other_expectations_get_417(server: Server) -> None:
    with client(server) as c:
        resp = c.exchange(get("/", headers="Expect: something\r\n"))
        assert resp is not None and resp.status == 417


# -- request shapes and the core's own answers ----------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "reason"),
    [
        (b"CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n", 405, None),
        (b"TRACE / HTTP/1.1\r\nHost: localhost\r\n\r\n", 405, None),
        (b"OPTIONS * HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, "asterisk_form"),
        (b"GET / HTTP/1.1\r\nHost: localhost\r\nHost: other\r\n\r\n", 400, "duplicate_host"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "missing_host"),
        (b"GET http://other/x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, "host_mismatch"),
        (b"GET ftp://localhost/x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400, "bad_target"),
        (b"GET / HTTP/2.0\r\nHost: localhost\r\n\r\n", 505, None),
    ],
)
def test_refused_request_shapes(
    server: Server, request_bytes: bytes, status: int, reason: str | None
) -> None:
    with client(server) as c:
        resp = c.exchange(request_bytes)
        assert resp is not None and resp.status == status
        if reason is not None:
            assert resp.json()["reason"] == reason
        assert resp.header("Server") == "svidgate"
        assert resp.header("Content-Type") == "application/json"
        if status == 405:
            assert resp.header("Allow") == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        assert c.closed()
    assert server.call(lambda: server.seen.paths) == []


def test_absolute_form_naming_the_host_is_served_as_its_path(server: Server) -> None:
    with client(server) as c:
        resp = c.exchange(b"GET HTTP://LocalHost/x/y?q HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert resp is not None and resp.status == 200
        assert (resp.json()["path"], resp.json()["query"]) == ("/x/y", "q")


def test_error_bodies_never_echo_the_request(server: Server) -> None:
    with client(server) as c:
        resp = c.exchange(b"GET /secret-<script> HTTP/1.1 trailing\r\nHost: localhost\r\n\r\n")
        assert resp is not None and resp.status == 400
        assert resp.json() == {"error": "bad_request", "reason": "bad_request_line"}


def test_a_failing_handler_gets_a_generic_500(server: Server) -> None:
    with client(server) as c:
        resp = c.exchange(get("/boom"))
        assert resp is not None and resp.status == 500
        assert resp.json() == {"error": "internal"}
        after = c.exchange(get("/after"))  # the request was framed: the connection goes on
        assert after is not None and after.status == 200
