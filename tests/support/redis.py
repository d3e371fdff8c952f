"""A real ``redis-server`` (Debian's package, installed by .ci/redis) for the rate-limit tests;
the fixture is ``redis_server`` in tests/conftest.py.

``RedisServer`` picks a free loopback port, starts ``redis-server`` without persistence
(``--save ''``, ``--appendonly no``), waits for PING, and can stop and start again on the same
port (the tests of a Redis outage). A missing binary fails the test with how to install it.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

from support.ports import free_port, port_is_free
from support.waiting import wait_until


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "the `redis-server` binary is missing: apt-get install redis-server (or run .ci/redis)"
        )
    return found


class RedisServer:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = Path(tempfile.mkdtemp(prefix="redis-"))
        self._log = self._dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 20.0) -> None:
        assert self._proc is None, "already running"
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    redis_binary(),
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(self._dir),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_until(self._answers, timeout, "redis-server to answer PING", interval=0.05)
        except AssertionError:
            self.stop()
            raise

    def _answers(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"redis-server exited early: {self._log.read_text()[-2000:]}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
        return False

    def stop(self) -> None:
        """Kill the server (an outage, as a crash looks) and wait until its port is free."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)
        with contextlib.suppress(AssertionError):
            wait_until(lambda: port_is_free(self.port), 10, "redis' port to be released")

    def command(self, *args: str) -> bytes:
        """One command over RESP; the raw reply (for checks such as TTL and KEYS)."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.sendall(b"".join(parts))
            return sock.recv(65536)
