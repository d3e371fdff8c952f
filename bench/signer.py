#!/usr/bin/env python3
"""Signer throughput: Sign and Verify RPCs over the Unix socket at concurrency 1 and 64 (one
client process, the signer in its own process), next to raw pyjwt encode/decode and raw
cryptography ECDSA sign/verify for the same algorithm (ES256), all in the same run.

    .venv/bin/python bench/signer.py [--seconds 3] [--json bench/results/signer.json]

Prints a table with ratios and writes the figures as JSON. Not a test: numbers depend on the
machine (this one: 2 cores shared by client and server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
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
) -> float:
    """Ops/s of ``concurrency`` tasks calling ``fn`` in a loop for about ``seconds``."""
    count = 0
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < stop:
            await fn()
            count += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - start)


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


def core_verify_benchmark(seconds: float) -> float:
    """signer.jwt.verify_token in-process (the work one Verify RPC does, without gRPC)."""
    # run as a script, sys.path[0] is bench/, where this file would shadow the signer package
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    from signer import jwt as sjwt

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    claims = sjwt.build_claims(
        issuer=ISSUER, subject=SUBJECT, audience=[AUDIENCE], now=now, ttl=timedelta(minutes=5)
    )
    data = sjwt.signing_input("ES256", "k", claims)
    token = sjwt.assemble(data, sjwt.sign_local("ES256", key, data))
    vk = sjwt.VerificationKey("k", "ES256", key.public_key())
    policy = sjwt.VerifyPolicy(ISSUER, timedelta(seconds=30), timedelta(minutes=15))
    return timed_loop(
        lambda: sjwt.verify_token(
            token, lookup=lambda _kid: vk, policy=policy, audiences=[AUDIENCE], now=now
        ),
        seconds,
    )


def start_signer(workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
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
    log = (workdir / "signer.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "svidgate.cli", "signer", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"signer exited: {(workdir / 'signer.log').read_text()[-2000:]}")
        if sock.exists():
            try:
                with grpc.insecure_channel(f"unix:{sock}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service="svidgate.signer.v1.Signer.Sign"),
                        timeout=1,
                    )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return proc, sock
            except grpc.RpcError:
                pass
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("signer did not become ready")


async def rpc_benchmarks(sock: Path, seconds: float) -> dict[str, float]:
    results: dict[str, float] = {}
    async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        stub: Any = signer_pb2_grpc.SignerStub(channel)  # type: ignore[no-untyped-call]
        sign_request = signer_pb2.SignRequest(subject=SUBJECT, audience=[AUDIENCE])
        token = (await stub.Sign(sign_request)).token
        verify_request = signer_pb2.VerifyRequest(token=token, audience=[AUDIENCE])
        await stub.Verify(verify_request)
        jwks_request = signer_pb2.GetJWKSRequest()
        for concurrency in (1, 64):
            # GetJWKS returns a cached string: the gRPC round-trip floor of this server
            results[f"jwks_rpc_c{concurrency}"] = await timed_async(
                lambda: stub.GetJWKS(jwks_request), concurrency, seconds
            )
            results[f"sign_rpc_c{concurrency}"] = await timed_async(
                lambda: stub.Sign(sign_request), concurrency, seconds
            )
            results[f"verify_rpc_c{concurrency}"] = await timed_async(
                lambda: stub.Verify(verify_request), concurrency, seconds
            )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--json", type=Path, default=ROOT / "bench/results/signer.json")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sg-bench-", dir="/tmp"))
    proc, sock = start_signer(workdir)
    try:
        try:
            import uvloop

            rpc = uvloop.run(rpc_benchmarks(sock, args.seconds))
        except ImportError:
            rpc = asyncio.run(rpc_benchmarks(sock, args.seconds))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
        shutil.rmtree(workdir, ignore_errors=True)
    raw = raw_benchmarks(args.seconds)
    raw["signer_core_verify"] = core_verify_benchmark(args.seconds)
    figures = {**rpc, **raw}

    rows = [
        ("GetJWKS RPC (gRPC floor), UDS, c=1", "jwks_rpc_c1", None),
        ("GetJWKS RPC (gRPC floor), UDS, c=64", "jwks_rpc_c64", None),
        ("Sign RPC, UDS, c=1", "sign_rpc_c1", "pyjwt_encode"),
        ("Sign RPC, UDS, c=64", "sign_rpc_c64", "pyjwt_encode"),
        ("Verify RPC, UDS, c=1", "verify_rpc_c1", "pyjwt_decode"),
        ("Verify RPC, UDS, c=64", "verify_rpc_c64", "pyjwt_decode"),
        ("pyjwt encode ES256 (in-process)", "pyjwt_encode", "crypto_sign"),
        ("pyjwt decode ES256 (in-process)", "pyjwt_decode", "crypto_verify"),
        ("signer.jwt verify_token (in-process)", "signer_core_verify", "pyjwt_decode"),
        ("cryptography ECDSA P-256 sign", "crypto_sign", None),
        ("cryptography ECDSA P-256 verify", "crypto_verify", None),
    ]
    print(f"\nsvidgate signer benchmark (ES256), {os.cpu_count()} CPUs, {args.seconds:g}s each")
    print(f"{'measurement':<40} {'ops/s':>10}  ratio")
    for label, key, versus in rows:
        ratio = f"{figures[key] / figures[versus]:.2f}x {versus}" if versus else ""
        print(f"{label:<40} {figures[key]:>10,.0f}  {ratio}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "algorithm": "ES256",
                "transport": "unix socket; one grpc.aio client process; signer in its own process",
                "seconds_per_measurement": args.seconds,
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "grpc": grpc.__version__,
                "pyjwt": jwt.__version__,
                "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "ops_per_second": {k: round(v, 1) for k, v in figures.items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
