"""ApacheBench runs: one bounded ``ab`` invocation, pinned, parsed into numbers.

``ab -E client.pem`` presents a client certificate (wrk and hey cannot); without ``-k`` it
makes a full TLS handshake per request. Percentiles come from ``-e`` (CSV, microsecond
resolution) because the printed table is rounded to whole milliseconds. ``preload`` runs ab
under the TCP_NODELAY shim (bench/shim.py): without it, new TLS 1.3 connections wait on
delayed ACKs.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import shim
from bench.procs import BenchError, cpu_seconds, pinned

_FIELDS = {
    "complete": re.compile(r"^Complete requests:\s+(\d+)", re.M),
    "failed": re.compile(r"^Failed requests:\s+(\d+)", re.M),
    "non2xx": re.compile(r"^Non-2xx responses:\s+(\d+)", re.M),
    "keepalive": re.compile(r"^Keep-Alive requests:\s+(\d+)", re.M),
    "rps": re.compile(r"^Requests per second:\s+([\d.]+)", re.M),
    "elapsed": re.compile(r"^Time taken for tests:\s+([\d.]+)", re.M),
}
_TLS = re.compile(r"^SSL/TLS Protocol:\s+(\S+)", re.M)


@dataclass(frozen=True)
class AbResult:
    rps: float
    complete: int
    failed: int
    non2xx: int
    keepalive: int
    elapsed: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    tls: str
    server_cpu: float  # CPU seconds of the server processes per wall second (1.0 = one core)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AbSpec:
    """One load shape: concurrency and whether connections are kept alive."""

    name: str
    concurrency: int
    keepalive: bool


def run_ab(
    url: str,
    spec: AbSpec,
    *,
    seconds: float,
    max_requests: int,
    cpus: str,
    client_pem: Path | None = None,
    headers: tuple[str, ...] = (),
    server_pids: list[int] | None = None,
    preload: Path | None = None,
) -> AbResult:
    """Run one bounded ab and return its figures; raises BenchError if any request failed."""
    with tempfile.NamedTemporaryFile(suffix=".csv", delete=False) as tmp:
        csv_path = Path(tmp.name)
    cmd = ["ab", "-q", "-S", "-r", "-s", "10", "-c", str(spec.concurrency)]
    cmd += ["-t", str(max(1, round(seconds))), "-n", str(max_requests)]  # -n after -t wins
    if spec.keepalive:
        cmd.append("-k")
    if client_pem is not None:
        cmd += ["-E", str(client_pem)]
    for header in headers:
        cmd += ["-H", header]
    cmd += ["-e", str(csv_path), url]
    cpu0 = cpu_seconds(server_pids or [])
    try:
        proc = subprocess.run(
            pinned(cmd, cpus),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
            env=shim.env(preload),
        )
        cpu1 = cpu_seconds(server_pids or [])
        out = proc.stdout
        if proc.returncode != 0 or "Requests per second" not in out:
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise BenchError(f"ab {spec.name} {url} failed (exit {proc.returncode}): {err}")
        nums = {k: _num(rx, out) for k, rx in _FIELDS.items()}
        pct = _percentiles(csv_path)
    finally:
        csv_path.unlink(missing_ok=True)
    tls = m.group(1) if (m := _TLS.search(out)) else "plain"
    elapsed = nums["elapsed"] or 1e-9
    result = AbResult(
        rps=nums["rps"],
        complete=int(nums["complete"]),
        failed=int(nums["failed"]),
        non2xx=int(nums["non2xx"]),
        keepalive=int(nums["keepalive"]),
        elapsed=elapsed,
        p50_ms=pct[50],
        p90_ms=pct[90],
        p99_ms=pct[99],
        max_ms=pct[100],
        tls=tls,
        server_cpu=(cpu1 - cpu0) / elapsed,
    )
    check(result, spec, url)
    return result


def check(result: AbResult, spec: AbSpec, url: str) -> None:
    """A run that fails requests, silently drops keep-alive or stalls does not measure what it
    claims (fewer than 10 requests per keep-alive connection, 2 handshakes per new-connection
    slot)."""
    if result.complete < (10 if spec.keepalive else 2) * spec.concurrency:
        # Far below any working proxy: a hang, or the machine starved the server (see CPU).
        raise BenchError(
            f"ab {spec.name} {url}: only {result.complete} requests in {result.elapsed:.1f}s "
            f"(server CPU {result.server_cpu:.2f}): stalled"
        )
    if result.failed or result.non2xx:
        raise BenchError(
            f"ab {spec.name} {url}: {result.failed} failed and {result.non2xx} non-2xx "
            f"responses out of {result.complete}"
        )
    if spec.keepalive and result.keepalive < 0.9 * result.complete:
        raise BenchError(
            f"ab {spec.name} {url}: only {result.keepalive} of {result.complete} requests reused "
            "a connection (server closes keep-alive connections?)"
        )


def _num(rx: re.Pattern[str], text: str) -> float:
    m = rx.search(text)
    return float(m.group(1)) if m else 0.0


def _percentiles(path: Path) -> dict[int, float]:
    table: dict[int, float] = {}
    for line in path.read_text().splitlines()[1:]:
        pct, _, ms = line.partition(",")
        if pct.strip().isdigit():
            table[int(pct)] = float(ms)
    if not all(k in table for k in (50, 90, 99, 100)):
        raise BenchError(f"ab wrote no percentile table to {path}")
    return table
