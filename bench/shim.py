"""The TCP_NODELAY shim for ab (bench/nodelay/nodelay.c): build it, prove it works, describe it.

ab sets no TCP_NODELAY, so with TLS 1.3 its first request on a new connection waits for the
ACK of its last handshake flight (~40 ms delayed ACK when the server sends no session ticket).
Every ab run of the benchmark runs with this shim preloaded, for every target alike.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from bench.procs import BenchError

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "nodelay" / "nodelay.c"
BUILD = HERE / ".build"
LIBRARY = BUILD / "nodelay.so"
NOTE = "ab ran with TCP_NODELAY on its connections (LD_PRELOAD shim bench/nodelay/nodelay.c)"
NOTE_OFF = "ab ran without TCP_NODELAY (--no-nodelay: new-connection rows wait on delayed ACKs)"

# A child that connects with the shim preloaded and prints the socket's TCP_NODELAY.
_PROBE = (
    "import socket, sys\n"
    "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n"
    "print(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))\n"
)


def build() -> Path:
    """Compile the shim into bench/.build/ (when the source is newer) and check it works."""
    if not LIBRARY.exists() or LIBRARY.stat().st_mtime < SOURCE.stat().st_mtime:
        gcc = shutil.which("gcc") or shutil.which("cc")
        if gcc is None:
            raise BenchError("no C compiler for bench/nodelay/nodelay.c (bench/run installs gcc)")
        BUILD.mkdir(exist_ok=True)
        tmp = LIBRARY.with_suffix(".so.tmp")
        cmd = [gcc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)]
        proc = subprocess.run([*cmd, "-ldl"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines() or ["no message"]
            first = next((x for x in lines if "error" in x), lines[0])
            raise BenchError(f"gcc could not build the TCP_NODELAY shim: {first}")
        tmp.replace(LIBRARY)
    verify(LIBRARY)
    return LIBRARY


def verify(library: Path) -> None:
    """A connect() made under the shim must come out with TCP_NODELAY set."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-c", _PROBE, str(port)],
            env=env(library),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    if proc.returncode != 0 or proc.stdout.strip() in ("", "0"):
        raise BenchError(
            f"the TCP_NODELAY shim {library} did not take effect "
            f"(probe printed {proc.stdout.strip() or proc.stderr.strip()[-200:]!r})"
        )


def env(library: Path | None) -> dict[str, str] | None:
    """The environment for a child running under the shim (None = inherit unchanged)."""
    if library is None:
        return None
    preload = os.environ.get("LD_PRELOAD")
    return {**os.environ, "LD_PRELOAD": f"{library} {preload}" if preload else str(library)}
