"""Request heads, strictly: the request line by a regular expression, the header section by
llhttp (httptools, no lenient flag set), then the framing headers once more here.

The connection frames each head itself (up to its CRLF CRLF) and each body itself (by
Content-Length, or :mod:`.chunked`), so llhttp is only ever given one complete head and never
reads into the next message: pipelined requests stay byte-exact. What llhttp lets through and
a proxy must not (extra spaces in the request line, HTTP/0.9, HTTP/2.0 over h1, a chunked
body in HTTP/1.0, codings other than ``chunked``) is refused here.
"""

from __future__ import annotations

import re

import httptools
from svidgate.gateway.http1.errors import (
    ExpectationFailed,
    HeadTooLarge,
    HttpError,
    MethodNotAllowed,
    NotImplementedByCore,
    ProtocolError,
    VersionNotSupported,
)
from svidgate.gateway.http1.message import Headers, Request

_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
# method SP request-target SP HTTP-version, nothing else (no extra or missing spaces).
_REQUEST_LINE = re.compile(rb"([" + _TCHAR + rb"]+) ([^\x00-\x20\x7f]+) HTTP/([0-9])\.([0-9])")
_BARE_LF = re.compile(rb"(?<!\r)\n")
_NEVER_PROXIED = frozenset({b"CONNECT", b"TRACE"})
_OWS = b" \t"
_HOST, _LENGTH, _CODING, _CONNECTION, _EXPECT = range(5)
_FRAMING = {
    b"host": _HOST,
    b"content-length": _LENGTH,
    b"transfer-encoding": _CODING,
    b"connection": _CONNECTION,
    b"expect": _EXPECT,
}
_MAX_LENGTH_DIGITS = 18  # below 2**63
_METHOD_NAMES: dict[bytes, str] = {}
# llhttp's error texts (never request bytes) → reason codes; first match wins.
_LLHTTP_REASONS = (
    ("Content-Length can't be present", "content_length_with_transfer_encoding"),
    ("Duplicate Content-Length", "duplicate_content_length"),
    ("Content-Length", "bad_content_length"),
    ("Transfer-Encoding", "bad_transfer_encoding"),
    ("header token", "bad_header_name"),
    ("header value char", "bad_header_value"),
    ("whitespace after header value", "obs_fold"),
    ("expected CR", "bare_lf"),
    ("expected LF", "bare_cr"),
)  # bounded: only methods llhttp accepted are added


class HeadParser:
    """Parses one request head at a time into a :class:`Request`; raises :class:`HttpError`."""

    __slots__ = ("_complete", "_error", "_headers", "_max_headers", "_parser")

    def __init__(self, max_headers: int) -> None:
        self._max_headers = max_headers
        self._parser: httptools.HttpRequestParser | None = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._complete = False
        self._error: HttpError | None = None

    def close(self) -> None:
        """Drop llhttp's parser (it holds this object's callbacks: a reference cycle)."""
        self._parser = None

    # -- httptools callbacks: they only collect --------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        headers = self._headers
        if len(headers) >= self._max_headers:
            self._error = HeadTooLarge("too_many_headers")
            raise self._error
        headers.append((name.lower(), value.rstrip(_OWS)))  # llhttp strips only leading OWS

    def on_headers_complete(self) -> None:
        self._complete = True

    # -- parsing ---------------------------------------------------------------------------------

    def parse(self, head: bytes | bytearray) -> Request:
        """``head``: exactly one request head, request line to blank line (CRLF CRLF)."""
        match = _REQUEST_LINE.fullmatch(head, 0, head.find(b"\r\n"))
        if match is None:
            raise ProtocolError("bad_request_line")
        method, target, major, minor = match.groups()
        version = (major[0] - 48, minor[0] - 48)
        if version not in ((1, 1), (1, 0)):
            raise VersionNotSupported("unsupported_http_version")
        if method in _NEVER_PROXIED:
            raise MethodNotAllowed("method_not_allowed")
        self._feed(head)
        try:
            request = _build(_method_name(method), target, version, tuple(self._headers))
        except HttpError:
            self._parser = None
            raise
        if request.has_body or not request.keep_alive:
            self._parser = None  # llhttp waits for a body we frame ourselves: start afresh
        return request

    def _feed(self, head: bytes | bytearray) -> None:
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpRequestParser(self)
        self._headers = []
        self._complete = False
        self._error = None
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            # Connection: upgrade + Upgrade: llhttp treats what follows as another protocol.
            # The head is complete and checked; the next head gets a fresh parser.
            self._parser = None
        except httptools.HttpParserError as exc:
            self._parser = None
            if self._error is not None:
                raise self._error from None
            if isinstance(exc, httptools.HttpParserInvalidMethodError):
                raise NotImplementedByCore("unknown_method") from None
            raise ProtocolError(_llhttp_reason(str(exc))) from None
        if not self._complete:
            self._parser = None
            raise ProtocolError("malformed_head")


