#!/usr/bin/env python3
"""Signer throughput: Sign and Verify RPCs over the Unix socket at concurrency 1 and 64 (one
client process, the signer in its own process), next to raw pyjwt encode/decode and raw
cryptography ECDSA sign/verify for the same algorithm (ES256), all in the same run.

    .venv/bin/python bench/signer.py [--seconds 3] [--rounds 3] [--server-cpus 0]
        [--client-cpus 1] [--json bench/results/signer.json]

The signer is pinned to ``--server-cpus`` and the client to ``--client-cpus`` (as bench/run pins
the proxies and the load generator); the raw figures are taken on the server's cpus, so the
ratios compare an RPC with the crypto it wraps *on the same core*. Each RPC row also shows the
CPU time per call of the server and of the client (from /proc and ``process_time``): a server at
~100% of its core is the bottleneck, and its µs/call is what an RPC costs. A bare grpc.aio
server with the same contract and a constant reply (``--serve-floor``, run in its own process
on the same cpus) gives gRPC's own floor on this machine, for unary calls and for messages on
bidi streams (the price of a call vs the price of a message). Rounds are interleaved and the median
is reported. Prints a table with ratios and writes the figures as JSON. Not a test: numbers
depend on the machine (and on whatever else runs on it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import yaml
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
SUBJECT = "spiffe://example.org/ns/bench/sa/client"
AUDIENCE = "orders"
ISSUER = "spiffe://example.org/signer"
CONCURRENCY = (1, 64)
# floor = bare grpc.aio server, constant reply; stream = the same server answering VerifyRequest
# messages on long-lived bidi streams (one per client task, lockstep): what a streaming Verify
# would start from. Neither is part of the signer's contract.
RPCS = ("floor", "stream", "jwks", "sign", "verify")
ECHO_METHOD = "/svidgate.bench.Floor/Echo"
TARGETS = {"sign": ("crypto_sign", 0.25), "verify": ("crypto_verify", 0.5)}  # issue 5


def cpu_list(text: str) -> set[int]:
    """A taskset-style list: ``0``, ``0,2``, ``0-3``."""
    out: set[int] = set()
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.update(range(int(low), int(high or low) + 1))
    return out


def pin(pid: int, cpus: set[int] | None) -> None:
    """Pin a process and every thread it has now (threads started later inherit)."""
    if cpus is None:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(tid, cpus)


def process_cpu(pid: int) -> float | None:
    """utime + stime of a process (all threads), seconds; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed_loop(fn: Callable[[], object], seconds: float) -> float:
    """Ops/s of a synchronous callable, run for about ``seconds``."""
    n = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            fn()
        n += 100
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


async def timed_async(
    fn: Callable[[], Awaitable[object]], concurrency: int, seconds: float
) -> tuple[int, float]:
    """(calls, elapsed s) of ``concurrency`` tasks calling ``fn`` for about ``seconds``."""
    count = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await fn()
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count, time.perf_counter() - start


def raw_benchmarks(seconds: float) -> dict[str, float]:
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key()
    now = datetime.now(UTC)
    claims = {
        "iss": ISSUER,
        "sub": SUBJECT,
        "aud": AUDIENCE,
        "iat": int(now.timestamp()),
        "exp": int((now + timedelta(minutes=5)).timestamp()),
        "jti": "x" * 22,
    }
    headers = {"kid": "bench"}
    token = jwt.encode(claims, key, algorithm="ES256", headers=headers)
    message = token.rsplit(".", 1)[0].encode()
    signature = key.sign(message, ec.ECDSA(hashes.SHA256()))

    def decode() -> object:
        return jwt.decode(token, public, algorithms=["ES256"], audience=AUDIENCE, issuer=ISSUER)

    return {
        "pyjwt_encode": timed_loop(
            lambda: jwt.encode(claims, key, algorithm="ES256", headers=headers), seconds
        ),
        "pyjwt_decode": timed_loop(decode, seconds),
        "crypto_sign": timed_loop(lambda: key.sign(message, ec.ECDSA(hashes.SHA256())), seconds),
        "crypto_verify": timed_loop(
            lambda: public.verify(signature, message, ec.ECDSA(hashes.SHA256())), seconds
        ),
    }


