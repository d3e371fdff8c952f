"""Issue 13 item 2 against a real `svidgate gateway serve`: every line it writes follows the
shared schema; the access line has every documented field and never the query; failed
handshakes leave one line each with the peer's address and the reason word; and a stderr pipe
that nobody reads does not stall the gateway: requests keep being answered, lines over the
queue's capacity are dropped and their count is logged once the pipe is read again."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from gateway_harness import (
    Echo,
    GatewayProcess,
    LabPki,
    build_request,
    gateway_config,
    raw_exchange,
)
from support.logschema import check_line
from support.pki import A
from support.waiting import wait_for
from svidgate.pki.ca import CertificateAuthority

from svidgate.logs import DEFAULT_CAPACITY


@pytest.fixture
async def process(test_pki: LabPki, echo: Echo) -> AsyncIterator[GatewayProcess]:
    gw = GatewayProcess(test_pki, gateway_config(test_pki, echo.port))
    try:
        await gw.start()
        yield gw
    finally:
        gw.kill()


def _ctx(pki: LabPki, name: str | None) -> ssl.SSLContext:
    if name is None:
        return pki.client_context(None, None)
    return pki.client_context(pki.dir / f"{name}.crt", pki.dir / f"{name}.key")


async def test_access_and_audit_lines_follow_the_schema(
    test_pki: LabPki, process: GatewayProcess
) -> None:
    ok = await raw_exchange(
        process.port,
        _ctx(test_pki, "web"),
        build_request("GET", "/orders/7?secret=hunter2", [("X-Request-Id", "req-7")]),
    )
    assert ok is not None and ok.status == 200
    denied = await raw_exchange(
        process.port, _ctx(test_pki, "web"), build_request("GET", "/admin/x")
    )
    assert denied is not None and denied.status == 403
    await wait_for(
        lambda: len([e for e in process.events() if e["event"] == "access"]) == 2,
        10,
        "2 access lines",
    )
    events = process.events()  # every line checked against the schema
    first, second = [e for e in events if e["event"] == "access"]
    assert first["path"] == "/orders/7" and "hunter2" not in str(events)
    assert first["status"] == 200 and first["route"] == "orders-read" and first["method"] == "GET"
    assert first["request_id"] == "req-7" and first["client"] == "127.0.0.1"
    assert first["spiffe_id"] == f"spiffe://{A}/ns/shop/sa/web" and first["upstream"] == "echo"
    assert first["bytes_out"] > 0 and first["duration_ms"] > 0
    assert second["status"] == 403 and second["upstream"] is None
    decisions = [e for e in events if e["event"] == "authorization"]
    assert [d["decision"] for d in decisions] == ["allow", "deny"]
    assert {e["event"] for e in events} >= {"listening", "access", "authorization"}


async def test_failed_handshakes_are_logged_with_peer_and_reason(
    test_pki: LabPki, process: GatewayProcess
) -> None:
    stranger_ca = CertificateAuthority.create(A)
    stranger_ca.issue(f"spiffe://{A}/ns/shop/sa/web").write(test_pki.dir / "forged")
    test_pki.ca.issue(
        f"spiffe://{A}/ns/shop/sa/web",
        ttl=timedelta(seconds=1),
        now=datetime.now(UTC) - timedelta(hours=2),
    ).write(test_pki.dir / "expired")
    for name in (None, "forged", "expired"):
        resp = await raw_exchange(
            process.port, _ctx(test_pki, name), build_request("GET", "/orders/1")
        )
        assert resp is None, name
    # a peer that connects and never says hello is cut at handshake_timeout
    reader, writer = await asyncio.open_connection("127.0.0.1", process.port)
    silent_port = writer.get_extra_info("sockname")[1]

    def failures() -> list[dict[str, object]]:
        return [e for e in process.events() if e["event"] == "handshake_failed"]

    await wait_for(lambda: len(failures()) >= 4, 30, "4 handshake_failed lines")
    writer.close()
    reasons = {str(e["reason"]) for e in failures()}
    assert reasons == {"no_client_certificate", "unknown_ca", "expired", "timeout"}, failures()
    timeout = next(e for e in failures() if e["reason"] == "timeout")
    assert timeout["peer"] == f"127.0.0.1:{silent_port}"
    assert all(str(e["peer"]).startswith("127.0.0.1:") for e in failures())
    with contextlib.suppress(Exception):
        await reader.read()


async def test_a_stderr_pipe_nobody_reads_does_not_stall_requests(
    test_pki: LabPki, echo: Echo
) -> None:
    doc = gateway_config(test_pki, echo.port, limits={"handshake_timeout": "1s"})
    gw = GatewayProcess(test_pki, doc, "gateway-blocked", stderr_pipe=True)
    try:
        await gw.start()
        assert gw.proc is not None and gw.proc.stderr is not None
        ctx = _ctx(test_pki, "web")
        # two lines per request (access + authorization): more than the queue holds, long
        # after the pipe's buffer is full
        per_connection = DEFAULT_CAPACITY // 4 + 100
        statuses = await asyncio.gather(
            *(_keep_alive(gw.port, ctx, per_connection) for _ in range(4))
        )
        assert all(s == [200] * per_connection for s in statuses)
        # someone reads the pipe again: the gateway reports what it had to drop
        fd = gw.proc.stderr.fileno()
        os.set_blocking(fd, False)
        seen = bytearray()

        def drained() -> bool:
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(fd, 1 << 16):
                    seen.extend(chunk)
            return b"log_lines_dropped" in seen

        await wait_for(drained, 30, "the log_lines_dropped line")
        complete = bytes(seen).decode().rpartition("\n")[0].splitlines()
        docs = [check_line(line, "gateway") for line in complete]
        report = next(d for d in docs if d["event"] == "log_lines_dropped")
        assert report["dropped"] > 0
    finally:
        gw.kill()


async def _keep_alive(port: int, ctx: ssl.SSLContext, count: int) -> list[int]:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    statuses: list[int] = []
    try:
        for i in range(count):
            writer.write(f"GET /orders/{i} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await asyncio.wait_for(reader.readexactly(length), 20)
            statuses.append(int(head.split(b" ", 2)[1]))
    finally:
        writer.close()
    return statuses
