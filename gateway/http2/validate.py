"""An HTTP/2 request header block → the core's :class:`Request`, strictly (RFC 9113 §8).

A pure function over the decoded header list (h2's own inbound validation is off: its
failures are connection errors, while a malformed request is a *stream* error). What makes a
request malformed — connection-specific headers, ``te`` other than ``trailers``, upper-case or
invalid names, bad values, missing, repeated, unknown or misplaced pseudo-headers, an
``:authority`` that disagrees with ``host``, a bad ``content-length`` — raises
:class:`MalformedRequest`; the connection resets the stream (PROTOCOL_ERROR) and nothing is
forwarded. CONNECT and TRACE are refused like on HTTP/1.1 (405).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from svidgate.gateway.http1.errors import HeadTooLarge, MethodNotAllowed
from svidgate.gateway.http1.message import Request

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(rb"[\x00\r\n]|^[ \t]|[ \t]$")
_PATH = re.compile(rb"/[^\x00-\x20\x7f#]*")
_AUTHORITY = re.compile(rb"[A-Za-z0-9\-._~%!$&'()*+,;=:\[\]]+")
_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_NEVER_PROXIED = frozenset({b"CONNECT", b"TRACE"})
_MAX_LENGTH_DIGITS = 18
H2_VERSION = (2, 0)


class MalformedRequest(Exception):
    """A malformed request (RFC 9113 §8.1.1): the stream is reset, never forwarded."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def parse_request(
    block: Iterable[tuple[bytes, bytes]], *, end_stream: bool, max_headers: int
) -> Request:
    """The request of one HEADERS block (names as received, values as decoded by HPACK).

    ``end_stream``: the block ended the stream (no body). Raises :class:`MalformedRequest`,
    :class:`HeadTooLarge` (more than ``max_headers`` fields: 431) or
    :class:`MethodNotAllowed` (CONNECT / TRACE: 405)."""
    pseudo: dict[bytes, bytes] = {}
    headers: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    lengths: set[bytes] = set()
    for name, value in block:
        if name[:1] == b":":
            _pseudo(pseudo, name, value, regular_seen=bool(headers or cookies))
            continue
        _check_field(name, value)
        if name == b"cookie":
            cookies.append(value)  # RFC 9113 §8.2.3: crumbs are joined for HTTP/1.1
            continue
        if name == b"content-length":
            lengths.add(value)
        headers.append((name, value))
        if len(headers) > max_headers:
            raise HeadTooLarge("too_many_headers")
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    method = pseudo.get(b":method")
    if method is None or _METHOD.fullmatch(method) is None:
        raise MalformedRequest("missing_method" if method is None else "bad_method")
    if method in _NEVER_PROXIED:
        raise MethodNotAllowed("method_not_allowed")
    scheme, path = pseudo.get(b":scheme"), pseudo.get(b":path")
    if scheme is None or path is None:
        raise MalformedRequest("missing_pseudo_header")
    if scheme != b"https":
        raise MalformedRequest("bad_scheme")
    if _PATH.fullmatch(path) is None:
        raise MalformedRequest("bad_path")
    host = _authority(pseudo.get(b":authority"), headers)
    if not any(name == b"host" for name, _ in headers):
        headers.append((b"host", host))  # the pipeline reads Host, as on HTTP/1.1
    length = _content_length(lengths)
    if end_stream and length:
        raise MalformedRequest("content_length_mismatch")
    target_path, sep, query = path.partition(b"?")
    return Request(
        method.decode("ascii"),
        path,
        target_path.decode("latin-1"),
        query.decode("latin-1") if sep else None,
        H2_VERSION,
        tuple(headers),
        host,
        length,
        not end_stream and length is None,  # a body without a declared length
        True,
        False,
    )


def _pseudo(pseudo: dict[bytes, bytes], name: bytes, value: bytes, *, regular_seen: bool) -> None:
    if regular_seen:
        raise MalformedRequest("pseudo_header_after_regular")
    if name not in _PSEUDO:
        raise MalformedRequest("unknown_pseudo_header")
    if name in pseudo:
        raise MalformedRequest("duplicate_pseudo_header")
    if _BAD_VALUE.search(value) is not None or not value:
        raise MalformedRequest("bad_pseudo_header_value")
    pseudo[name] = value


def _check_field(name: bytes, value: bytes) -> None:
    if _TOKEN.fullmatch(name) is None:
        raise MalformedRequest("bad_header_name")  # upper case included (§8.2.1)
    if name in _CONNECTION_SPECIFIC:
        raise MalformedRequest("connection_specific_header")
    if name == b"te" and value != b"trailers":
        raise MalformedRequest("bad_te")
    if name == b"host" and not value:
        raise MalformedRequest("bad_host")
    if value and _BAD_VALUE.search(value) is not None:
        raise MalformedRequest("bad_header_value")


def _authority(authority: bytes | None, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request's host: ``:authority``, or ``host``; both present must agree (§8.3.1)."""
    hosts = [value for name, value in headers if name == b"host"]
    if len(hosts) > 1:
        raise MalformedRequest("duplicate_host")
    host = hosts[0] if hosts else None
    if authority is not None:
        if b"@" in authority or _AUTHORITY.fullmatch(authority) is None:
            raise MalformedRequest("bad_authority")
        if host is not None and host.lower() != authority.lower():
            raise MalformedRequest("authority_host_mismatch")
        return authority
    if host is None:
        raise MalformedRequest("missing_authority")
    return host


def _content_length(lengths: set[bytes]) -> int | None:
    if not lengths:
        return None
    if len(lengths) > 1:
        raise MalformedRequest("conflicting_content_length")
    (value,) = lengths
    if not value.isdigit() or len(value) > _MAX_LENGTH_DIGITS:
        raise MalformedRequest("bad_content_length")
    return int(value)
