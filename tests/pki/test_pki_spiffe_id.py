"""SPIFFE ID parsing per the SPIFFE-ID spec, with py-spiffe as an oracle for what we accept."""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from spiffe import SpiffeId as PySpiffeId
from spiffe import TrustDomain as PyTrustDomain
from svidgate.pki.errors import InvalidSpiffeIdError, PkiError
from svidgate.pki.spiffe_id import SpiffeId, TrustDomain, parse_spiffe_id, parse_trust_domain

TD_CHARS = string.ascii_lowercase + string.digits + ".-_"
PATH_CHARS = string.ascii_letters + string.digits + ".-_"

VALID = [
    # (text, trust domain, path)
    ("spiffe://example.org", "example.org", ""),
    ("spiffe://example.org/a", "example.org", "/a"),
    ("spiffe://example.org/ns/shop/sa/orders", "example.org", "/ns/shop/sa/orders"),
    ("spiffe://trust-domain_1.example/Path-With_MIXED.case", "trust-domain_1.example", None),
    ("spiffe://a/b", "a", "/b"),
    ("spiffe://1.2.3.4/a", "1.2.3.4", "/a"),
    ("spiffe://example.org/.a/..b/...", "example.org", "/.a/..b/..."),
    ("spiffe://example.org/0123456789", "example.org", "/0123456789"),
    ("spiffe://" + "d" * 255 + "/a", "d" * 255, "/a"),
]


@pytest.mark.parametrize(("text", "td", "path"), VALID)
def test_valid_ids_parse_and_render_back(text: str, td: str, path: str | None) -> None:
    sid = parse_spiffe_id(text)
    assert str(sid) == text
    assert sid.trust_domain == TrustDomain(td)
    assert sid.path == (path if path is not None else text[len("spiffe://") + len(td) :])
    assert sid.is_trust_domain_id == (sid.path == "")


def test_segments_and_trust_domain_id() -> None:
    sid = parse_spiffe_id("spiffe://example.org/ns/shop/sa/orders")
    assert sid.segments == ("ns", "shop", "sa", "orders")
    assert sid.trust_domain.id() == parse_spiffe_id("spiffe://example.org")
    assert sid.trust_domain.id().segments == ()
    assert str(sid.trust_domain) == "example.org"
    assert sid == SpiffeId(TrustDomain("example.org"), "/ns/shop/sa/orders")


def test_exactly_2048_bytes_is_accepted() -> None:
    prefix = "spiffe://example.org/"
    text = prefix + "a" * (2048 - len(prefix))
    assert len(text) == 2048
    assert str(parse_spiffe_id(text)) == text


INVALID = [
    # (text, fragment of the message naming the problem)
    ("", "empty"),
    ("example.org/a", "scheme must be 'spiffe://'"),
    ("https://example.org/a", "scheme must be 'spiffe://'"),
    ("SPIFFE://example.org/a", "scheme must be 'spiffe://'"),
    ("Spiffe://example.org/a", "scheme must be 'spiffe://'"),
    ("spiffe:/example.org/a", "scheme must be 'spiffe://'"),
    ("spiffe:example.org/a", "scheme must be 'spiffe://'"),
    (" spiffe://example.org/a", "scheme must be 'spiffe://'"),
    ("spiffe://", "trust domain is missing"),
    ("spiffe:///a", "trust domain is missing"),
    ("spiffe:///", "trust domain is missing"),
    ("spiffe://Example.org/a", "trust domain must be lowercase"),
    ("spiffe://EXAMPLE.ORG", "trust domain must be lowercase"),
    ("spiffe://example.org:8080/a", "port is not allowed"),
    ("spiffe://example.org:/a", "port is not allowed"),
    ("spiffe://user@example.org/a", "userinfo is not allowed"),
    ("spiffe://user:pw@example.org/a", "userinfo is not allowed"),
    ("spiffe://example.org/a?x=1", "query or fragment"),
    ("spiffe://example.org?x=1", "query or fragment"),
    ("spiffe://example.org/a#frag", "query or fragment"),
    ("spiffe://example.org#frag", "query or fragment"),
    ("spiffe://example.org/a%20b", "percent-encoding"),
    ("spiffe://example.org/%41", "percent-encoding"),
    ("spiffe://ex%41mple.org/a", "percent-encoding"),
    ("spiffe://example.org//a", "empty segment"),
    ("spiffe://example.org/a//b", "empty segment"),
    ("spiffe://example.org/./a", "'.' segment"),
    ("spiffe://example.org/a/.", "'.' segment"),
    ("spiffe://example.org/../a", "'..' segment"),
    ("spiffe://example.org/a/..", "'..' segment"),
    ("spiffe://example.org/", "must not end with '/'"),
    ("spiffe://example.org/a/", "must not end with '/'"),
    ("spiffe://exa mple.org/a", "trust domain may contain only"),
    ("spiffe://exa$mple.org/a", "trust domain may contain only"),
    ("spiffe://exämple.org/a", "trust domain may contain only"),
    ("spiffe://example.org\n", "trust domain may contain only"),
    ("spiffe://[::1]/a", "trust domain may contain only"),
    ("spiffe://example.org/a b", "path may contain only"),
    ("spiffe://example.org/a$b", "path may contain only"),
    ("spiffe://example.org/a*", "path may contain only"),
    ("spiffe://example.org/a+b", "path may contain only"),
    ("spiffe://example.org/é", "path may contain only"),
    ("spiffe://example.org/a\\b", "path may contain only"),
    ("spiffe://example.org/a\x00", "path may contain only"),
    ("spiffe://example.org/" + "a" * 2048, "longer than 2048 bytes"),
    ("spiffe://example.org/" + "é" * 1020, "longer than 2048 bytes"),
    ("spiffe://" + "d" * 256 + "/a", "longer than 255 bytes"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID)
def test_invalid_ids_are_refused_naming_the_problem(text: str, fragment: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as info:
        parse_spiffe_id(text)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message.replace("\\n", "")  # one line
    assert len(message) < 400  # never echoes a 2 KiB ID


def test_invalid_ids_are_pki_errors() -> None:
    assert issubclass(InvalidSpiffeIdError, PkiError)


def test_non_string_is_refused() -> None:
    bad: Any = b"spiffe://example.org/a"
    with pytest.raises(InvalidSpiffeIdError, match="must be a string"):
        parse_spiffe_id(bad)


def test_require_path_refuses_the_trust_domain_id() -> None:
    assert parse_spiffe_id("spiffe://example.org").is_trust_domain_id
    with pytest.raises(InvalidSpiffeIdError, match="needs a path"):
        parse_spiffe_id("spiffe://example.org", require_path=True)
    assert parse_spiffe_id("spiffe://example.org/a", require_path=True).path == "/a"


@pytest.mark.parametrize("text", ["example.org", "spiffe://example.org"])
def test_parse_trust_domain_accepts_name_or_id(text: str) -> None:
    assert parse_trust_domain(text) == TrustDomain("example.org")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "trust domain is missing"),
        ("Example.org", "must be lowercase"),
        ("example.org:443", "port is not allowed"),
        ("spiffe://example.org/a", "a trust domain has no path"),
        ("spiffe://example.org/", "must not end with '/'"),
        ("example.org/a", "may contain only"),
        ("https://example.org", "scheme must be 'spiffe://'"),
        ("SPIFFE://example.org", "scheme must be 'spiffe://'"),
    ],
)
def test_parse_trust_domain_refuses(text: str, fragment: str) -> None:
    with pytest.raises(InvalidSpiffeIdError) as info:
        parse_trust_domain(text)
    assert fragment in str(info.value)


