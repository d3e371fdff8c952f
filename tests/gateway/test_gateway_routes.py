"""Canonical paths and route matching (pure, no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from svidgate.gateway.errors import BadRequest
from svidgate.gateway.routes import Route, RouteTable, canonical_path, parse_target


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("/", "/"),
        ("/orders", "/orders"),
        ("/orders/", "/orders/"),
        ("//admin", "/admin"),
        ("/./admin", "/admin"),
        ("/x/../admin", "/admin"),
        ("/../../admin", "/admin"),
        ("/%2e%2e/admin", "/admin"),
        ("/%2E/admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/a/%7euser", "/a/~user"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a/b/..", "/a/"),
        ("/a/.", "/a/"),
        ("/a%20b", "/a%20b"),
    ],
)
def test_canonical_path(raw: str, canonical: str) -> None:
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    "raw",
    [
        "/admin;x",
        "/x%2F..%2Fadmin",
        "/x%2f..",
        "/a\\b",
        "/a%5cb",
        "/a%00",
        "/a\x00",
        "/a%3bb",
        "/%ff",
        "/%c3",
        "/%zz",
        "/%4",
        "/caf\u00e9",
        "/a b",
        "relative",
        "",
    ],
)
def test_rejected_paths(raw: str) -> None:
    with pytest.raises(BadRequest):
        canonical_path(raw)


def test_target_keeps_query_untouched() -> None:
    target = parse_target("/a/%2e%2e/b?x=%2e%2e&y=/../z")
    assert target.path == "/b"
    assert target.forward() == "/b?x=%2e%2e&y=/../z"


def test_target_bare_question_mark_is_kept() -> None:
    assert parse_target("/a?").forward() == "/a?"
    assert parse_target("/a").forward() == "/a"


def test_fragment_rejected() -> None:
    with pytest.raises(BadRequest):
        parse_target("/a#frag")


@given(st.text(alphabet="/.%2eEaAdmin;\\", max_size=24))
def test_canonical_is_idempotent_and_clean(raw: str) -> None:
    try:
        first = canonical_path("/" + raw)
    except BadRequest:
        return
    assert canonical_path(first) == first
    assert "//" not in first
    assert all(seg not in (".", "..") for seg in first.split("/"))


def _route(index: int, name: str, prefix: str, methods: tuple[str, ...] | None = None) -> Route:
    return Route(index, name, prefix, frozenset(methods) if methods else None, "u", None)


def test_prefix_matches_on_segment_boundary() -> None:
    table = RouteTable((_route(0, "orders", "/orders"),))
    assert table.match("/orders", "GET") is not None
    assert table.match("/orders/", "GET") is not None
    assert table.match("/orders/1", "GET") is not None
    assert table.match("/ordersx", "GET") is None
    assert table.match("/", "GET") is None


def test_longest_prefix_then_method() -> None:
    table = RouteTable(
        (
            _route(0, "root", "/"),
            _route(1, "read", "/orders", ("GET", "HEAD")),
            _route(2, "write", "/orders", ("POST",)),
            _route(3, "admin", "/orders/admin"),
        )
    )
    m = table.match("/orders/1", "POST")
    assert m is not None and m.route.name == "write" and m.method_allowed
    m = table.match("/orders/1", "GET")
    assert m is not None and m.route.name == "read"
    m = table.match("/orders/1", "DELETE")
    assert m is not None and m.route.name == "read" and not m.method_allowed
    m = table.match("/orders/admin/x", "DELETE")
    assert m is not None and m.route.name == "admin"
    m = table.match("/other", "GET")
    assert m is not None and m.route.name == "root"