def check_partial_head(buf: bytes, start: int) -> None:
    """Refuse an incomplete head early when it can never become valid: a bare LF, or a
    complete request line that is malformed (otherwise the client waits for the head timeout)."""
    if _BARE_LF.search(buf, start) is not None:
        raise ProtocolError("bare_lf")
    line_end = buf.find(b"\r\n", start)
    if line_end >= 0 and _REQUEST_LINE.fullmatch(buf, start, line_end) is None:
        raise ProtocolError("bad_request_line")


def _llhttp_reason(text: str) -> str:
    return next((reason for part, reason in _LLHTTP_REASONS if part in text), "malformed_head")


def _method_name(method: bytes) -> str:
    name = _METHOD_NAMES.get(method)
    if name is None:
        name = _METHOD_NAMES[method] = method.decode("ascii")
    return name


def _build(method: str, target: bytes, version: tuple[int, int], headers: Headers) -> Request:
    """The request from a head llhttp accepted, with the framing rules checked once more."""
    host: bytes | None = None
    hosts = 0
    length: bytes | None = None
    coding: bytes | None = None
    connection = b""
    expect: bytes | None = None
    for name, value in headers:
        kind = _FRAMING.get(name)
        if kind is None:
            continue
        if kind == _HOST:
            hosts += 1
            host = value
        elif kind == _LENGTH:
            if length is not None:
                raise ProtocolError("duplicate_content_length")
            length = value
        elif kind == _CODING:
            if coding is not None:
                raise ProtocolError("bad_transfer_encoding")
            coding = value
        elif kind == _CONNECTION:
            connection += b"," + value
        else:
            if expect is not None:
                raise ExpectationFailed("unsupported_expectation")
            expect = value
    if hosts != 1 and (hosts or version == (1, 1)):
        raise ProtocolError("duplicate_host" if hosts else "missing_host")
    content_length, chunked = _framing(length, coding, version)
    path, query = _split_target(_origin_form(target, host))
    expect_continue = expect is not None and _expect_continue(expect, version)
    return Request(
        method,
        target,
        path,
        query,
        version,
        headers,
        host,
        content_length,
        chunked,
        _keep_alive(connection, version),
        expect_continue and (chunked or bool(content_length)),
    )


def _framing(
    length: bytes | None, coding: bytes | None, version: tuple[int, int]
) -> tuple[int | None, bool]:
    """(Content-Length, chunked). Exactly one framing, digits only, ``chunked`` alone."""
    if coding is not None:
        if length is not None:
            raise ProtocolError("content_length_with_transfer_encoding")
        if version == (1, 0):
            raise ProtocolError("transfer_encoding_in_http10")
        codings = [c.strip(_OWS).lower() for c in coding.split(b",")]
        if codings[-1] != b"chunked" or b"chunked" in codings[:-1]:
            raise ProtocolError("bad_transfer_encoding")
        if len(codings) > 1:
            raise NotImplementedByCore("unsupported_transfer_coding")
        return None, True
    if length is None:
        return None, False
    if not length.isdigit() or len(length) > _MAX_LENGTH_DIGITS:
        raise ProtocolError("bad_content_length")
    return int(length), False


def _keep_alive(connection: bytes, version: tuple[int, int]) -> bool:
    if not connection:
        return version == (1, 1)
    tokens = connection.lower().split(b",")
    if len(tokens) == 2:  # one Connection header with one token: no set needed
        token = tokens[1].strip(_OWS)
        return token != b"close" and (version == (1, 1) or token == b"keep-alive")
    names = {t.strip(_OWS) for t in tokens}
    if b"close" in names:
        return False
    return version == (1, 1) or b"keep-alive" in names


def _expect_continue(expect: bytes, version: tuple[int, int]) -> bool:
    if expect.lower() != b"100-continue":
        raise ExpectationFailed("unsupported_expectation")
    return version == (1, 1)  # an HTTP/1.0 client does not wait for 100 (RFC 9110 10.1.1)


def _origin_form(target: bytes, host: bytes | None) -> bytes:
    """The origin-form of ``target``; an absolute-form target must name the Host it came with
    (the gateway routes on the path only: the authority may not say something else)."""
    if target[:1] == b"/":
        return target
    if target == b"*":
        raise ProtocolError("asterisk_form")
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise ProtocolError("bad_target")
    authority, slash, path = rest.partition(b"/")
    if not authority or host is None or authority.lower() != host.lower():
        raise ProtocolError("host_mismatch")
    return slash + path if slash else b"/"


def _split_target(origin: bytes) -> tuple[str, str | None]:
    path, sep, query = origin.partition(b"?")
    return path.decode("latin-1"), query.decode("latin-1") if sep else None
