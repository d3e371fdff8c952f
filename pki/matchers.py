"""SPIFFE ID patterns for authorization.

A pattern is a SPIFFE ID whose path segments may be ``*`` (exactly one segment) or, as the last
segment, ``**`` (one or more segments). ``spiffe://td/**`` therefore admits every workload of
the trust domain ``td`` but not the trust domain ID itself. Trust domains never take wildcards.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from svidgate.pki.errors import InvalidPatternError, InvalidSpiffeIdError, UnauthorizedIdError
from svidgate.pki.spiffe_id import SpiffeId, parse_spiffe_id

ONE_SEGMENT = "*"
REST = "**"


@dataclass(frozen=True, slots=True)
class IdPattern:
    """One compiled pattern; ``text`` is what the operator wrote."""

    text: str
    trust_domain: str
    segments: tuple[str, ...]

    @property
    def has_rest(self) -> bool:
        return bool(self.segments) and self.segments[-1] == REST

    def matches(self, spiffe_id: SpiffeId) -> bool:
        """True when ``spiffe_id`` is admitted by this pattern."""
        if spiffe_id.trust_domain.name != self.trust_domain:
            return False
        got = spiffe_id.segments
        want = self.segments
        if self.has_rest:
            fixed = want[:-1]
            if len(got) <= len(fixed):
                return False
        elif len(got) != len(want):
            return False
        else:
            fixed = want
        return all(w in (ONE_SEGMENT, g) for w, g in zip(fixed, got, strict=False))


def parse_id_pattern(text: str) -> IdPattern:
    """Compile a pattern; raises :class:`InvalidPatternError` naming what is wrong."""
    if not isinstance(text, str) or not text:
        raise InvalidPatternError("SPIFFE ID pattern is empty")
    # Replace wildcard segments by a placeholder so the rest is checked by the ID parser.
    head, sep, path = text.partition("://")
    slash = path.find("/")
    raw_segments = path[slash + 1 :].split("/") if slash >= 0 else []
    placeholder = [("x" if seg in (ONE_SEGMENT, REST) else seg) for seg in raw_segments]
    candidate = f"{head}{sep}{path[:slash] if slash >= 0 else path}"
    if placeholder:
        candidate += "/" + "/".join(placeholder)
    for i, seg in enumerate(raw_segments):
        if seg == REST and i != len(raw_segments) - 1:
            raise InvalidPatternError(f"{text!r}: '**' may only be the last segment")
        if seg not in (ONE_SEGMENT, REST) and "*" in seg:
            raise InvalidPatternError(
                f"{text!r}: '*' must be a whole segment (partial wildcards are not supported)"
            )
    if "*" in (path[:slash] if slash >= 0 else path):
        raise InvalidPatternError(f"{text!r}: the trust domain cannot be a wildcard")
    try:
        parsed = parse_spiffe_id(candidate)
    except InvalidSpiffeIdError as exc:
        reason = str(exc).replace(repr(candidate), repr(text))
        raise InvalidPatternError(f"invalid SPIFFE ID pattern: {reason}") from None
    return IdPattern(text, parsed.trust_domain.name, tuple(raw_segments))


class IdMatcher:
    """Any-of: admits an ID when one of its patterns does, reporting which one."""

    __slots__ = ("patterns",)

    def __init__(self, patterns: Iterable[IdPattern]) -> None:
        self.patterns: tuple[IdPattern, ...] = tuple(patterns)

    @classmethod
    def parse(cls, patterns: Iterable[str]) -> IdMatcher:
        return cls(parse_id_pattern(p) for p in patterns)

    def match(self, spiffe_id: SpiffeId) -> IdPattern | None:
        """The first pattern that admits ``spiffe_id``, or None."""
        for pattern in self.patterns:
            if pattern.matches(spiffe_id):
                return pattern
        return None

    def authorize(self, spiffe_id: SpiffeId) -> IdPattern:
        """Return the admitting pattern or raise :class:`UnauthorizedIdError`."""
        pattern = self.match(spiffe_id)
        if pattern is None:
            raise UnauthorizedIdError(f"{spiffe_id} is not allowed")
        return pattern

    def __repr__(self) -> str:
        return f"IdMatcher({[p.text for p in self.patterns]!r})"
