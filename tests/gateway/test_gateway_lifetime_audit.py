"""Connection lifetime bounded by the client certificate, the audit log, HEAD, and readiness
following the signer."""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import timedelta

import pytest
from gateway_harness import WEB_ID, Echo, Harness


async def test_connection_closed_at_certificate_not_after(gw: Harness, echo: Echo) -> None:
    gw.pki.issue(WEB_ID, "short", ttl=timedelta(seconds=2))
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=gw.ctx("short"), server_hostname="localhost"
    )
    writer.write(b"GET /orders/1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    # The keep-alive connection is closed by the gateway once the certificate expires.
    rest = b""
    for _ in range(40):
        try:
            chunk = await asyncio.wait_for(reader.read(65536), 0.25)
        except TimeoutError:
            continue
        except (ConnectionError, OSError):
            break
        if not chunk:
            break
        rest += chunk
    else:
        pytest.fail("the connection outlived the client certificate")
    writer.close()
    assert echo.targets == ["/orders/1"]


async def test_audit_log_records_identity_route_rule_decision(
    gw: Harness, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="svidgate.audit")
    await gw.request("GET", "/orders/1")
    await gw.request("GET", "/admin/1")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "svidgate.audit"]
    allow = next(line for line in lines if line.get("decision") == "allow")
    deny = next(line for line in lines if line.get("decision") == "deny")
    assert allow["spiffe_id"] == WEB_ID
    assert allow["route"] == "orders-read"
    assert allow["rule"] == "spiffe://example.org/ns/shop/sa/*"
    assert deny["route"] == "admin" and deny["reason"] == "identity_not_allowed"
    assert deny["rule"] is None


async def test_access_log_never_contains_the_query_or_token(
    gw: Harness, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    await gw.request("GET", "/orders/1?secret=s3cr3t", [("Authorization", "Bearer s3cr3t")])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert '"event":"access"' in text
    assert "s3cr3t" not in text


async def test_head_is_forwarded_without_body(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("HEAD", "/orders/1")
    assert resp is not None and resp.status == 200
    assert resp.body == b""
    assert echo.seen[0]["method"] == "HEAD"
