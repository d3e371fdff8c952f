"""Policy decisions (pure): default deny, patterns, methods, explain()."""

from __future__ import annotations

from pathlib import Path

import pytest
from svidgate.gateway.config import parse_config
from svidgate.gateway.errors import Forbidden, NoRoute
from svidgate.gateway.policy import Policy
from svidgate.pki.spiffe_id import parse_spiffe_id


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
