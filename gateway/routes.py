"""Canonical request paths and the route table (built once per config load).

The canonical form decodes percent-escapes of unreserved characters only, upper-cases the hex
of the others, removes dot segments and collapses empty segments (``//``). Targets that could
mean different things to the gateway and to an upstream are refused (400): ``;``, ``\\``, NUL
(raw or encoded), encoded ``/``, fragments, raw non-ASCII or control bytes, bad escapes, and
escapes that do not decode to valid UTF-8. What was authorized is what gets forwarded.
A route with ``case_insensitive_prefix`` matches its prefix in any ASCII letter case (for
upstreams that read paths that way); every other comparison is byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from svidgate.gateway.config import GatewayConfig, JwtConfig, RouteConfig, RouteRateLimit
from svidgate.gateway.errors import BadRequest

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar minus '%' and ';' (handled separately) plus '/': what may appear raw in a path.
_RAW_OK = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,=:@/%]*$")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_FORBIDDEN_ESCAPES = frozenset({0x2F, 0x5C, 0x3B, 0x00})  # / \ ; NUL
_QUERY_OK = re.compile(r"^[\x21-\x7e]*$")


@dataclass(frozen=True, slots=True)
class Target:
    """A request target split into the canonical path (what policy sees) and the raw query."""

    path: str
    query: str | None  # None: no '?'; "" : a bare '?'

    def forward(self) -> str:
        """The exact target the upstream receives."""
        return self.path if self.query is None else f"{self.path}?{self.query}"


def _decode_escape(m: re.Match[str]) -> str:
    value = int(m.group(1), 16)
    if value in _FORBIDDEN_ESCAPES:
        raise BadRequest("bad_path", "encoded '/', '\\', ';' or NUL in the path")
    if value in _UNRESERVED:
        return chr(value)
    return "%" + m.group(1).upper()


def _remove_dot_segments(segments: list[str]) -> list[str]:
    out: list[str] = []
    for seg in segments:
        if seg == "..":
            if out:
                out.pop()
        elif seg not in (".", ""):
            out.append(seg)
    return out


def canonical_path(raw: str) -> str:
    """The canonical form of an origin-form path (no query); raises :class:`BadRequest`."""
    if not raw.startswith("/"):
        raise BadRequest("bad_path", "the path must start with '/'")
    if not _RAW_OK.fullmatch(raw):
        if ";" in raw or "\\" in raw or "\x00" in raw:
            raise BadRequest("bad_path", "';', '\\' or NUL in the path")
        raise BadRequest("bad_path", "characters outside RFC 3986 in the path")
    if "%" in raw:
        # Every '%' must start a valid escape, and the escapes must spell valid UTF-8.
        if raw.count("%") != len(_ESCAPE.findall(raw)):
            raise BadRequest("bad_path", "malformed percent-escape in the path")
        decoded = _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), raw).encode("latin-1")
        try:
            decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest("bad_path", "percent-escapes are not valid UTF-8") from None
        raw = _ESCAPE.sub(_decode_escape, raw)
    trailing = raw.endswith("/") or raw.endswith("/.") or raw.endswith("/..")
    segments = _remove_dot_segments(raw.split("/"))
    path = "/" + "/".join(segments)
    if trailing and segments:
        path += "/"
    return path


def parse_target(raw_target: str) -> Target:
    """Split and canonicalize an origin-form request target; raises :class:`BadRequest`."""
    if "#" in raw_target:
        raise BadRequest("bad_path", "fragment in the request target")
    path, sep, query = raw_target.partition("?")
    if sep and not _QUERY_OK.fullmatch(query):
        raise BadRequest("bad_query", "characters outside RFC 3986 in the query")
    return Target(canonical_path(path), query if sep else None)


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_fold(text: str) -> str:
    """ASCII case folding (``A``-``Z`` only): canonical paths and prefixes are ASCII, and no
    Unicode rule may make two different byte strings match."""
    return text.translate(_ASCII_LOWER)


@dataclass(frozen=True, slots=True)
class Route:
    """One configured route, ready for matching."""

    index: int
    name: str
    prefix: str
    methods: frozenset[str] | None
    upstream: str
    jwt: JwtConfig | None
    case_insensitive: bool = False  # the prefix matches in any ASCII letter case
    forward_authorization: bool = False  # no JWT: pass a client's Bearer token unverified
    max_body_bytes: int | None = None  # None: the listener's limits.max_body_bytes
    preserve_host: bool = False  # send the client's Host upstream (default: the upstream's)
    websocket: bool = False  # relay WebSocket upgrades
    rate_limit: RouteRateLimit | None = None  # the route's token bucket

    def allows_method(self, method: str) -> bool:
        return self.methods is None or method in self.methods

    @classmethod
    def from_config(
        cls, index: int, cfg: RouteConfig, *, case_insensitive_default: bool = False
    ) -> Route:
        ci = cfg.match.case_insensitive_prefix
        return cls(
            index=index,
            name=cfg.name,
            prefix=cfg.match.path_prefix,
            methods=frozenset(cfg.match.methods) if cfg.match.methods is not None else None,
            upstream=cfg.upstream,
            jwt=cfg.jwt if cfg.requires_jwt else None,
            case_insensitive=case_insensitive_default if ci is None else ci,
            forward_authorization=cfg.forward_authorization,
            max_body_bytes=cfg.max_body_bytes,
            preserve_host=cfg.preserve_host,
            websocket=cfg.websocket,
            rate_limit=cfg.rate_limit,
        )


@dataclass(frozen=True, slots=True)
class RouteMatch:
    route: Route
    method_allowed: bool


class RouteTable:
    """Routes grouped by prefix; the longest matching prefix wins, then config order.

    Case-sensitive routes are looked up by their prefix as written, case-insensitive ones by
    its ASCII-folded form; at each prefix length both groups count, in config order."""

    __slots__ = ("_by_folded", "_by_prefix", "routes")

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        by_prefix: dict[str, list[Route]] = {}
        by_folded: dict[str, list[Route]] = {}
        for route in routes:
            if route.case_insensitive:
                by_folded.setdefault(ascii_fold(route.prefix), []).append(route)
            else:
                by_prefix.setdefault(route.prefix, []).append(route)
        self._by_prefix = {p: tuple(rs) for p, rs in by_prefix.items()}
        self._by_folded = {p: tuple(rs) for p, rs in by_folded.items()}

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> RouteTable:
        default = cfg.routing.case_insensitive_prefix
        return cls(
            tuple(
                Route.from_config(i, r, case_insensitive_default=default)
                for i, r in enumerate(cfg.routes)
            )
        )

    def _group(self, prefix: str) -> tuple[Route, ...] | None:
        """The routes whose prefix is ``prefix``: as written, or ASCII-folded for the
        case-insensitive ones; merged in config order when both exist."""
        exact = self._by_prefix.get(prefix)
        if not self._by_folded:
            return exact
        folded = self._by_folded.get(ascii_fold(prefix))
        if folded is None or exact is None:
            return exact if folded is None else folded
        return tuple(sorted((*exact, *folded), key=lambda r: r.index))

    def match(self, path: str, method: str) -> RouteMatch | None:
        """The route for a canonical path: among the routes with the longest matching prefix,
        the first (in config order) that lists the method; else the first of them, flagged."""
        candidate = path
        while True:
            group = self._group(candidate or "/")
            if group is not None:
                for route in group:
                    if route.allows_method(method):
                        return RouteMatch(route, True)
                return RouteMatch(group[0], False)
            if not candidate or candidate == "/":
                return None
            candidate = candidate[: candidate.rfind("/")]
