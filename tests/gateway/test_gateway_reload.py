"""Reloadable state: rotation while serving, broken files, file-change polling, removed CAs
(including TLS session resumption), open connections surviving a reload."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from gateway_harness import (
    GATEWAY_ID,
    B,
    Echo,
    Harness,
    LabPki,
    build_request,
    gateway_config,
    parse_response,
    raw_exchange,
)
from support.waiting import wait_for


async def _served_serial(gw: Harness) -> int:
    _reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=gw.ctx("web"), server_hostname="localhost"
    )
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return x509.load_der_x509_certificate(der).serial_number


async def test_rotation_while_serving_zero_failures(gw: Harness, echo: Echo) -> None:
    before = await _served_serial(gw)
    results: list[int | None] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            resp = await gw.request("GET", "/orders/1")
            results.append(resp.status if resp else None)

    async def served_more(count: int) -> None:
        # Paced by completed requests, not wall-clock time, so a loaded machine cannot make the
        # rotations outrun the traffic; bounded so a stuck gateway fails instead of hanging.
        target = len(results) + count
        await wait_for(lambda: len(results) >= target, 10, f"{target} completed requests")

    tasks = [asyncio.create_task(client()) for _ in range(4)]
    for _ in range(5):
        await served_more(3)
        gw.pki.issue(GATEWAY_ID, "gateway", dns=["localhost"], ips=["127.0.0.1"])
        assert gw.server.reload()
    await served_more(3)
    stop.set()
    await asyncio.gather(*tasks)
    assert len(results) >= 18
    assert set(results) == {200}
    assert await _served_serial(gw) != before


def _reload_error(caplog: pytest.LogCaptureFixture) -> str:
    """The reason of the one failed reload, as the gateway logged it."""
    prefix = "reload failed, keeping the previous state: "
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith(prefix)]
    return line.removeprefix(prefix)


async def test_reload_with_broken_certificate_keeps_old(
    gw: Harness, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    before = await _served_serial(gw)
    (gw.pki.dir / "gateway.crt").write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
    caplog.set_level(logging.ERROR, logger="svidgate.gateway")
    assert not gw.server.reload()
    error = _reload_error(caplog)
    assert "tls.cert" in error or "certificate" in error
    resp = await gw.request("GET", "/orders/1")
    assert resp is not None and resp.status == 200
    assert await _served_serial(gw) == before


async def test_reload_with_mismatched_key_keeps_old(gw: Harness, echo: Echo) -> None:
    other = gw.pki.ca.issue(GATEWAY_ID)
    (gw.pki.dir / "gateway.key").write_bytes(other.key_pem())  # key of another cert
    assert not gw.server.reload()
    resp = await gw.request("GET", "/orders/1")
    assert resp is not None and resp.status == 200


async def test_reload_with_broken_config_keeps_old_policy(
    gw: Harness, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    gw.config_path.write_text(gw.config_path.read_text().replace("path_prefix", "prefix"))
    caplog.set_level(logging.ERROR, logger="svidgate.gateway")
    assert not gw.server.reload()
    assert "unknown key" in _reload_error(caplog)
    resp = await gw.request("GET", "/orders/1")
    assert resp is not None and resp.status == 200


async def test_file_change_triggers_reload(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    gw: Harness = await start_gateway(gateway_config(test_pki, echo.port, reload_interval="100ms"))
    before = await _served_serial(gw)
    test_pki.issue(GATEWAY_ID, "gateway", dns=["localhost"], ips=["127.0.0.1"])
    await wait_for(lambda: gw.server.holder.current.generation > 1, 5, "the watcher's reload")
    assert gw.server.holder.current.generation > 1
    assert await _served_serial(gw) != before


async def test_policy_reload_applies_to_new_requests(gw: Harness, echo: Echo) -> None:
    assert (await gw.request("GET", "/admin/x")).status == 403  # type: ignore[union-attr]
    text = gw.config_path.read_text().replace(
        "spiffe://example.org/ops/**", "spiffe://example.org/ns/shop/sa/web"
    )
    gw.config_path.write_text(text)
    assert gw.server.reload()
    resp = await gw.request("GET", "/admin/x")
    assert resp is not None and resp.status == 200


async def test_removed_trust_domain_refused_even_with_session_resumption(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    gw: Harness = await start_gateway(gateway_config(test_pki, echo.port))
    ctx = gw.ctx("b-web", tls13=False)  # TLS 1.2: session-ID resumption is the risky path
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(build_request("GET", "/public/1"))
    first = parse_response(await asyncio.wait_for(reader.read(), 5))
    ssl_object = writer.get_extra_info("ssl_object")
    session = ssl_object.session
    writer.close()
    assert first.status == 200
    # Remove other.org's bundle and reload.
    doc = gateway_config(test_pki, echo.port)
    del doc["trust_domains"][B]
    gw.config_path.write_text(__import__("yaml").safe_dump(doc))
    assert gw.server.reload()
    # Offering the old session must not get in.
    resumed = await _exchange_with_session(gw.port, ctx, session)
    assert resumed is None
    # Nor a fresh handshake.
    assert await raw_exchange(gw.port, ctx, build_request("GET", "/public/1")) is None
    assert len(echo.seen) == 1


async def test_resumed_session_is_reverified_and_accepted(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    gw: Harness = await start_gateway(gateway_config(test_pki, echo.port))
    ctx = gw.ctx("web", tls13=False)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=ctx, server_hostname="localhost"
    )
    writer.write(build_request("GET", "/orders/1"))
    await asyncio.wait_for(reader.read(), 5)
    session = writer.get_extra_info("ssl_object").session
    writer.close()
    result = await _exchange_with_session(gw.port, ctx, session)
    # OpenSSL resumes TLS 1.2 session IDs; the gateway re-verifies the session's leaf against
    # the current bundle, so a still-trusted client gets in.
    assert result is not None
    assert result[0].status == 200
    assert result[1] is True, "the server resumed the session (the path under test)"


async def _exchange_with_session(
    port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None
) -> tuple[Any, bool] | None:
    import socket

    def blocking() -> tuple[Any, bool] | None:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
                    reused = tls.session_reused
                    tls.sendall(build_request("GET", "/public/1"))
                    data = b""
                    while chunk := tls.recv(65536):
                        data += chunk
            except (ssl.SSLError, OSError):
                return None
        if not data:
            return None
        return parse_response(data), reused

    return await asyncio.to_thread(blocking)


async def test_open_connection_survives_reload(gw: Harness, echo: Echo) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=gw.ctx("web"), server_hostname="localhost"
    )

    async def one(target: str) -> int:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        await reader.readexactly(length)
        return int(head.split(b" ")[1])

    assert await one("/orders/1") == 200
    gw.pki.issue(GATEWAY_ID, "gateway", dns=["localhost"], ips=["127.0.0.1"])
    assert gw.server.reload()
    assert await one("/orders/2") == 200
    writer.close()
    assert echo.targets == ["/orders/1", "/orders/2"]
