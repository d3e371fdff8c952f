"""Profile the gateway under ab load with py-spy and print where its CPU goes.

    .venv/bin/python -m bench.profile --route jwt-remote --seconds 15 [--native] [--new]

Starts the same throwaway stack as bench/run (pki, upstream nginx, signer, gateway; one worker
by default so one process holds the whole profile), drives one route with ab from the client
cores, samples every gateway process (and the signer) with ``py-spy record --format raw``, and
summarizes the collapsed stacks: self and inclusive share per function and per area
(TLS, HTTP server, upstream client, JWT/signer, policy, logging, event loop).
Needs py-spy (``pip install py-spy``; not a project dependency).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from bench import nginx, shim
from bench.harness import ROOT, cpu_list
from bench.procs import (
    BenchError,
    cpu_seconds,
    exclusive_run,
    free_port,
    pinned,
    raise_nofile,
)
from bench.stack import ROUTES, make_pki, start_stack

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")

# Ordered: the first area whose pattern matches a frame's file or function claims it.
AREAS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("access/audit logging", re.compile(r"logging/|gateway/(audit|log)|json/encoder")),
    (
        "JWT / signer client",
        re.compile(r"gateway/signer_client|pki/(jwt_svid|jose)|jwt/|grpc|svidgate/signer"),
    ),
    ("policy / routes / identity", re.compile(r"gateway/(policy|routes|identity|headers)|pki/")),
    (
        "upstream client (aiohttp client / gateway upstream_client)",
        re.compile(r"aiohttp/(client|connector|streams)|gateway/upstream_client"),
    ),
    ("gateway proxy code", re.compile(r"gateway/")),
    ("HTTP server (aiohttp web)", re.compile(r"aiohttp/")),
    ("TLS (ssl / OpenSSL)", re.compile(r"ssl\.py|libssl|libcrypto|_ssl")),
    ("event loop (asyncio/uvloop)", re.compile(r"asyncio/|uvloop|selectors")),
)


# Inclusive markers: share of busy samples whose stack contains a matching frame.
MARKERS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("TLS handshake (SSLObject.do_handshake)", re.compile(r"do_handshake")),
    ("OpenSSL (libssl/libcrypto, --native only)", re.compile(r"libssl|libcrypto")),
    ("per-connection SVID re-verification", re.compile(r"verify_x509_svid|verify_peer \(")),
    (
        "upstream leg (aiohttp client or upstream_client)",
        re.compile(r"aiohttp/(client|connector)|gateway/upstream_client"),
    ),
    ("response relay to the client", re.compile(r"Upstream\._relay")),
    ("JWT verification (local, pki.jwt_svid)", re.compile(r"verify_jwt_svid|jwt/algorithms")),
    ("JWT cache lookup", re.compile(r"cache_key|_cache")),
    ("signer gRPC", re.compile(r"grpc")),
    ("logging (audit/access/error)", re.compile(r"logging/__init__|_audit|emit \(gateway")),
    ("prometheus metrics", re.compile(r"prometheus_client")),
    ("identity header building", re.compile(r"gateway/headers")),
    ("yarl URL / multidict", re.compile(r"yarl|multidict")),
    ("route match / policy", re.compile(r"gateway/(routes|policy)|pki/matchers")),
    ("write syscalls (--native only)", re.compile(r"write \(libc")),
)


def parse_frame(frame: str) -> tuple[str, str]:
    """(function, file) of one py-spy frame ``func (path/file.py:123)`` or ``0x… (lib.so)``."""
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), ""
    return m.group("func"), m.group("file")


def short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def area_of(func: str, file: str) -> str | None:
    text = f"{short(file)} {func}"
    for name, rx in AREAS:
        if rx.search(text):
            return name
    return None


def summarize(raw: Path, top: int = 25) -> dict[str, object]:
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    area_self: Counter[str] = Counter()
    area_incl: Counter[str] = Counter()
    markers: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [parse_frame(f) for f in stack.split(";")]
        names = [f"{func} ({short(file)})" for func, file in frames]
        self_c[names[-1]] += count
        for name in set(names):
            incl_c[name] += count
        # A sample belongs (self) to the innermost frame that has an area.
        # Process/thread header frames carry no file: they say nothing about the area.
        areas = [area_of(func, file) if file else None for func, file in frames]
        leaf_area = next((a for a in reversed(areas) if a), "other")
        area_self[leaf_area] += count
        for a in {a for a in areas if a}:
            area_incl[a] += count
        for name, rx in MARKERS:
            if rx.search(stack):
                markers[name] += count

    def pct(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(100 * v / total, 1)) for k, v in c.most_common(top)] if total else []

    return {
        "samples": total,
        "self": pct(self_c),
        "inclusive": pct(incl_c),
        "area_self": pct(area_self),
        "area_inclusive": pct(area_incl),
        "markers": pct(markers),
    }


def render(title: str, s: dict[str, object], top: int) -> str:
    lines = [f"== {title}: {s['samples']} samples (busy samples only)"]
    for key, label in (
        ("area_self", "by area, self (innermost area frame)"),
        ("markers", "what the samples were doing (inclusive, can overlap)"),
        ("self", "top functions, self"),
        ("inclusive", "top functions, inclusive"),
    ):
        rows = s[key]
        assert isinstance(rows, list)
        lines.append(f"-- {label}")
        lines += [f"  {p:5.1f}%  {name}" for name, p in rows[:top]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--route", choices=sorted(ROUTES), default="jwt-remote")
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--new", action="store_true", help="new TLS connection per request")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames: OpenSSL)")
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "profile")
    args = p.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise BenchError("py-spy is not installed: .venv/bin/pip install py-spy")
    with exclusive_run():
        return _profile(args, spy)


def _profile(args: argparse.Namespace, spy: str) -> int:
    os.sched_setaffinity(0, cpu_list(args.client_cpus))
    raise_nofile()
    work = Path(tempfile.mkdtemp(prefix="svidgate-profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    upstream = stack = None
    try:
        pki = make_pki(work)
        up_port = free_port()
        conf = nginx.write_upstream_conf(work / "upstream", port=up_port)
        upstream = nginx.start(
            "upstream nginx", work / "upstream", conf, cpus=args.client_cpus, port=up_port
        )
        stack = start_stack(
            work,
            pki,
            upstream_port=up_port,
            workers=args.workers,
            cpus=args.server_cpus,
            routes=(args.route,),
        )
        url = f"https://127.0.0.1:{stack.port}{ROUTES[args.route]}"
        ab = ["ab", "-q", "-S", "-r", "-c", str(args.concurrency)]
        ab += ["-t", str(args.seconds + 3), "-n", str(200_000 * args.seconds)]
        ab += ["-E", str(pki.client_pem)]
        if not args.new:
            ab.append("-k")
        if args.route != "rbac":
            ab += ["-H", f"Authorization: Bearer {stack.token}"]
        load = subprocess.Popen(
            pinned([*ab, url], args.client_cpus),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=shim.env(shim.build()),  # TCP_NODELAY, as in bench/run (bench/shim.py)
        )
        time.sleep(1.5)
        tag = f"{args.route}-{'new' if args.new else 'ka'}-c{args.concurrency}"
        spies = []
        pids = stack.server_pids()
        cpu0 = cpu_seconds(pids)
        targets = [("gateway", stack.gateway.proc.pid)]
        if stack.signer is not None:
            targets.append(("signer", stack.signer.proc.pid))
        for name, pid in targets:
            raw = args.out / f"{tag}-{name}.raw"
            cmd = [spy, "record", "--pid", str(pid), "--subprocesses", "--rate", str(args.rate)]
            cmd += ["--duration", str(args.seconds), "--format", "raw", "--output", str(raw)]
            # --native (C frames: OpenSSL, uvloop) needs to stop the process while sampling.
            cmd.append("--native" if args.native else "--nonblocking")
            spies.append(
                (
                    name,
                    raw,
                    subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
                )
            )
        t0 = time.monotonic()
        for _name, _raw, sp in spies:
            sp.wait(timeout=args.seconds + 60)
        time.sleep(max(0.0, args.seconds - (time.monotonic() - t0)))
        cpu = (cpu_seconds(pids) - cpu0) / (time.monotonic() - t0)
        out, _ = load.communicate(timeout=args.seconds + 60)
        rps = re.search(r"Requests per second:\s+([\d.]+)", out)
        failed = re.search(r"Failed requests:\s+(\d+)", out)
        non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
        print(
            f"load: {tag} {rps.group(1) if rps else '?'} rps, failed "
            f"{failed.group(1) if failed else '?'}, non-2xx {non2xx.group(1) if non2xx else 0}; "
            f"server CPU {cpu:.2f} cores (py-spy overhead included)"
        )
        report = [f"# {tag}: {rps.group(1) if rps else '?'} rps under py-spy, CPU {cpu:.2f}"]
        for name, raw, sp in spies:
            if sp.returncode != 0 or not raw.exists():
                err = sp.stderr.read().decode() if sp.stderr else ""
                print(f"py-spy {name} failed: {err.strip()[-300:]}")
                continue
            text = render(f"{name} ({tag})", summarize(raw, args.top), args.top)
            report.append(text)
            print(text)
        (args.out / f"{tag}-summary.txt").write_text("\n\n".join(report) + "\n")
        print(f"raw stacks and summary in {args.out}")
        return 0
    finally:
        if stack is not None:
            stack.stop()
        if upstream is not None:
            upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


def _exit_on_sigterm() -> None:
    """SIGTERM/SIGHUP (e.g. from `timeout`) unwind normally so every started server is stopped."""
    import signal

    def bye(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGHUP, bye)


if __name__ == "__main__":
    _exit_on_sigterm()
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        sys.exit(2)
