"""Policy decisions (pure): default deny, patterns, methods, explain()."""

from __future__ import annotations

from pathlib import Path

import pytest
from svidgate.gateway.config import parse_config
from svidgate.gateway.errors import Forbidden, NoRoute, response_spec
from svidgate.gateway.policy import IdentityDenied, Policy, PolicyDenial, RouteNotFound
from svidgate.pki.spiffe_id import SpiffeId, parse_spiffe_id


def _policy(tmp_path: Path) -> Policy:
    doc = {
        "listen": "127.0.0.1:8443",
        "tls": {"cert": "g.crt", "key": "g.key"},
        "trust_domains": {"example.org": {"bundle": "b.pem"}},
        "upstreams": {"orders": {"url": "http://127.0.0.1:9000"}},
        "routes": [
            {
                "name": "orders-read",
                "match": {"path_prefix": "/orders", "methods": ["get", "HEAD"]},
                "upstream": "orders",
                "allow": ["spiffe://example.org/ns/shop/sa/*"],
            },
            {
                "name": "orders-write",
                "match": {"path_prefix": "/orders", "methods": ["POST"]},
                "upstream": "orders",
                "allow": ["spiffe://example.org/ns/shop/sa/writer"],
            },
            {
                "name": "admin",
                "match": {"path_prefix": "/admin"},
                "upstream": "orders",
                "allow": ["spiffe://example.org/ops/**"],
            },
            {"name": "closed", "match": {"path_prefix": "/closed"}, "upstream": "orders"},
        ],
    }
    return Policy.from_config(parse_config(doc, base_dir=tmp_path))


WEB = parse_spiffe_id("spiffe://example.org/ns/shop/sa/web")
WRITER = parse_spiffe_id("spiffe://example.org/ns/shop/sa/writer")
OPS = parse_spiffe_id("spiffe://example.org/ops/team/alice")
OTHER_TD = parse_spiffe_id("spiffe://other.org/ns/shop/sa/web")


def test_pattern_allows(tmp_path: Path) -> None:
    d = _policy(tmp_path).explain(WEB, "GET", "/orders/1")
    assert d.allowed and d.route is not None
    assert d.route.name == "orders-read"
    assert d.rule == "spiffe://example.org/ns/shop/sa/*"


def test_method_not_listed_denied(tmp_path: Path) -> None:
    d = _policy(tmp_path).explain(WEB, "DELETE", "/orders/1")
    assert not d.allowed and d.reason == "method_not_allowed"
    with pytest.raises(Forbidden):
        _policy(tmp_path).authorize(WEB, "DELETE", "/orders/1")


def test_method_route_selects_its_own_allow_list(tmp_path: Path) -> None:
    p = _policy(tmp_path)
    assert not p.explain(WEB, "POST", "/orders").allowed
    assert p.explain(WRITER, "POST", "/orders").allowed


def test_other_trust_domain_denied(tmp_path: Path) -> None:
    d = _policy(tmp_path).explain(OTHER_TD, "GET", "/orders")
    assert not d.allowed and d.reason == "identity_not_allowed"


def test_rest_pattern(tmp_path: Path) -> None:
    p = _policy(tmp_path)
    assert p.explain(OPS, "DELETE", "/admin/x").allowed
    assert not p.explain(WEB, "GET", "/admin").allowed


def test_empty_allow_list_denies_everyone(tmp_path: Path) -> None:
    d = _policy(tmp_path).explain(OPS, "GET", "/closed")
    assert not d.allowed and d.reason == "identity_not_allowed"


def test_no_route(tmp_path: Path) -> None:
    p = _policy(tmp_path)
    assert p.explain(WEB, "GET", "/ordersx").reason == "no_route"
    with pytest.raises(NoRoute):
        p.authorize(WEB, "GET", "/nothing")


def test_authorize_returns_the_allowing_decision(tmp_path: Path) -> None:
    p = _policy(tmp_path)
    d = p.authorize(WRITER, "POST", "/orders/1")
    assert d == p.explain(WRITER, "POST", "/orders/1")
    assert d.allowed and d.route is not None and d.route.name == "orders-write"
    assert d.rule == "spiffe://example.org/ns/shop/sa/writer"


@pytest.mark.parametrize(
    ("spiffe_id", "method", "path", "kind", "status", "route", "reason"),
    [
        (OTHER_TD, "GET", "/orders", IdentityDenied, 403, "orders-read", "identity_not_allowed"),
        (WEB, "DELETE", "/orders/1", IdentityDenied, 403, "orders-read", "method_not_allowed"),
        (OPS, "GET", "/closed/x", IdentityDenied, 403, "closed", "identity_not_allowed"),
        (WEB, "GET", "/nothing", RouteNotFound, 404, None, "no_route"),
    ],
)
def test_authorize_raises_the_denying_decision(
    tmp_path: Path,
    spiffe_id: SpiffeId,
    method: str,
    path: str,
    kind: type[PolicyDenial],
    status: int,
    route: str | None,
    reason: str,
) -> None:
    p = _policy(tmp_path)
    with pytest.raises(kind) as raised:
        p.authorize(spiffe_id, method, path)
    err = raised.value
    assert err.decision == p.explain(spiffe_id, method, path)
    assert err.reason == reason and str(err) == reason
    assert (err.decision.route.name if err.decision.route else None) == route
    assert isinstance(err, Forbidden if status == 403 else NoRoute)
    assert response_spec(err).status == status