def core_benchmarks(seconds: float) -> dict[str, float]:
    """signer.jwt / pki.jwt_svid in-process: the token work one Sign / Verify RPC does."""
    # run as a script, sys.path[0] is bench/, where this file would shadow the signer package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    from svidgate.pki import jwt_svid
    from svidgate.signer import jwt as sjwt

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    claims = sjwt.build_claims(
        issuer=ISSUER, subject=SUBJECT, audience=[AUDIENCE], now=now, ttl=timedelta(minutes=5)
    )
    data = sjwt.signing_input("ES256", "k", claims)
    token = sjwt.assemble(data, sjwt.sign_local("ES256", key, data))
    vk = jwt_svid.VerificationKey("k", "ES256", key.public_key())
    policy = jwt_svid.VerificationPolicy(ISSUER, timedelta(seconds=30), timedelta(minutes=15))

    def sign() -> str:
        fresh = sjwt.build_claims(
            issuer=ISSUER, subject=SUBJECT, audience=[AUDIENCE], now=now, ttl=timedelta(minutes=5)
        )
        data = sjwt.signing_input("ES256", "k", fresh)
        return sjwt.assemble(data, sjwt.sign_local("ES256", key, data))

    return {
        "signer_core_sign": timed_loop(sign, seconds),
        "signer_core_verify": timed_loop(
            lambda: jwt_svid.verify_jwt_svid(
                token, lookup=lambda _kid: vk, policy=policy, audiences=[AUDIENCE], now=now
            ),
            seconds,
        ),
    }


def wait_serving(proc: subprocess.Popen[bytes], sock: Path, service: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{sock.name}: server exited: {log.read_text()[-2000:]}")
        if sock.exists():
            try:
                with grpc.insecure_channel(f"unix:{sock}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=service), timeout=1
                    )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{sock.name}: server did not become ready")


def spawn(cmd: list[str], log: Path, cpus: set[int] | None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    pin(proc.pid, cpus)  # before the interpreter has started any thread
    return proc


def start_signer(workdir: Path, cpus: set[int] | None) -> tuple[subprocess.Popen[bytes], Path]:
    sock = workdir / "signer.sock"
    config = workdir / "signer.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trust_domain": "example.org",
                "issuer": ISSUER,
                "listen": {"unix": str(sock)},
                "authorization": {"sign": ["spiffe://example.org/ns/**"]},
                "keys": {"source": "file", "algorithm": "ES256", "dir": str(workdir / "keys")},
            }
        )
    )
    log = workdir / "signer.log"
    cmd = [sys.executable, "-m", "svidgate.cli", "signer", "serve", "--config", str(config)]
    proc = spawn(cmd, log, cpus)
    wait_serving(proc, sock, "svidgate.signer.v1.Signer.Sign", log)
    pin(proc.pid, cpus)
    return proc, sock


def start_floor(workdir: Path, cpus: set[int] | None) -> tuple[subprocess.Popen[bytes], Path]:
    sock = workdir / "floor.sock"
    log = workdir / "floor.log"
    proc = spawn([sys.executable, __file__, "--serve-floor", str(sock)], log, cpus)
    wait_serving(proc, sock, "", log)
    pin(proc.pid, cpus)
    return proc, sock


def serve_floor(sock: Path) -> int:
    """A bare grpc.aio server (uvloop when available, as the signer) with the signer contract:
    GetJWKS returns a constant, nothing else runs per call. gRPC's own cost on this machine."""
    from grpc_health.v1 import health

    class Floor(signer_pb2_grpc.SignerServicer):
        async def GetJWKS(self, request: Any, context: Any) -> signer_pb2.JWKS:
            return signer_pb2.JWKS(jwks_json='{"keys":[]}', sequence=1)

    reply = signer_pb2.VerifyResponse(claims_json='{"sub":"x"}', kid="k", subject="x")

    async def echo(requests: AsyncIterator[signer_pb2.VerifyRequest], context: Any) -> Any:
        async for _ in requests:
            yield reply

    async def main() -> None:
        server = grpc.aio.server()
        signer_pb2_grpc.add_SignerServicer_to_server(Floor(), server)  # type: ignore[no-untyped-call]
        service, method = ECHO_METHOD.strip("/").split("/")
        handler = grpc.stream_stream_rpc_method_handler(
            echo,
            request_deserializer=signer_pb2.VerifyRequest.FromString,
            response_serializer=signer_pb2.VerifyResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {method: handler}),)
        )
        checker = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(checker, server)
        server.add_insecure_port(f"unix:{sock}")
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await server.stop(1)

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
    return 0


