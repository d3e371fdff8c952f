"""SPIFFE ID patterns: exact IDs, `*` for one segment, a final `**` for one or more."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from svidgate.pki.errors import InvalidPatternError, PkiError, UnauthorizedIdError
from svidgate.pki.matchers import IdMatcher, parse_id_pattern
from svidgate.pki.spiffe_id import parse_spiffe_id

CASES = [
    # (pattern, id, matches)
    ("spiffe://example.org/ns/a/sa/b", "spiffe://example.org/ns/a/sa/b", True),
    ("spiffe://example.org/ns/a/sa/b", "spiffe://example.org/ns/a/sa/c", False),
    ("spiffe://example.org/ns/a/sa/b", "spiffe://example.org/ns/a/sa/b/c", False),
    ("spiffe://example.org/ns/a/sa/b", "spiffe://example.org/ns/a/sa", False),
    ("spiffe://example.org/ns/a/sa/b", "spiffe://other.org/ns/a/sa/b", False),
    ("spiffe://example.org/ns/a/sa/b", "spiffe://example.org/NS/a/sa/b", False),  # case matters
    ("spiffe://example.org", "spiffe://example.org", True),
    ("spiffe://example.org", "spiffe://example.org/a", False),
    # `*` is exactly one segment
    ("spiffe://example.org/ns/*/sa/b", "spiffe://example.org/ns/x/sa/b", True),
    ("spiffe://example.org/ns/*/sa/b", "spiffe://example.org/ns/x/y/sa/b", False),
    ("spiffe://example.org/ns/*/sa/b", "spiffe://example.org/ns/sa/b", False),
    ("spiffe://example.org/ns/a/sa/*", "spiffe://example.org/ns/a/sa/anything", True),
    ("spiffe://example.org/ns/a/sa/*", "spiffe://example.org/ns/a/sa", False),
    ("spiffe://example.org/ns/a/sa/*", "spiffe://example.org/ns/a/sa/b/c", False),
    ("spiffe://example.org/*", "spiffe://example.org/a", True),
    ("spiffe://example.org/*", "spiffe://example.org", False),
    ("spiffe://example.org/*/*", "spiffe://example.org/a/b", True),
    ("spiffe://example.org/*/*", "spiffe://example.org/a", False),
    # final `**` is one or more segments
    ("spiffe://example.org/ns/a/**", "spiffe://example.org/ns/a/sa/b", True),
    ("spiffe://example.org/ns/a/**", "spiffe://example.org/ns/a/x", True),
    ("spiffe://example.org/ns/a/**", "spiffe://example.org/ns/a", False),
    ("spiffe://example.org/ns/a/**", "spiffe://example.org/ns/b/x", False),
    ("spiffe://example.org/ns/a/**", "spiffe://example.org/ns/ab/x", False),  # no prefix match
    ("spiffe://example.org/ns/*/**", "spiffe://example.org/ns/q/r/s", True),
    ("spiffe://example.org/ns/*/**", "spiffe://example.org/ns/q", False),
    # trust-domain membership
    ("spiffe://example.org/**", "spiffe://example.org/a", True),
    ("spiffe://example.org/**", "spiffe://example.org/a/b/c/d/e", True),
    ("spiffe://example.org/**", "spiffe://example.org", False),  # the TD ID is no workload
    ("spiffe://example.org/**", "spiffe://other.org/a", False),
    ("spiffe://example.org/**", "spiffe://example.org.evil/a", False),
    ("spiffe://example.org/**", "spiffe://sub.example.org/a", False),
]


@pytest.mark.parametrize(("pattern", "spiffe_id", "expected"), CASES)
def test_pattern_matches(pattern: str, spiffe_id: str, expected: bool) -> None:
    assert parse_id_pattern(pattern).matches(parse_spiffe_id(spiffe_id)) is expected


def test_pattern_keeps_the_operators_text() -> None:
    assert parse_id_pattern("spiffe://example.org/ns/*/**").text == "spiffe://example.org/ns/*/**"


INVALID = [
    ("", "empty"),
    ("*", "scheme must be 'spiffe://'"),
    ("example.org/**", "scheme must be 'spiffe://'"),
    ("spiffe://*/a", "trust domain cannot be a wildcard"),
    ("spiffe://*.example.org/a", "trust domain cannot be a wildcard"),
    ("spiffe://**", "trust domain cannot be a wildcard"),
    ("spiffe://example.org/**/a", "'**' may only be the last segment"),
    ("spiffe://example.org/**/**", "'**' may only be the last segment"),
    ("spiffe://example.org/a*", "partial wildcards"),
    ("spiffe://example.org/*a/b", "partial wildcards"),
    ("spiffe://example.org/***", "partial wildcards"),
    ("spiffe://Example.org/*", "lowercase"),
    ("spiffe://example.org/a/", "must not end with '/'"),
    ("spiffe://example.org//*", "empty segment"),
    ("spiffe://example.org/../*", "'..' segment"),
    ("spiffe://example.org/a?b", "query or fragment"),
    ("spiffe://example.org:1/*", "port"),
]


@pytest.mark.parametrize(("pattern", "fragment"), INVALID)
def test_invalid_patterns_are_refused(pattern: str, fragment: str) -> None:
    with pytest.raises(InvalidPatternError) as info:
        parse_id_pattern(pattern)
    assert fragment in str(info.value)
    if pattern:
        assert repr(pattern) in str(info.value)  # the message shows what the operator wrote


def test_matcher_reports_the_first_admitting_pattern() -> None:
    matcher = IdMatcher.parse(
        [
            "spiffe://example.org/ns/a/sa/b",
            "spiffe://example.org/ns/*/sa/b",
            "spiffe://example.org/**",
        ]
    )
    assert len(matcher.patterns) == 3
    assert matcher.authorize(parse_spiffe_id("spiffe://example.org/ns/a/sa/b")).text == (
        "spiffe://example.org/ns/a/sa/b"
    )
    assert matcher.authorize(parse_spiffe_id("spiffe://example.org/ns/z/sa/b")).text == (
        "spiffe://example.org/ns/*/sa/b"
    )
    assert matcher.authorize(parse_spiffe_id("spiffe://example.org/x")).text == (
        "spiffe://example.org/**"
    )
    assert matcher.match(parse_spiffe_id("spiffe://other.org/x")) is None


def test_authorize_raises_naming_the_id() -> None:
    matcher = IdMatcher.parse(["spiffe://example.org/ns/a/**"])
    with pytest.raises(UnauthorizedIdError, match=r"spiffe://example\.org/ns/b/x is not allowed"):
        matcher.authorize(parse_spiffe_id("spiffe://example.org/ns/b/x"))
    assert issubclass(UnauthorizedIdError, PkiError)


def test_empty_matcher_admits_nothing() -> None:
    matcher = IdMatcher.parse([])
    with pytest.raises(UnauthorizedIdError):
        matcher.authorize(parse_spiffe_id("spiffe://example.org/a"))


def test_one_bad_pattern_fails_the_whole_matcher() -> None:
    with pytest.raises(InvalidPatternError, match="partial"):
        IdMatcher.parse(["spiffe://example.org/a", "spiffe://example.org/b*"])


segment = st.text("abcXYZ019._-", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))


@settings(max_examples=200, deadline=None)
@given(st.lists(segment, min_size=1, max_size=6), st.data())
def test_wildcards_agree_with_a_reference_model(segs: list[str], data: st.DataObject) -> None:
    """Replace some segments of an ID by `*` (and maybe cut the tail to `**`): it still
    matches; a pattern for a different segment count or another trust domain never does."""
    spiffe_id = parse_spiffe_id("spiffe://example.org/" + "/".join(segs))
    stars = data.draw(st.lists(st.booleans(), min_size=len(segs), max_size=len(segs)))
    pattern_segs = ["*" if star else seg for seg, star in zip(segs, stars, strict=True)]
    cut = data.draw(st.integers(0, len(segs) - 1))
    assert parse_id_pattern("spiffe://example.org/" + "/".join(pattern_segs)).matches(spiffe_id)
    rest = parse_id_pattern("spiffe://example.org/" + "/".join([*pattern_segs[:cut], "**"]))
    assert rest.matches(spiffe_id)
    longer = parse_id_pattern("spiffe://example.org/" + "/".join([*pattern_segs, "*"]))
    assert not longer.matches(spiffe_id)
    other = parse_id_pattern("spiffe://example.com/" + "/".join(pattern_segs))
    assert not other.matches(spiffe_id)
