"""The listener's bounds, over real TLS: connections beyond ``max_connections`` are closed
before the handshake, beyond ``max_connections_per_identity`` right after it; refused peers,
slow handshakes and a half-open flood cost little and are closed; shutdown drains."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from h1_harness import ALICE, BOB, Client, Pki, Server, get, identify_with
from svidgate.gateway.http1 import Admission, Limits, Refused

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(Path(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def start(pki: Pki) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def begin(limits: Limits, **kwargs: object) -> Server:
        srv = Server(pki, limits, **kwargs).start()  # type: ignore[arg-type]
        servers.append(srv)
        return srv

    yield begin
    for srv in servers:
        srv.stop()


def served(c: Client, path: str = "/x") -> bool:
    resp = c.exchange(get(path))
    return resp is not None and resp.status == 200


def closed_by_peer(sock: socket.socket) -> bool:
    """EOF or a reset: the server closed (a timeout raises)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def wait_for(predicate: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_connections_beyond_the_limit_are_closed_before_the_handshake(
    start: Callable[..., Server], pki: Pki
) -> None:
    srv = start(Limits(max_connections=2))
    first, second = Client(srv.port, pki.client_context()), Client(srv.port, pki.client_context())
    try:
        assert served(first) and served(second)
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            Client(srv.port, pki.client_context())  # the handshake itself fails
        assert served(first) and served(second)  # the admitted ones are untouched
        assert srv.counters()["over_capacity"] == 1
        first.close()
        assert wait_for(lambda: srv.open_connections() == 1)
        with Client(srv.port, pki.client_context()) as third:  # the slot was given back
            assert served(third)
    finally:
        first.close()
        second.close()


def test_connections_per_identity_are_capped_after_the_handshake(
    start: Callable[..., Server], pki: Pki
) -> None:
    srv = start(Limits(max_connections_per_identity=2))
    alices = [Client(srv.port, pki.client_context("alice")) for _ in range(2)]
    try:
        assert all(served(c) for c in alices)
        with Client(srv.port, pki.client_context("alice")) as extra:
            assert extra.exchange(get("/x")) is None  # closed without an HTTP answer
        with Client(srv.port, pki.client_context("bob")) as bob:  # other identities unaffected
            assert served(bob)
        assert srv.counters()["identity_over_cap"] == 1
        listener = srv.listener
        assert listener is not None
        alices.pop().close()
        assert wait_for(lambda: srv.call(lambda: listener.connections_of(ALICE)) == 1)
        with Client(srv.port, pki.client_context("alice")) as again:
            assert served(again)
    finally:
        for c in alices:
            c.close()


def test_a_refused_identity_is_closed_before_any_http(
    start: Callable[..., Server], pki: Pki
) -> None:
    real = identify_with(pki.bundles)

    def identify(transport: asyncio.BaseTransport) -> Admission[str]:
        admission = real(transport)
        if admission.peer == BOB:
            raise Refused("bob is not welcome")
        if admission.peer == ALICE and transport.get_extra_info("peername") is None:
            raise RuntimeError("never happens")
        return admission

    srv = start(Limits(), identify=identify)
    with Client(srv.port, pki.client_context("bob")) as bob:
        assert bob.exchange(get("/x")) is None
    with Client(srv.port, pki.client_context("alice")) as alice:
        assert served(alice)
    assert srv.counters()["identity_refused"] == 1
    assert srv.call(lambda: srv.seen.paths) == ["/x"]


def test_a_failing_identity_check_refuses_the_connection(
    start: Callable[..., Server], pki: Pki
) -> None:
    def broken(transport: asyncio.BaseTransport) -> Admission[str]:
        raise RuntimeError("a bug in the identity check")

    srv = start(Limits(), identify=broken)
    with Client(srv.port, pki.client_context()) as c:
        assert c.exchange(get("/x")) is None  # fail closed
    assert srv.counters()["identity_refused"] == 1


def test_a_client_without_a_certificate_fails_the_handshake(
    start: Callable[..., Server], pki: Pki
) -> None:
    srv = start(Limits())
    try:
        with Client(srv.port, pki.client_context(None)) as c:
            assert c.exchange(get("/x")) is None
    except (ssl.SSLError, ConnectionError):
        pass  # TLS 1.2 clients see the alert in the handshake
    assert wait_for(lambda: srv.counters()["handshake_failed"] == 1)
    assert wait_for(lambda: srv.open_connections() == 0)


def test_closed_connections_are_freed_without_the_cyclic_collector(
    start: Callable[..., Server], pki: Pki
) -> None:
    """A closed connection and its TLS objects go as soon as it is closed (reference counting):
    left in reference cycles they wait for a full collection, and glibc keeps the memory."""
    srv = start(Limits())
    gc.collect()
    gc.disable()
    try:
        for _ in range(5):
            with Client(srv.port, pki.client_context()) as c:
                assert served(c)
        for _ in range(3):
            with (
                contextlib.suppress(ssl.SSLError, ConnectionError),
                Client(srv.port, pki.client_context(None)) as c,
            ):
                c.exchange(get("/x"))
        assert wait_for(lambda: srv.open_connections() == 0)
        assert srv.counters()["handshake_failed"] == 3
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        left = sorted({type(o).__name__ for o in gc.garbage} & {"H1Connection", "SSLProtocol"})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


def client_hello() -> bytes:
    """A real TLS 1.3 ClientHello, for a client that then stalls."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    obj = ctx.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO())
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_the_oldest_stalled_handshake_gives_way_beyond_max_handshakes(
    start: Callable[..., Server], pki: Pki
) -> None:
    srv = start(Limits(max_handshakes=2, handshake_timeout=30.0))
    hello = client_hello()
    stalled = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(3)]
    try:
        for sock in stalled:
            sock.sendall(hello)
            assert sock.recv(1)  # the server's first flight: it holds this handshake
        assert closed_by_peer_after_data(stalled[0])  # the oldest was reset for the third
        assert wait_for(lambda: srv.open_connections() == 2)
        assert srv.counters()["handshake_failed"] == 1
        with Client(srv.port, pki.client_context()) as c:  # a real client still gets through
            assert served(c)
        assert srv.counters()["handshake_failed"] == 2  # … and the next oldest gave way
    finally:
        for sock in stalled:
            sock.close()


def closed_by_peer_after_data(sock: socket.socket) -> bool:
    """Reads what the server sent until its close (EOF or reset); a timeout raises."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


def test_a_silent_connection_is_closed_after_the_handshake_timeout(
    start: Callable[..., Server],
) -> None:
    srv = start(Limits(handshake_timeout=0.3))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as raw:
        started = time.monotonic()
        assert closed_by_peer(raw)
        assert time.monotonic() - started < 3.0
    assert wait_for(lambda: srv.counters()["handshake_failed"] == 1)
    assert srv.open_connections() == 0


def test_the_connection_closes_when_the_client_certificate_expires(
    start: Callable[..., Server], pki: Pki
) -> None:
    pki.ca.issue(ALICE, ttl=timedelta(seconds=2)).write(pki.dir / "short")
    srv = start(Limits(idle_timeout=30, header_timeout=30))
    with Client(srv.port, pki.client_context("short")) as c:
        assert served(c)
        started = time.monotonic()
        assert c.closed()
        assert time.monotonic() - started < 4.0


def test_shutdown_closes_idle_connections_and_drains_busy_ones(
    start: Callable[..., Server], pki: Pki
) -> None:
    srv = start(Limits())
    listener = srv.listener
    assert listener is not None
    with (
        Client(srv.port, pki.client_context()) as idle,
        Client(srv.port, pki.client_context()) as busy,
    ):
        assert served(idle)
        busy.send(get("/slow"))
        assert wait_for(lambda: "/slow" in srv.call(lambda: srv.seen.paths))
        started = time.monotonic()
        drained = srv.submit(listener.shutdown(5.0))
        assert idle.closed()  # at once
        resp = busy.read_response()
        assert resp is not None and resp.status == 200
        assert resp.header("Connection") == "close"
        assert busy.closed()
    drained.result(5)
    assert time.monotonic() - started < 3.0  # nobody waited for the drain deadline
    assert listener.open_connections == 0


def test_half_open_handshakes_cost_little_memory_and_are_closed(pki: Pki) -> None:
    """500 TCP connections that never send a ClientHello, against a server process on uvloop:
    RSS grows by well under 20 KiB per connection, and all are closed after the timeout."""
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "h1_flood_server.py"), str(pki.dir), "3.0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    sockets: list[socket.socket] = []

    def stats() -> dict[str, object]:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("stats\n")
        proc.stdin.flush()
        doc: dict[str, object] = json.loads(proc.stdout.readline())
        return doc

    try:
        port = int(proc.stdout.readline().split()[1])
        with Client(port, pki.client_context()) as c:  # warm up the TLS and HTTP paths
            assert served(c)
        before = stats()
        for _ in range(500):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert wait_for(lambda: stats()["open"] == 500, 10)
        during = stats()
        per_conn = (int(during["rss_kib"]) - int(before["rss_kib"])) / 500  # type: ignore[call-overload]
        print(f"half-open: {per_conn:.2f} KiB per connection")
        assert per_conn < 20, f"{per_conn:.1f} KiB per half-open connection"
        assert wait_for(lambda: stats()["open"] == 0, 15)
        counters = stats()["counters"]
        assert isinstance(counters, dict) and counters["handshake_failed"] >= 500
        sockets[0].settimeout(1)
        assert closed_by_peer(sockets[0])
    finally:
        for s in sockets:
            s.close()
        proc.stdin.close()
        proc.wait(10)
