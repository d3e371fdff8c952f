"""``svidgate signer serve --config PATH`` as a real child process: the one way tests start a
signer outside their own event loop (in-process signers are ``signer_harness.running_signer``).

Readiness is an event, not a guess: the socket file appears, then the gRPC health stream of
``svidgate.signer.v1.Signer.Sign`` reports SERVING (the signer holds a key it can sign with).
The process can be stopped and started again on the same config (same socket, same keys).

:meth:`SignerProcess.file_keys` writes the usual config of a file-key signer for the suites that
only need *a* signer (the gateway's); the RPC helpers mint tokens and rotate over the Unix socket.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from svidgate.signer.config import load_config
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc

from support.logschema import messages, read_events
from support.pki import SIGNER_ID, TD, WEB_ID

SIGN_HEALTH = "svidgate.signer.v1.Signer.Sign"
AUDIENCE = "orders"

# A signer with file keys in ./keys on the Unix socket ./run/signer.sock (paths relative to the
# config file); a prepared key signs after one second.
FILE_KEYS_SIGNER: dict[str, Any] = {
    "trust_domain": TD,
    "issuer": SIGNER_ID,
    "listen": {"unix": "run/signer.sock"},
    "authorization": {"sign": [f"spiffe://{TD}/**"]},
    "keys": {"source": "file", "algorithm": "ES256", "dir": "keys"},
    # prepare_ahead 1s >= poll_interval 500ms + clock_skew 500ms (the start-up safety rule)
    "tokens": {"default_ttl": "5m", "max_ttl": "15m", "clock_skew": "500ms"},
    "rotation": {"period": "24h", "prepare_ahead": "1s", "poll_interval": "500ms"},
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested mappings key by key (neither is changed)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


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

    @classmethod
    def file_keys(cls, directory: Path, extra: dict[str, Any] | None = None) -> SignerProcess:
        """An unstarted signer whose config, ``directory``/signer.yaml, is
        :data:`FILE_KEYS_SIGNER` deep-merged with ``extra``; keys in ``directory``/keys, socket
        ``directory``/run/signer.sock, log ``directory``/signer.log."""
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "signer.yaml"
        config.write_text(yaml.safe_dump(deep_merge(FILE_KEYS_SIGNER, extra or {})))
        return cls(config, directory / "signer.log", socket=directory / "run" / "signer.sock")

    @property
    def tcp_port(self) -> int:
        """The port of the config's ``listen.tcp``."""
        address = load_config(self.config).tcp_address()
        assert address is not None, "the signer's config has no listen.tcp"
        return address[1]

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, size: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-size:] if self.log.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """The log lines written so far (a line still being written is left out), each
        checked against the shared schema."""
        return read_events(self.log, "signer") if self.log.exists() else []

    def messages(self, level: str | None = None) -> list[str]:
        """The ``message`` of every plain log line so far, only those at ``level`` if given."""
        return messages(self.events(), level)

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

    # -- RPCs over the Unix socket (blocking; async tests use the *_async variants) -------------

    def call(self, method: str, request: Any, timeout: float = 10.0) -> Any:
        """One unary RPC of ``svidgate.signer.v1.Signer`` over the Unix socket."""
        assert self.socket is not None, "the signer has no Unix socket yet"
        with grpc.insecure_channel(f"unix:{self.socket}") as channel:
            stub = signer_pb2_grpc.SignerStub(channel)  # type: ignore[no-untyped-call]
            return getattr(stub, method)(request, timeout=timeout)

    def sign_reply(
        self,
        subject: str = WEB_ID,
        audience: str = AUDIENCE,
        *,
        ttl: int = 0,
        thumbprint: str = "",
        claims: dict[str, Any] | None = None,
    ) -> signer_pb2.SignResponse:
        """Sign for ``subject`` (bound to the certificate ``thumbprint`` when given)."""
        request = signer_pb2.SignRequest(
            subject=subject,
            audience=[audience],
            ttl_seconds=ttl,
            certificate_thumbprint=thumbprint,
            bind_certificate=bool(thumbprint),
            claims_json=json.dumps(claims) if claims else "",
        )
        reply: signer_pb2.SignResponse = self.call("Sign", request)
        return reply

    def sign(self, subject: str = WEB_ID, audience: str = AUDIENCE, **kwargs: Any) -> str:
        """The token of :meth:`sign_reply`."""
        return str(self.sign_reply(subject, audience, **kwargs).token)

    def rotate(self) -> signer_pb2.RotateResponse:
        reply: signer_pb2.RotateResponse = self.call("Rotate", signer_pb2.RotateRequest())
        return reply

    async def sign_async(
        self, subject: str = WEB_ID, audience: str = AUDIENCE, **kwargs: Any
    ) -> str:
        return await asyncio.to_thread(self.sign, subject, audience, **kwargs)

    async def sign_reply_async(
        self, subject: str = WEB_ID, audience: str = AUDIENCE, **kwargs: Any
    ) -> signer_pb2.SignResponse:
        return await asyncio.to_thread(self.sign_reply, subject, audience, **kwargs)

    async def rotate_async(self) -> signer_pb2.RotateResponse:
        return await asyncio.to_thread(self.rotate)

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
