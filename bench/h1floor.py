"""The new HTTP/1.1 core's floor against aiohttp's (not a test): CPU per keep-alive request.

Both servers answer a fixed 200 themselves over mTLS (TLS 1.3, client certificate required,
no tickets, uvloop, one process pinned to the server core):

- ``aiohttp-hello``: ``bench/floor.py --mode hello`` (aiohttp's server, what the gateway's data
  plane runs on today);
- ``h1-core``: :mod:`svidgate.gateway.listener` + :mod:`svidgate.gateway.http1` with a
  handler that answers with ``Responder.respond`` (one write).

``python -m bench.h1floor [--rounds 3] [--seconds 5] [--concurrency 16]`` runs
``ab -k -E client.pem`` (TCP_NODELAY shim, pinned to the client core) against each in turn,
rounds interleaved, and prints requests/s and server CPU µs per request (median of rounds).
The machine may be busy: read the ratio, not the absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench import shim
from bench.ab import AbSpec, run_ab
from bench.procs import BenchError, Service, exclusive_run, free_port, pinned
from bench.stack import make_pki


async def serve(port: int, cert: Path, key: Path, bundle: Path) -> None:
    """The core with a fixed 200 (the identity check only requires a peer certificate, like
    the aiohttp floor's TLS settings)."""
    from svidgate.gateway.http1 import (
        Admission,
        Body,
        ConnectionInfo,
        Refused,
        Request,
        Responder,
    )
    from svidgate.gateway.http1.respond import http_date
    from svidgate.gateway.listener import Listener

    from bench.floor import listening_socket, server_context

    def identify(transport: asyncio.BaseTransport) -> Admission[bytes]:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise Refused("no client certificate")
        return Admission(peer=der, key=der)

    async def hello(
        conn: ConnectionInfo[bytes], request: Request, body: Body, responder: Responder
    ) -> None:
        headers = [
            (b"Content-Type", b"text/plain; charset=utf-8"),
            (b"Date", http_date()),
            (b"Server", b"svidgate"),
        ]
        responder.respond(200, headers, b"ok\n")

    listener = Listener(listening_socket(port), server_context(cert, key, bundle), hello, identify)
    listener.start()
    await asyncio.Event().wait()


def measure(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="h1floor-") as tmp, exclusive_run():
        work = Path(tmp)
        pki = make_pki(work)
        preload = shim.build()
        tls = ["--cert", str(pki.server_crt), "--key", str(pki.server_key)]
        tls += ["--bundle", str(pki.bundle)]
        servers: dict[str, tuple[Service, int]] = {}
        try:
            for name, module in (("aiohttp-hello", "bench.floor"), ("h1-core", "bench.h1floor")):
                port = free_port()
                cmd = [sys.executable, "-m", module, "--port", str(port), *tls]
                if module == "bench.floor":
                    cmd += ["--mode", "hello"]
                else:
                    cmd.insert(3, "serve")
                svc = Service.start(name, pinned(cmd, args.server_cpus), log=work / f"{name}.log")
                svc.wait_port(port)
                servers[name] = (svc, port)
            return report(args, servers, pki.client_pem, preload)
        finally:
            for svc, _port in servers.values():
                svc.stop()


def report(
    args: argparse.Namespace,
    servers: dict[str, tuple[Service, int]],
    client_pem: Path,
    preload: Path,
) -> int:
    spec = AbSpec(f"ka-c{args.concurrency}", args.concurrency, keepalive=True)
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    for i in range(args.rounds):
        order = list(servers) if i % 2 == 0 else list(reversed(servers))
        for name in order:
            svc, port = servers[name]
            result = run_ab(
                f"https://127.0.0.1:{port}/",
                spec,
                seconds=args.seconds,
                max_requests=10_000_000,
                cpus=args.client_cpus,
                client_pem=client_pem,
                server_pids=svc.tree(),
                preload=preload,
            )
            runs[name].append((result.rps, result.server_cpu / result.rps * 1e6))
    print(f"keep-alive c={args.concurrency}, {args.rounds} rounds x {args.seconds}s (medians)")
    cost = {}
    for name, values in runs.items():
        rps = statistics.median(v[0] for v in values)
        cost[name] = statistics.median(v[1] for v in values)
        print(f"  {name:14s} {rps:9.0f} req/s  {cost[name]:6.1f} µs CPU/request")
    ratio = cost["aiohttp-hello"] / cost["h1-core"]
    print(f"  h1-core: {1 / ratio:.2f}x the CPU of aiohttp-hello per request")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        p = argparse.ArgumentParser(prog="python -m bench.h1floor serve")
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--cert", type=Path, required=True)
        p.add_argument("--key", type=Path, required=True)
        p.add_argument("--bundle", type=Path, required=True)
        a = p.parse_args(argv[1:])
        import uvloop

        with contextlib.suppress(KeyboardInterrupt):
            uvloop.run(serve(a.port, a.cert, a.key, a.bundle))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.h1floor")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--server-cpus", default="0")
    p.add_argument("--client-cpus", default="1")
    try:
        return measure(p.parse_args(argv))
    except BenchError as exc:
        print(f"h1floor: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