# ---------------------------------------------------------------- properties

trust_domains = st.text(TD_CHARS, min_size=1, max_size=40)
segments = st.text(PATH_CHARS, min_size=1, max_size=12).filter(lambda s: s not in (".", ".."))
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))
valid_ids = st.builds(lambda td, path: f"spiffe://{td}{path}", trust_domains, paths)


@settings(max_examples=300, deadline=None)
@given(valid_ids)
def test_generated_valid_ids_agree_with_py_spiffe(text: str) -> None:
    ours = parse_spiffe_id(text)
    oracle = PySpiffeId(text)
    assert str(ours) == str(oracle) == text
    assert ours.trust_domain.name == oracle.trust_domain.name
    assert ours.path == oracle.path


# Text near the grammar: the allowed alphabets plus every character that has a rule of its own.
NEAR = TD_CHARS + "ABCZ" + "/:@?#%*$ é\\"
near_ids = st.text(NEAR, max_size=40).map(lambda rest: "spiffe://" + rest)


@settings(max_examples=500, deadline=None)
@given(st.one_of(near_ids, st.text(max_size=30)))
def test_everything_we_accept_py_spiffe_accepts_identically(text: str) -> None:
    try:
        ours = parse_spiffe_id(text)
    except InvalidSpiffeIdError as exc:
        assert str(exc)  # refused, with a message; never another exception type
        return
    oracle = PySpiffeId(text)
    assert str(ours) == str(oracle) == text
    assert ours.path == oracle.path


DEFECTS = {
    "uppercase trust domain": lambda td, path: f"spiffe://{td.upper()}X{path}",
    "port": lambda td, path: f"spiffe://{td}:8443{path}",
    "userinfo": lambda td, path: f"spiffe://u@{td}{path}",
    "query": lambda td, path: f"spiffe://{td}{path}?q=1",
    "fragment": lambda td, path: f"spiffe://{td}{path}#f",
    "percent": lambda td, path: f"spiffe://{td}{path}/%2e",
    "empty segment": lambda td, path: f"spiffe://{td}{path}//x",
    "dot segment": lambda td, path: f"spiffe://{td}{path}/./x",
    "dot-dot segment": lambda td, path: f"spiffe://{td}/..{path}",
    "trailing slash": lambda td, path: f"spiffe://{td}{path}/",
    "bad path char": lambda td, path: f"spiffe://{td}{path}/a!b",
    "scheme": lambda td, path: f"spiffe:/{td}{path}",
    "uppercase scheme": lambda td, path: f"SPIFFE://{td}{path}",
}


@settings(max_examples=300, deadline=None)
@given(trust_domains, paths, st.sampled_from(sorted(DEFECTS)))
def test_generated_invalid_ids_are_refused(td: str, path: str, defect: str) -> None:
    text = DEFECTS[defect](td, path)
    with pytest.raises(InvalidSpiffeIdError):
        parse_spiffe_id(text)


def test_py_spiffe_is_more_lenient_where_we_refuse() -> None:
    """The reason pki has its own parser: py-spiffe lowercases the trust domain."""
    assert str(PySpiffeId("spiffe://Example.org/a")) == "spiffe://example.org/a"
    with pytest.raises(InvalidSpiffeIdError, match="lowercase"):
        parse_spiffe_id("spiffe://Example.org/a")


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        trust_domains,
        trust_domains.map(lambda td: "spiffe://" + td),
        st.text(NEAR, max_size=30),
        st.text(NEAR, max_size=30).map(lambda rest: "spiffe://" + rest),
    )
)
def test_trust_domains_we_accept_py_spiffe_accepts_identically(text: str) -> None:
    try:
        ours = parse_trust_domain(text)
    except InvalidSpiffeIdError:
        return
    assert ours.name == PyTrustDomain(text).name
    assert text in (ours.name, f"spiffe://{ours.name}")
