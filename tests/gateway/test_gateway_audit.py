"""The audit log off the hot path: allow decisions can be switched off (denials never are), and
the fast line builder writes exactly what the generic JSON emitter would. The pipeline denies
through Policy.authorize and audits the decision that denial carries."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from gateway_harness import WEB_ID, Echo, Harness, LabPki, gateway_config
from svidgate.gateway.app import authorization_line
from svidgate.gateway.config import parse_config
from svidgate.gateway.errors import response_spec
from svidgate.gateway.policy import PolicyDenial
from svidgate.pki.spiffe_id import parse_spiffe_id


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


@pytest.mark.parametrize(
    ("method", "target", "status", "route", "reason"),
    [
        ("GET", "/admin/1", 403, "admin", "identity_not_allowed"),
        ("DELETE", "/orders/1", 403, "orders-read", "method_not_allowed"),
        ("GET", "/ordersx", 404, None, "no_route"),
    ],
)
async def test_pipeline_denies_through_policy_authorize(
    gw: Harness,
    echo: Echo,
    caplog: pytest.LogCaptureFixture,
    method: str,
    target: str,
    status: int,
    route: str | None,
    reason: str,
) -> None:
    # The denial Policy.authorize raises is the one the pipeline answers (the one error table)
    # and audits: same body, same audit line, nothing reaches the upstream.
    with pytest.raises(PolicyDenial) as raised:
        gw.server.holder.current.policy.authorize(parse_spiffe_id(WEB_ID), method, target)
    assert response_spec(raised.value).status == status
    caplog.set_level(logging.INFO, logger="svidgate.audit")
    resp = await gw.request(method, target)
    assert resp is not None and resp.status == status
    error = "forbidden" if status == 403 else "no_route"
    assert resp.json() == {"error": error, "route": route, "reason": reason}
    audit = [r for r in caplog.records if r.name == "svidgate.audit"]
    assert [r.getMessage() for r in audit] == [
        authorization_line(
            outcome="deny",
            reason=raised.value.decision.reason,
            spiffe_id=WEB_ID,
            route=route,
            rule=None,
            method=method,
            path=target,
        )
    ]
    assert echo.seen == []
