"""``svidgate signer serve --config PATH`` as a real child process: the one way tests start a
signer outside their own event loop (in-process signers are ``signer_harness.running_signer``).

Readiness is an event, not a guess: the socket file appears, then the gRPC health stream of
``svidgate.signer.v1.Signer.Sign`` reports SERVING (the signer holds a key it can sign with).
The process can be stopped and started again on the same config (same socket, same keys).
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from svidgate.signer.config import load_config

SIGN_HEALTH = "svidgate.signer.v1.Signer.Sign"


class SignerProcess:
    """One signer child process; stdout and stderr go to ``log``."""

    def __init__(
        self,
        config: Path,
        log: Path,
        *,
        socket: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self.log = log
        self.socket = socket
        self.env = env  # the child's whole environment (None: this process's)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, size: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    def start_sync(self, socket: Path | None = None, timeout: float = 20.0) -> None:
        """Start and block until the signer serves Sign on its Unix socket (``listen.unix`` of
        the config unless ``socket`` is given)."""
        assert not self.running, "the signer is already running"
        if socket is not None:
            self.socket = socket
        if self.socket is None:
            self.socket = load_config(self.config).listen.unix
            assert self.socket is not None, "SignerProcess needs a config with listen.unix"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "svidgate.cli",
                    "signer",
                    "serve",
                    "--config",
                    str(self.config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.running, f"the signer exited early: {self.log_tail()}"
            if self.socket.exists() and self._watch_until_serving(deadline):
                return
            time.sleep(0.02)  # the socket file has not appeared yet, or refuses connections
        raise AssertionError(f"the signer did not become ready: {self.log_tail()}")

    async def start(self, socket: Path | None = None, timeout: float = 20.0) -> None:
        await asyncio.to_thread(self.start_sync, socket, timeout)

    def _watch_until_serving(self, deadline: float) -> bool:
        """Follow the Sign health stream until SERVING (True), or until it fails or a second
        passes (False: the caller checks the process is alive and tries again)."""
        window = max(0.05, min(1.0, deadline - time.monotonic()))
        request = health_pb2.HealthCheckRequest(service=SIGN_HEALTH)
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            try:
                for reply in health_pb2_grpc.HealthStub(channel).Watch(request, timeout=window):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
            except grpc.RpcError:
                pass
        return False

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, return the exit code (a graceful shutdown returns 0); SIGKILL after
        ``timeout``. Stopping a stopped process returns its exit code again."""
        assert self.proc is not None, "the signer was never started"
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return int(self.proc.returncode)
