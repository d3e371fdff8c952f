"""The audit log off the hot path: allow decisions can be switched off (denials never are), and
the fast line builder writes exactly what the generic JSON emitter would."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from gateway_harness import WEB_ID, Echo, LabPki, gateway_config
from svidgate.gateway.app import authorization_line
from svidgate.gateway.config import parse_config


@pytest.mark.parametrize(
    "fields",
    [
        {
            "outcome": "allow",
            "reason": "allowed",
            "spiffe_id": WEB_ID,
            "route": "orders-read",
            "rule": "spiffe://example.org/ns/shop/sa/*",
            "method": "GET",
            "path": "/orders/1",
        },
        {
            "outcome": "deny",
            "reason": "no_route",
            "spiffe_id": 'spiffe://example.org/a"b\\c',
            "route": None,
            "rule": None,
            "method": "PATCH",
            "path": '/x/"quoted"/\\/\u00e9\u2028\x00\x1f/\U0001f600',
        },
    ],
)
def test_authorization_line_is_exactly_the_json_the_emitter_writes(fields: dict[str, Any]) -> None:
    line = authorization_line(**fields)
    expected = json.dumps(
        {
            "event": "authorization",
            "decision": fields["outcome"],
            "reason": fields["reason"],
            "spiffe_id": fields["spiffe_id"],
            "route": fields["route"],
            "rule": fields["rule"],
            "method": fields["method"],
            "path": fields["path"],
        },
        separators=(",", ":"),
    )
    assert line == expected
    assert json.loads(line)["path"] == fields["path"]


def test_audit_allow_defaults_to_true_and_accepts_false(test_pki: LabPki) -> None:
    base = gateway_config(test_pki, 1)
    assert parse_config(base, base_dir=test_pki.dir).audit.allow is True
    off = parse_config({**base, "audit": {"allow": False}}, base_dir=test_pki.dir)
    assert off.audit.allow is False


def _audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "svidgate.audit"]


async def test_audit_allow_false_logs_denials_only(
    test_pki: LabPki,
    echo: Echo,
    start_gateway: Callable[..., Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = await start_gateway(gateway_config(test_pki, echo.port, audit={"allow": False}))
    caplog.set_level(logging.INFO, logger="svidgate.audit")
    ok = await gw.request("GET", "/orders/1")
    denied = await gw.request("GET", "/admin/1")
    assert ok is not None and ok.status == 200
    assert denied is not None and denied.status == 403
    lines = _audit_lines(caplog)
    assert [line["decision"] for line in lines] == ["deny"]
    assert lines[0]["reason"] == "identity_not_allowed" and lines[0]["spiffe_id"] == WEB_ID


async def test_audit_allow_true_logs_both(
    gw: Any, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="svidgate.audit")
    await gw.request("GET", "/orders/1")
    await gw.request("GET", "/admin/1")
    assert [line["decision"] for line in _audit_lines(caplog)] == ["allow", "deny"]
