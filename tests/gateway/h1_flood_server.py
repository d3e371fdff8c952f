"""A listener + core in its own process on uvloop, for measuring what connections cost.

``python h1_flood_server.py PKI_DIR HANDSHAKE_TIMEOUT`` prints ``port N`` once listening, then
answers each ``stats`` line on stdin with one JSON line: VmRSS (KiB), open connections and the
counters. ``quit`` (or EOF) stops it."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import uvloop
from h1_harness import Pki, Seen, echo_handler, identify_with
from svidgate.gateway.http1 import Limits
from svidgate.gateway.listener import Listener
from svidgate.gateway.server import listening_socket
from svidgate.pki.ca import CertificateAuthority


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


async def main(pki_dir: Path, handshake_timeout: float) -> None:
    pki = Pki(pki_dir, CertificateAuthority.load(pki_dir / "ca"))
    limits = Limits(handshake_timeout=handshake_timeout, max_connections=2000)
    listener = Listener(
        listening_socket("127.0.0.1:0"),
        pki.server_context(),
        echo_handler(Seen()),
        identify_with(pki.bundles),
        limits,
    )
    listener.start()
    print(f"port {listener.port}", flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if line.strip() != "stats":
            break
        doc = {
            "rss_kib": rss_kib(),
            "open": listener.open_connections,
            "counters": listener.counters.snapshot(),
        }
        print(json.dumps(doc), flush=True)
    await listener.shutdown(1.0)


if __name__ == "__main__":
    uvloop.run(main(Path(sys.argv[1]), float(sys.argv[2])))
