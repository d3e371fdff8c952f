"""Memory under a flood of stalled partial TLS handshakes (issue 11: "RSS during 6,000 stalled
partial handshakes (no client cert)").

A load client opens ``count`` TCP connections to the server (``parallel`` connects in flight),
sends one TLS 1.3 ClientHello on each (made once, without a client certificate, by a real
``ssl`` client: the server does its whole first flight — key share, certificate, signature —
for every one), then never answers: each stays a half-open handshake until the server gives
up (the gateway's ``limits.handshake_timeout``, 5 s by default) or the flood ends. Meanwhile
the RSS of every server process is sampled every ``interval`` seconds; after the flood every
socket is closed and the RSS is read again ``settle`` seconds later.

What shapes the figures: the gateway resets connections beyond ``limits.max_connections``
(4,096 per worker by default) at accept, before any TLS byte, and closes a handshake that is
not finished within ``handshake_timeout``; so a worker holds at most ``max_connections``
partial handshakes whatever the flood's size. The client reports how many connections the
server accepted (its first flight came back), reset, or closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.procs import rss_bytes

MB = 2**20


@dataclass
class FloodResult:
    connections: int  # attempted
    answered: int  # the server sent its first flight back (a handshake it was holding)
    held_max: int  # the most handshakes the server held at once (answered, not yet closed)
    refused: int  # reset/refused before any TLS byte (over max_connections, backlog full)
    connect_failed: int  # connect itself failed or timed out (listen backlog)
    closed_by_server: int  # the server closed a held handshake (handshake timeout) in the window
    seconds: float  # from the first connect to the last socket closed
    rss_before_mb: dict[int, float]
    rss_peak_mb: dict[int, float]
    rss_after_mb: dict[int, float]  # ``settle`` seconds after the last socket closed
    settle_seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def worst(self) -> dict[str, float]:
        """The figures of the process with the highest peak (the worker that held most)."""
        pid = max(self.rss_peak_mb, key=lambda p: self.rss_peak_mb[p])
        return {
            "pid": pid,
            "rss_before_mb": self.rss_before_mb[pid],
            "rss_peak_mb": self.rss_peak_mb[pid],
            "rss_after_mb": self.rss_after_mb[pid],
        }


def client_hello() -> bytes:
    """One TLS 1.3 ClientHello (no client certificate configured), as a real client sends it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = outgoing.read()
    if not hello:
        raise RuntimeError("the ssl module produced no ClientHello")
    return hello


class _Counts:
    def __init__(self, count: int) -> None:
        self.count = count
        self.all_attempted = asyncio.Event()
        self.answered = 0
        self.refused = 0
        self.connect_failed = 0
        self.closed_by_server = 0
        self.attempted = 0  # connects finished (sent their ClientHello, or failed)
        self.held = 0  # answered by the server and not closed yet
        self.held_max = 0


async def _one(
    port: int, hello: bytes, sem: asyncio.Semaphore, stop: asyncio.Event, counts: _Counts
) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    first = True
    try:
        async with sem:
            try:
                await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 10)
                await loop.sock_sendall(sock, hello)
            except (OSError, TimeoutError):
                counts.connect_failed += 1
                return
            finally:
                counts.attempted += 1
                if counts.attempted == counts.count:
                    counts.all_attempted.set()
        # Hold: read the server's first flight, then wait for its close or the flood's end.
        while not stop.is_set():
            reader = asyncio.ensure_future(loop.sock_recv(sock, 65536))
            stopper = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader not in done:
                reader.cancel()
                return
            stopper.cancel()
            try:
                data = reader.result()
            except OSError:  # reset
                data = b""
            if not data:
                if first:
                    counts.refused += 1
                else:
                    counts.closed_by_server += 1
                return
            if first:
                counts.answered += 1
                counts.held += 1
                counts.held_max = max(counts.held_max, counts.held)
                first = False
    finally:
        if not first:
            counts.held -= 1
        sock.close()


async def _sample(
    pids: Sequence[int], interval: float, stop: asyncio.Event, peak: dict[int, float]
) -> None:
    while True:
        for pid in pids:
            with contextlib.suppress(OSError):
                peak[pid] = max(peak.get(pid, 0.0), rss_bytes(pid) / MB)
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def flood(
    pids: Sequence[int],
    port: int,
    *,
    count: int = 6000,
    hold: float = 8.0,
    parallel: int = 256,
    interval: float = 0.1,
    settle: float = 10.0,
    settle_before: float = 4.0,
) -> FloodResult:
    """Open ``count`` stalled handshakes; the flood lasts until every connect is done plus
    ``hold`` seconds (bounded: at most ``count`` sockets, at most ``hold`` + connects + 10 s)."""
    hello = client_hello()
    # What ran just before (the idle-connection probe) may still be handing memory back (the
    # gateway trims its heap 2 s after a burst ends): read the level once that is done.
    await asyncio.sleep(settle_before)
    before = {pid: rss_bytes(pid) / MB for pid in pids}
    peak: dict[int, float] = dict(before)
    counts = _Counts(count)
    stop = asyncio.Event()
    sampler_stop = asyncio.Event()
    sampler = asyncio.ensure_future(_sample(pids, interval, sampler_stop, peak))
    sem = asyncio.Semaphore(parallel)
    started = time.monotonic()
    tasks = [asyncio.ensure_future(_one(port, hello, sem, stop, counts)) for _ in range(count)]
    # Every connect attempted (bounded), then the stalled ones are held a while.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(counts.all_attempted.wait(), 60)
    await asyncio.sleep(hold)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    seconds = time.monotonic() - started
    await asyncio.sleep(settle)
    sampler_stop.set()
    await sampler
    after = {pid: rss_bytes(pid) / MB for pid in pids}
    return FloodResult(
        connections=count,
        answered=counts.answered,
        held_max=counts.held_max,
        refused=counts.refused,
        connect_failed=counts.connect_failed,
        closed_by_server=counts.closed_by_server,
        seconds=round(seconds, 1),
        rss_before_mb={p: round(v, 1) for p, v in before.items()},
        rss_peak_mb={p: round(v, 1) for p, v in peak.items()},
        rss_after_mb={p: round(v, 1) for p, v in after.items()},
        settle_seconds=settle,
    )