async def rpc_round(
    servers: dict[str, tuple[int, Path]], seconds: float
) -> dict[str, tuple[float, float | None, float]]:
    """{f"{rpc}_rpc_c{n}": (ops/s, server µs/call, client µs/call)} for one round."""
    out: dict[str, tuple[float, float | None, float]] = {}
    channels = {
        name: grpc.aio.insecure_channel(f"unix:{sock}") for name, (_, sock) in servers.items()
    }
    try:
        stubs: dict[str, Any] = {
            name: signer_pb2_grpc.SignerStub(ch)  # type: ignore[no-untyped-call]
            for name, ch in channels.items()
        }
        signer = stubs["signer"]
        sign_request = signer_pb2.SignRequest(subject=SUBJECT, audience=[AUDIENCE])
        token = (await signer.Sign(sign_request)).token
        verify_request = signer_pb2.VerifyRequest(token=token, audience=[AUDIENCE])
        await signer.Verify(verify_request)
        jwks_request = signer_pb2.GetJWKSRequest()
        await stubs["floor"].GetJWKS(jwks_request)
        echo: Any = channels["floor"].stream_stream(
            ECHO_METHOD,
            request_serializer=signer_pb2.VerifyRequest.SerializeToString,
            response_deserializer=signer_pb2.VerifyResponse.FromString,
        )
        streams: dict[asyncio.Task[Any] | None, Any] = {}

        async def stream_message() -> None:
            task = asyncio.current_task()
            call = streams.get(task)
            if call is None:
                call = streams[task] = echo()
            await call.write(verify_request)
            await call.read()

        calls: dict[str, tuple[str, Callable[[], Awaitable[object]]]] = {
            # GetJWKS returns a cached string: the gRPC round-trip floor of the signer itself
            "floor": ("floor", lambda: stubs["floor"].GetJWKS(jwks_request)),
            "stream": ("floor", stream_message),
            "jwks": ("signer", lambda: signer.GetJWKS(jwks_request)),
            "sign": ("signer", lambda: signer.Sign(sign_request)),
            "verify": ("signer", lambda: signer.Verify(verify_request)),
        }
        for concurrency in CONCURRENCY:
            for rpc in RPCS:
                server, fn = calls[rpc]
                pid = servers[server][0]
                server_before, client_before = process_cpu(pid), time.process_time()
                count, elapsed = await timed_async(fn, concurrency, seconds)
                server_after, client_after = process_cpu(pid), time.process_time()
                server_us = (
                    None
                    if server_before is None or server_after is None
                    else 1e6 * (server_after - server_before) / count
                )
                client_us = 1e6 * (client_after - client_before) / count
                out[f"{rpc}_rpc_c{concurrency}"] = (count / elapsed, server_us, client_us)
                for call in streams.values():
                    await call.done_writing()
                    await call.code()
                streams.clear()
    finally:
        for ch in channels.values():
            await ch.close(None)
    return out


