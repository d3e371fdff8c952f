"""The HTTP/2 core's pure parts without sockets: request validation (RFC 9113 §8) and the
flood meters."""

from __future__ import annotations

import pytest
from svidgate.gateway.http1.errors import HeadTooLarge, MethodNotAllowed
from svidgate.gateway.http2.abuse import BUDGETS, Budget, Flood, FloodGuard, FloodMeter
from svidgate.gateway.http2.validate import MalformedRequest, parse_request

BASE = [
    (b":method", b"POST"),
    (b":scheme", b"https"),
    (b":authority", b"api.example:8443"),
    (b":path", b"/svc.S/M?x=1"),
]


def _parse(
    extra: list[tuple[bytes, bytes]], *, base: list[tuple[bytes, bytes]] = BASE, end: bool = False
):
    return parse_request([*base, *extra], end_stream=end, max_headers=10)


def test_a_request_in_the_cores_shape() -> None:
    req = _parse([(b"content-type", b"application/grpc"), (b"te", b"trailers")])
    assert (req.method, req.path, req.query, req.version) == ("POST", "/svc.S/M", "x=1", (2, 0))
    assert req.host == b"api.example:8443"
    assert req.header(b"host") == b"api.example:8443"  # Host from :authority
    assert req.chunked and req.has_body and req.content_length is None
    assert req.header(b"te") == b"trailers"


def test_no_body_when_headers_end_the_stream() -> None:
    req = _parse([], end=True)
    assert not req.has_body


def test_content_length_is_kept_and_checked() -> None:
    assert _parse([(b"content-length", b"12")]).content_length == 12
    with pytest.raises(MalformedRequest, match="content_length_mismatch"):
        _parse([(b"content-length", b"12")], end=True)
    with pytest.raises(MalformedRequest, match="conflicting_content_length"):
        _parse([(b"content-length", b"1"), (b"content-length", b"2")])
    with pytest.raises(MalformedRequest, match="bad_content_length"):
        _parse([(b"content-length", b"-1")])


def test_cookie_crumbs_are_joined() -> None:
    req = _parse([(b"cookie", b"a=1"), (b"x-a", b"v"), (b"cookie", b"b=2")])
    assert req.header_values(b"cookie") == [b"a=1; b=2"]


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ([(b"connection", b"close")], "connection_specific_header"),
        ([(b"keep-alive", b"5")], "connection_specific_header"),
        ([(b"proxy-connection", b"x")], "connection_specific_header"),
        ([(b"transfer-encoding", b"chunked")], "connection_specific_header"),
        ([(b"upgrade", b"h2c")], "connection_specific_header"),
        ([(b"te", b"trailers, deflate")], "bad_te"),
        ([(b"Content-Type", b"x")], "bad_header_name"),
        ([(b"x a", b"x")], "bad_header_name"),
        ([(b"x-a", b"a\r\nb")], "bad_header_value"),
        ([(b"x-a", b"a\x00")], "bad_header_value"),
        ([(b"x-a", b"trailing ")], "bad_header_value"),
        ([(b"host", b"other.example")], "authority_host_mismatch"),
        ([(b":path", b"/again")], "pseudo_header_after_regular"),
    ],
)
def test_malformed(extra: list[tuple[bytes, bytes]], reason: str) -> None:
    with pytest.raises(MalformedRequest, match=reason):
        _parse([(b"x-first", b"1"), *extra] if extra[0][0] == b":path" else extra)


@pytest.mark.parametrize(
    ("base", "reason"),
    [
        (BASE[1:], "missing_method"),
        ([BASE[0], BASE[2], BASE[3]], "missing_pseudo_header"),
        (BASE[:3], "missing_pseudo_header"),
        ([BASE[0], (b":scheme", b"http"), *BASE[2:]], "bad_scheme"),
        ([*BASE[:3], (b":path", b"relative")], "bad_path"),
        ([*BASE[:3], (b":path", b"/a b")], "bad_path"),
        ([*BASE[:3], (b":path", b"/a#frag")], "bad_path"),
        ([*BASE, (b":path", b"/other")], "duplicate_pseudo_header"),
        ([*BASE, (b":protocol", b"websocket")], "unknown_pseudo_header"),
        ([BASE[0], BASE[1], BASE[3]], "missing_authority"),
        ([BASE[0], BASE[1], (b":authority", b"user@host"), BASE[3]], "bad_authority"),
        ([(b":method", b"G ET"), *BASE[1:]], "bad_method"),
    ],
)
def test_bad_pseudo_headers(base: list[tuple[bytes, bytes]], reason: str) -> None:
    with pytest.raises(MalformedRequest, match=reason):
        _parse([], base=base)


def test_host_alone_is_the_authority() -> None:
    req = _parse([(b"host", b"h.example")], base=[BASE[0], BASE[1], BASE[3]])
    assert req.host == b"h.example"


def test_connect_and_trace_are_405_and_too_many_headers_431() -> None:
    with pytest.raises(MethodNotAllowed):
        _parse([], base=[(b":method", b"TRACE"), *BASE[1:]])
    with pytest.raises(HeadTooLarge):
        _parse([(b"x-%d" % n, b"v") for n in range(11)])


def test_flood_meter_burst_then_rate() -> None:
    meter = FloodMeter(Budget(burst=3, rate=2), now=0.0)
    assert [meter.hit(0.0) for _ in range(4)] == [True, True, True, False]
    assert meter.hit(1.0)  # refilled at 2/s (one token was owed)
    assert not meter.hit(1.0)  # and spent again


def test_every_flood_kind_has_a_budget() -> None:
    guard = FloodGuard(now=0.0)
    for kind in Flood:
        budget = BUDGETS[kind]
        hits = [guard.hit(kind, 0.0) for _ in range(int(budget.burst) + 1)]
        assert all(hits[:-1]) and not hits[-1], kind
    # a steady, legitimate rate never trips
    steady = FloodGuard(now=0.0)
    assert all(steady.hit(Flood.PING, t / 10) for t in range(1000))  # 10 per second


def test_grpc_timeout_header() -> None:
    from svidgate.gateway.proxy_h2 import grpc_timeout

    assert grpc_timeout("1S") == 1.0
    assert grpc_timeout("250m") == 0.25
    assert grpc_timeout("2H") == 7200.0
    assert grpc_timeout("99999999n") == pytest.approx(0.099999999)
    for bad in (None, "", "S", "1", "1s", "-1S", "123456789S", "1.5S"):
        assert grpc_timeout(bad) is None, bad


def test_window_updates_answering_sent_data_are_not_a_flood() -> None:
    guard = FloodGuard(now=0.0)
    burst = int(BUDGETS[Flood.WINDOW_UPDATE].burst)
    for _ in range(10 * burst):  # a gRPC client: a stream and a connection update per message
        guard.sent_data()
        assert guard.hit(Flood.WINDOW_UPDATE, 0.0) and guard.hit(Flood.WINDOW_UPDATE, 0.0)
    # unearned updates are metered as before
    assert all(guard.hit(Flood.WINDOW_UPDATE, 0.0) for _ in range(burst))
    assert not guard.hit(Flood.WINDOW_UPDATE, 0.0)
