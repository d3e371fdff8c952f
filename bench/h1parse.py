"""Per-request CPU of the two compiled HTTP/1.1 request parsers available here (not a test).

Both are llhttp underneath; what differs is the Python work around them. Each candidate
parses the request ``ab -k`` sends, again and again on one keep-alive parser, and produces
what the data plane needs from it (method, raw target, version, headers in order, framing,
keep-alive):

- ``httptools``: ``httptools.HttpRequestParser`` with callbacks that only collect (the shape
  of ``gateway.http1``'s parser adapter), names lower-cased once;
- ``aiohttp``: aiohttp's compiled ``HttpRequestParser`` (``feed_data`` → RawRequestMessage with
  a CIMultiDict and a yarl URL), paused after each message (``max_msg_queue_size=1``);
- ``core``: ``svidgate.gateway.http1.parse.HeadParser`` itself (request-line regex, httptools,
  framing checks, the frozen Request), i.e. what the new core really pays per head.

``python -m bench.h1parse [--n 200000] [--rounds 5]`` prints ns per request (best and median
of the rounds) for each. Run it pinned (``taskset -c 0``) on a quiet-ish machine.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Callable, Sequence

REQUEST = (
    b"GET /rbac HTTP/1.0\r\n"
    b"Connection: Keep-Alive\r\n"
    b"Host: 127.0.0.1:8443\r\n"
    b"User-Agent: ApacheBench/2.3\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)


def bench_httptools(n: int) -> float:
    import httptools

    class Collect:
        __slots__ = ("done", "headers", "url")

        def __init__(self) -> None:
            self.url = b""
            self.headers: list[tuple[bytes, bytes]] = []
            self.done: tuple[object, ...] | None = None

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name.lower(), value))

        def on_headers_complete(self) -> None:
            self.done = (
                parser.get_method(),
                self.url,
                parser.get_http_version(),
                tuple(self.headers),
                parser.should_keep_alive(),
            )

        def on_message_complete(self) -> None:
            self.url = b""
            self.headers = []

    sink = Collect()
    parser = httptools.HttpRequestParser(sink)
    feed = parser.feed_data
    data = REQUEST
    start = time.perf_counter()
    for _ in range(n):
        feed(data)
    return time.perf_counter() - start


def bench_aiohttp(n: int) -> float:
    from aiohttp._http_parser import HttpRequestParser

    class Proto:
        def pause_reading(self) -> None: ...
        def resume_reading(self) -> None: ...

    loop = asyncio.new_event_loop()
    parser = HttpRequestParser(
        Proto(), loop, 2**16, max_line_size=8190, max_field_size=8190, max_msg_queue_size=1
    )
    feed = parser.feed_data
    consumed = parser.message_consumed
    data = REQUEST
    start = time.perf_counter()
    for _ in range(n):
        messages, _upgraded, _tail = feed(data)
        msg = messages[0][0]
        _ = (msg.method, msg.path, msg.version, msg.raw_headers, msg.should_close, msg.chunked)
        consumed()
    elapsed = time.perf_counter() - start
    loop.close()
    return elapsed


def bench_core(n: int) -> float:
    from svidgate.gateway.http1.parse import HeadParser

    parse = HeadParser(100).parse
    data = REQUEST
    start = time.perf_counter()
    for _ in range(n):
        parse(data)
    return time.perf_counter() - start


CANDIDATES: dict[str, Callable[[int], float]] = {
    "httptools": bench_httptools,
    "aiohttp": bench_aiohttp,
    "core": bench_core,
}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.h1parse")
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--only", choices=sorted(CANDIDATES), action="append")
    args = p.parse_args(argv)
    names = args.only or list(CANDIDATES)
    results: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:  # interleaved, so machine noise spreads over every candidate
            results[name].append(CANDIDATES[name](args.n) / args.n * 1e9)
    for name in names:
        runs = results[name]
        print(f"{name:10s} best {min(runs):7.0f} ns/request  median {statistics.median(runs):7.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
