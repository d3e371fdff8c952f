"""Memory under idle load: open N mTLS keep-alive connections, make one request on each, hold them.

Then read every server process's RSS and how many established connections it holds, found by
matching its socket fds against /proc/net/tcp (so per-worker figures need no help from the
server and show how SO_REUSEPORT spread the connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.procs import BenchError, comm, pss_bytes, rss_bytes

_ESTABLISHED = "01"
_LISTEN = "0A"


@dataclass(frozen=True)
class ProcMemory:
    pid: int
    cmd: str
    rss_idle_mb: float  # before the idle connections
    rss_loaded_mb: float  # while holding them
    pss_loaded_mb: float  # the same, shared pages split between the processes sharing them
    connections: int  # established connections this process holds on the port
    listening: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def client_context(cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(bundle))
    ctx.check_hostname = False  # the SVIDs name a SPIFFE ID; the chain is still verified
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _open_one(
    port: int, ctx: ssl.SSLContext, request: bytes, sem: asyncio.Semaphore
) -> asyncio.StreamWriter:
    async with sem:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx), timeout=30
        )
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
        status = head.split(b" ", 2)[1]
        if status != b"200":
            raise BenchError(f"idle connection got HTTP {status.decode()} instead of 200")
        length = 0
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
            elif name.strip().lower() == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), timeout=30)
        elif length:
            await asyncio.wait_for(reader.readexactly(length), timeout=30)
        return writer


@contextlib.asynccontextmanager
async def hold_connections(
    port: int,
    count: int,
    ctx: ssl.SSLContext,
    *,
    path: str,
    headers: Sequence[str] = (),
    parallel: int = 32,
) -> AsyncIterator[int]:
    """Open ``count`` keep-alive mTLS connections (one 200 request each), yield, close them."""
    extra = "".join(f"{h}\r\n" for h in headers)
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: keep-alive\r\n{extra}\r\n"
    ).encode()
    sem = asyncio.Semaphore(parallel)
    tasks = [asyncio.ensure_future(_open_one(port, ctx, request, sem)) for _ in range(count)]
    writers: list[asyncio.StreamWriter] = []
    try:
        done = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [d for d in done if isinstance(d, BaseException)]
        writers = [d for d in done if isinstance(d, asyncio.StreamWriter)]
        if errors:
            raise BenchError(
                f"{len(errors)} of {count} idle connections failed: {errors[0]!r}"
            ) from errors[0]
        yield len(writers)
    finally:
        for t in tasks:
            t.cancel()
        for w in writers:
            w.transport.abort()


def _socket_inodes(pid: int) -> set[str]:
    out: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return out
    for fd in entries:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[8:-1])
    return out


def _port_sockets(port: int) -> tuple[set[str], set[str]]:
    """Inodes of (established, listening) TCP sockets whose local port is ``port``."""
    established: set[str] = set()
    listening: set[str] = set()
    hexport = f"{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if cols[1].rsplit(":", 1)[1] != hexport:
                continue
            if cols[3] == _ESTABLISHED:
                established.add(cols[9])
            elif cols[3] == _LISTEN:
                listening.add(cols[9])
    return established, listening


def measure(pids: Sequence[int], port: int, idle_rss: dict[int, int]) -> list[ProcMemory]:
    established, listening = _port_sockets(port)
    out: list[ProcMemory] = []
    for pid in pids:
        inodes = _socket_inodes(pid)
        out.append(
            ProcMemory(
                pid=pid,
                cmd=comm(pid)[:120],
                rss_idle_mb=round(idle_rss.get(pid, 0) / 2**20, 1),
                rss_loaded_mb=round(rss_bytes(pid) / 2**20, 1),
                pss_loaded_mb=round(pss_bytes(pid) / 2**20, 1),
                connections=len(inodes & established),
                listening=bool(inodes & listening),
            )
        )
    return out


async def memory_under_idle(
    pids: Sequence[int],
    port: int,
    count: int,
    ctx: ssl.SSLContext,
    *,
    path: str,
    headers: Sequence[str] = (),
    settle: float = 1.0,
) -> list[ProcMemory]:
    idle = {pid: rss_bytes(pid) for pid in pids}
    async with hold_connections(port, count, ctx, path=path, headers=headers) as opened:
        if opened != count:
            raise BenchError(f"opened {opened} of {count} idle connections")
        await asyncio.sleep(settle)
        return measure(pids, port, idle)


def worker_summary(procs: Sequence[ProcMemory]) -> dict[str, Any]:
    """Workers are the processes that hold the idle connections (or listen on the port)."""
    workers = [p for p in procs if p.connections > 0] or [p for p in procs if p.listening]
    if not workers:
        raise BenchError("no server process holds the idle connections")
    return {
        "workers": len(workers),
        "connections": sum(p.connections for p in workers),
        "rss_per_worker_mb_max": max(p.rss_loaded_mb for p in workers),
        "rss_per_worker_mb_mean": round(sum(p.rss_loaded_mb for p in workers) / len(workers), 1),
        "rss_idle_per_worker_mb_max": max(p.rss_idle_mb for p in workers),
        "pss_per_worker_mb_max": max(p.pss_loaded_mb for p in workers),
        "rss_total_mb": round(sum(p.rss_loaded_mb for p in procs), 1),
        # Growth of the workers' RSS per held connection (OpenSSL + framework + app state).
        "kb_per_connection": round(
            sum(p.rss_loaded_mb - p.rss_idle_mb for p in workers)
            * 1024
            / max(1, sum(p.connections for p in workers)),
            1,
        ),
        "processes": [p.as_dict() for p in procs],
    }