def run_async(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--server-cpus", default="0", help="taskset list for the servers")
    parser.add_argument("--client-cpus", default="1", help="taskset list for the client")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/signer.json")
    parser.add_argument("--serve-floor", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor is not None:
        return serve_floor(args.serve_floor)
    # bench/run forwards TERM (timeout, Ctrl-C): unwind so that the finally below stops the servers
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))

    allowed = os.sched_getaffinity(0)
    server_cpus: set[int] | None = cpu_list(args.server_cpus) & allowed
    client_cpus: set[int] | None = cpu_list(args.client_cpus) & allowed
    if not server_cpus or not client_cpus or server_cpus & client_cpus:
        print("not pinning: need disjoint --server-cpus and --client-cpus on this machine")
        server_cpus = client_cpus = None
    else:
        os.sched_setaffinity(0, client_cpus)

    rounds: list[dict[str, tuple[float, float | None, float]]] = []
    raws: list[dict[str, float]] = []
    workdir = Path(tempfile.mkdtemp(prefix="sg-bench-", dir="/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        signer, signer_sock = start_signer(workdir, server_cpus)
        procs.append(signer)
        floor, floor_sock = start_floor(workdir, server_cpus)
        procs.append(floor)
        servers = {"signer": (signer.pid, signer_sock), "floor": (floor.pid, floor_sock)}
        for n in range(args.rounds):
            print(f"round {n + 1}/{args.rounds}", flush=True)
            rounds.append(run_async(rpc_round(servers, args.seconds)))
            # the raw figures on the servers' cpus (idle now): "on the same core"
            if server_cpus is not None:
                os.sched_setaffinity(0, server_cpus)
            try:
                raws.append({**raw_benchmarks(args.seconds), **core_benchmarks(args.seconds)})
            finally:
                if client_cpus is not None:
                    os.sched_setaffinity(0, client_cpus)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    figures: dict[str, float] = {}
    server_us: dict[str, float | None] = {}
    client_us: dict[str, float | None] = {}
    for key in rounds[0]:
        figures[key] = statistics.median(r[key][0] for r in rounds)
        server_us[key] = median([r[key][1] for r in rounds])
        client_us[key] = median([r[key][2] for r in rounds])
    for key in raws[0]:
        figures[key] = statistics.median(r[key] for r in raws)

    rows: list[tuple[str, str, str | None]] = []
    labels = {
        "floor": "bare grpc.aio unary (gRPC floor)",
        "stream": "bare grpc.aio bidi-stream message",
        "jwks": "GetJWKS RPC (signer's floor)",
        "sign": "Sign RPC",
        "verify": "Verify RPC",
    }
    for rpc in RPCS:
        for concurrency in CONCURRENCY:
            versus = TARGETS[rpc][0] if rpc in TARGETS else None
            rows.append((f"{labels[rpc]}, c={concurrency}", f"{rpc}_rpc_c{concurrency}", versus))
    rows += [
        ("signer.jwt sign (in-process)", "signer_core_sign", "crypto_sign"),
        ("pki.jwt_svid verify (in-process)", "signer_core_verify", "crypto_verify"),
        ("pyjwt encode ES256 (in-process)", "pyjwt_encode", "crypto_sign"),
        ("pyjwt decode ES256 (in-process)", "pyjwt_decode", "crypto_verify"),
        ("cryptography ECDSA P-256 sign", "crypto_sign", None),
        ("cryptography ECDSA P-256 verify", "crypto_verify", None),
    ]
    pinning = (
        f"servers on cpus {sorted(server_cpus)}, client on {sorted(client_cpus)}"
        if server_cpus is not None and client_cpus is not None
        else "not pinned"
    )
    print(
        f"\nsvidgate signer benchmark (ES256), {os.cpu_count()} CPUs, {pinning}, "
        f"median of {args.rounds} x {args.seconds:g}s"
    )
    print(f"{'measurement':<44} {'ops/s':>9} {'srv µs/op':>10} {'cli µs/op':>10}  ratio")

    def us(value: float | None) -> str:
        return "" if value is None else f"{value:,.0f}"

    for label, key, versus in rows:
        ratio = f"{figures[key] / figures[versus]:.2f}x {versus}" if versus else ""
        print(
            f"{label:<44} {figures[key]:>9,.0f} {us(server_us.get(key)):>10} "
            f"{us(client_us.get(key)):>10}  {ratio}"
        )
    targets = {}
    for rpc, (raw, wanted) in TARGETS.items():
        have = figures[f"{rpc}_rpc_c64"] / figures[raw]
        targets[f"{rpc}_c64_vs_{raw}"] = {"ratio": round(have, 3), "target": wanted}
        print(f"target {rpc} RPC (c=64) >= {wanted}x {raw}: {have:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "algorithm": "ES256",
                "transport": "unix socket; one grpc.aio client process; signer in its own process",
                "pinning": pinning,
                "seconds_per_measurement": args.seconds,
                "rounds": args.rounds,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "grpc": grpc.__version__,
                "pyjwt": jwt.__version__,
                "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "ops_per_second": {k: round(v, 1) for k, v in figures.items()},
                "server_cpu_us_per_call": {
                    k: None if v is None else round(v, 1) for k, v in server_us.items()
                },
                "client_cpu_us_per_call": {
                    k: None if v is None else round(v, 1) for k, v in client_us.items()
                },
                "targets": targets,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
