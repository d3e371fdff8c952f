"""The core is the front line against request smuggling: every ambiguous or malformed framing
is refused over a real TLS socket, the connection is closed, and a request hidden behind it
never reaches the handler. Each case sends its bytes followed by ``GET /smuggled``.

The parser does not depend on the event loop; these run on uvloop, the gateway's loop."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from h1_harness import Client, Pki, Server
from svidgate.gateway.http1 import BadBody, Limits
from svidgate.gateway.http1.chunked import ChunkedDecoder
from svidgate.gateway.http1.errors import HttpError
from svidgate.gateway.http1.parse import HeadParser, check_partial_head

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"
POST = b"POST /x HTTP/1.1\r\nHost: localhost\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n\r\n"


def get_with(header: bytes) -> bytes:
    return b"GET /x HTTP/1.1\r\nHost: localhost\r\n" + header + b"\r\n\r\n"


# Refused at the head: the handler never runs.
HEAD_CASES = {
    "cl_with_te": (
        POST + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
        400,
    ),
    "te_with_cl": (
        POST + b"Transfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n0\r\n\r\nG",
        400,
    ),
    "cl_twice_same": (POST + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\nG", 400),
    "cl_twice_different": (POST + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nGG", 400),
    "cl_plus_sign": (POST + b"Content-Length: +1\r\n\r\nG", 400),
    "cl_negative": (POST + b"Content-Length: -1\r\n\r\n", 400),
    "cl_trailing_junk": (POST + b"Content-Length: 1x\r\n\r\nG", 400),
    "cl_leading_junk": (POST + b"Content-Length: x1\r\n\r\nG", 400),
    "cl_hex": (POST + b"Content-Length: 0x1\r\n\r\nG", 400),
    "cl_list": (POST + b"Content-Length: 1, 1\r\n\r\nG", 400),
    "cl_inner_space": (POST + b"Content-Length: 1 1\r\n\r\nG", 400),
    "cl_empty": (POST + b"Content-Length: \r\n\r\n", 400),
    "cl_overflow": (POST + b"Content-Length: 99999999999999999999999\r\n\r\n", 400),
    "obs_fold": (get_with(b"X-A: a\r\n b"), 400),
    "obs_fold_te": (POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    "bare_lf_everywhere": (b"GET /x HTTP/1.1\nHost: localhost\n\n", 400),
    "bare_lf_in_a_header": (b"GET /x HTTP/1.1\r\nHost: localhost\nX-A: b\r\n\r\n", 400),
    "bare_cr_in_a_header": (b"GET /x HTTP/1.1\r\nHost: localhost\rX-A: b\r\n\r\n", 400),
    "te_chunked_not_last": (POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n", 400),
    "te_chunked_identity": (POST + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    "te_twice": (
        POST + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "te_unknown_coding": (POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", 400),
    "te_coding_before_chunked": (POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "te_space_before_colon": (POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "te_in_http10": (
        b"POST /x HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "http09": (b"GET /x\r\n\r\n", 400),
    "method_not_a_token": (b"G(T /x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "method_unknown": (b"FOO /x HTTP/1.1\r\nHost: localhost\r\n\r\n", 501),
    "space_in_header_name": (get_with(b"X A: b"), 400),
    "space_before_colon": (get_with(b"X-A : b"), 400),
    "empty_header_name": (get_with(b": b"), 400),
    "nul_in_header_value": (get_with(b"X-A: a\x00b"), 400),
    "nul_in_header_name": (get_with(b"X\x00A: b"), 400),
    "ctl_in_header_value": (get_with(b"X-A: a\x01b"), 400),
    "del_in_header_value": (get_with(b"X-A: a\x7fb"), 400),
    "nul_in_target": (b"GET /a\x00b HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "double_space_after_method": (b"GET  /x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "double_space_before_version": (b"GET /x  HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "space_after_version": (b"GET /x HTTP/1.1 \r\nHost: localhost\r\n\r\n", 400),
    "leading_space": (b" GET /x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "tab_separator": (b"GET\t/x HTTP/1.1\r\nHost: localhost\r\n\r\n", 400),
    "http_2_0_over_h1": (b"GET /x HTTP/2.0\r\nHost: localhost\r\n\r\n", 505),
    "http_1_2": (b"GET /x HTTP/1.2\r\nHost: localhost\r\n\r\n", 505),
    "http_0_9_line": (b"GET /x HTTP/0.9\r\nHost: localhost\r\n\r\n", 505),
    "version_lower_case": (b"GET /x http/1.1\r\nHost: localhost\r\n\r\n", 400),
    "version_two_digits": (b"GET /x HTTP/1.10\r\nHost: localhost\r\n\r\n", 400),
    "version_no_minor": (b"GET /x HTTP/1\r\nHost: localhost\r\n\r\n", 400),
    "duplicate_host": (b"GET /x HTTP/1.1\r\nHost: localhost\r\nHost: evil\r\n\r\n", 400),
}

# Refused in the body: the handler runs for /x (and sees a BadBody), never for /smuggled.
BODY_CASES = {
    "chunk_size_overflow": CHUNKED + b"1" + b"0" * 16 + b"\r\nx\r\n0\r\n\r\n",
    "chunk_size_negative": CHUNKED + b"-1\r\nx\r\n0\r\n\r\n",
    "chunk_size_0x": CHUNKED + b"0x1\r\nx\r\n0\r\n\r\n",
    "chunk_size_space_after": CHUNKED + b"1 \r\nx\r\n0\r\n\r\n",
    "chunk_size_space_before": CHUNKED + b" 1\r\nx\r\n0\r\n\r\n",
    "chunk_size_empty": CHUNKED + b"\r\nx\r\n0\r\n\r\n",
    "chunk_ext_control_byte": CHUNKED + b"1;a=\x01\r\nx\r\n0\r\n\r\n",
    "chunk_ext_without_name": CHUNKED + b"1;\r\nx\r\n0\r\n\r\n",
    "chunk_ext_bare_lf": CHUNKED + b"1;a\nb\r\nx\r\n0\r\n\r\n",
    "chunk_ext_unterminated_quote": CHUNKED + b'1;a="b\r\nx\r\n0\r\n\r\n',
    "chunk_data_without_crlf": CHUNKED + b"1\r\nxy0\r\n\r\n",
    "chunk_lines_bare_lf": CHUNKED + b"1\nx\n0\n\n",
    "chunk_size_bare_cr": CHUNKED + b"1\rx\r\n0\r\n\r\n",
    "trailer_obs_fold": CHUNKED + b"1\r\nx\r\n0\r\nX-T: a\r\n b\r\n\r\n",
    "trailer_bad_name": CHUNKED + b"1\r\nx\r\n0\r\nX T: a\r\n\r\n",
}

# Valid framings a strict parser must still accept (controls against over-refusal).
VALID_CASES = {
    "cl_trailing_ows": (POST + b"Content-Length: 1 \r\n\r\nG", "G"),
    "cl_leading_zeros": (POST + b"Content-Length: 001\r\n\r\nG", "G"),
    "te_tab_ows_and_case": (
        POST + b"Transfer-Encoding:\tChunked\r\n\r\n1\r\nG\r\n0\r\n\r\n",
        "G",
    ),
    "chunk_ext_quoted": (CHUNKED + b'1;a="b\\"c" ; d=e\r\nG\r\n0\r\n\r\n', "G"),
    "chunk_size_leading_zeros_hex": (CHUNKED + b"0A\r\n0123456789\r\n0\r\n\r\n", "0123456789"),
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.make(Path(tmp_path_factory.mktemp("pki")))


@pytest.fixture
def server(pki: Pki) -> Iterator[Server]:
    srv = Server(pki, Limits(header_timeout=2.0, body_timeout=2.0)).start()
    yield srv
    srv.stop()


def exchange_then_closed(server: Server, data: bytes) -> tuple[int | None, bool]:
    with Client(server.port, server.pki.client_context()) as c:
        resp = c.exchange(data)
        return (resp.status if resp else None), c.closed()


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_refused_at_the_head(server: Server, case: str) -> None:
    data, status = HEAD_CASES[case]
    assert exchange_then_closed(server, data + SMUGGLED) == (status, True)
    assert server.call(lambda: server.seen.paths) == []
    assert server.counters()["bad_requests"] == 1


@pytest.mark.parametrize("case", sorted(BODY_CASES))
def test_refused_in_the_body(server: Server, case: str) -> None:
    assert exchange_then_closed(server, BODY_CASES[case] + SMUGGLED) == (400, True)
    assert server.call(lambda: server.seen.paths) == ["/x"]
    assert ("/x", "BadBody") in server.call(lambda: list(server.seen.events))


@pytest.mark.parametrize("case", sorted(VALID_CASES))
def test_valid_framings_are_accepted(server: Server, case: str) -> None:
    data, body = VALID_CASES[case]
    with Client(server.port, server.pki.client_context()) as c:
        resp = c.exchange(data)
        assert resp is not None and resp.status == 200 and resp.json()["body"] == body
        nxt = c.exchange(b"GET /next HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert nxt is not None and nxt.json()["path"] == "/next"


# -- the same rules without sockets ---------------------------------------------------------


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_head_parser_refuses_the_head(case: str) -> None:
    data, status = HEAD_CASES[case]
    with pytest.raises(HttpError) as info:
        if b"\r\n\r\n" in data:
            HeadParser(100).parse(data.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n")
        else:  # a bare-LF head never completes: refused while it is still partial
            check_partial_head(data, 0)
    assert info.value.status == status


@pytest.mark.parametrize("case", sorted(BODY_CASES))
def test_chunked_decoder_refuses_the_body(case: str) -> None:
    body = BODY_CASES[case][len(CHUNKED) :]
    with pytest.raises(BadBody):
        ChunkedDecoder(1024).feed(body)
    decoder = ChunkedDecoder(1024)  # byte by byte: the same verdict
    with pytest.raises(BadBody):
        for i in range(len(body)):
            decoder.feed(body[i : i + 1])


def test_chunked_decoder_is_byte_exact_and_split_proof() -> None:
    body = b"3;x=y\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n"
    chunks, used = ChunkedDecoder(1024).feed(body + b"NEXT")
    assert (b"".join(chunks), used) == (b"abc0123456789abcdef", len(body))
    decoder, out, total = ChunkedDecoder(1024), b"", 0
    for i in range(len(body)):
        got, n = decoder.feed(body[i : i + 1])
        out, total = out + b"".join(got), total + n
    assert (out, total, decoder.done) == (b"abc0123456789abcdef", len(body), True)


def test_chunked_decoder_bounds_trailers_and_size_lines() -> None:
    with pytest.raises(BadBody, match="trailers_too_large"):
        ChunkedDecoder(64).feed(b"0\r\n" + b"X: " + b"a" * 100 + b"\r\n\r\n")
    with pytest.raises(BadBody, match="chunk_line_too_long"):
        ChunkedDecoder(64).feed(b"1;" + b"a" * 5000)
