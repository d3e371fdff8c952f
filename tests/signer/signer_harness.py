"""Signer test harness: test identities, config files, an in-process grpc.aio signer and gRPC
clients over the Unix socket and mTLS."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from svidgate.pki.ca import CertificateAuthority
from svidgate.signer.config import SignerConfig, load_config
from svidgate.signer.server import SignerServer
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bao_server import BaoServer, bao_server

SERVICE = "svidgate.signer.v1.Signer"
TD = "example.org"
ISSUER = f"spiffe://{TD}/signer"
SIGNER_ID = f"spiffe://{TD}/signer"
GATEWAY_ID = f"spiffe://{TD}/gateway"
CLIENT_ID = f"spiffe://{TD}/ns/shop/sa/web"
ADMIN_ID = f"spiffe://{TD}/admin"
MINTER_ID = f"spiffe://{TD}/minter"
STRANGER_ID = f"spiffe://{TD}/stranger"


@dataclass
class Pki:
    dir: Path
    ca: CertificateAuthority

    def files(self, name: str) -> tuple[Path, Path]:
        return self.dir / f"{name}.crt", self.dir / f"{name}.key"

    def client_credentials(self, name: str) -> grpc.ChannelCredentials:
        crt, key = self.files(name)
        return grpc.ssl_channel_credentials(
            root_certificates=(self.dir / "bundle.pem").read_bytes(),
            private_key=key.read_bytes(),
            certificate_chain=crt.read_bytes(),
        )


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def base_config(socket: Path, keys_dir: Path) -> dict[str, Any]:
    return {
        "trust_domain": TD,
        "issuer": ISSUER,
        "listen": {"unix": str(socket)},
        "authorization": {
            "verify": [GATEWAY_ID],
            "sign": [f"spiffe://{TD}/ns/**", MINTER_ID],
            "rotate": [ADMIN_ID],
            "sign_for_others": [MINTER_ID],
        },
        "keys": {"source": "file", "algorithm": "ES256", "dir": str(keys_dir)},
        "tokens": {"default_ttl": "5m", "max_ttl": "15m", "clock_skew": "30s"},
        "rotation": {"period": "24h", "prepare_ahead": "10m", "poll_interval": "10s"},
    }


def vault_keys(
    bao: BaoServer, source: str, algorithm: str, token_file: Path, **auth: Any
) -> dict[str, Any]:
    """A keys: section for a fresh, test-private KV path / transit key."""
    unique = uuid.uuid4().hex[:10]
    return {
        "source": source,
        "algorithm": algorithm,
        "vault": {
            "address": bao.address,
            "auth": auth or {"method": "token", "token_file": str(token_file)},
            "kv_path": f"svidgate/keys-{unique}",
            "transit_key": f"svidgate-{unique}",
        },
    }


def write_config(directory: Path, data: dict[str, Any]) -> SignerConfig:
    path = directory / f"signer-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


async def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.asynccontextmanager
async def running_signer(cfg: SignerConfig) -> AsyncIterator[SignerServer]:
    server = SignerServer(cfg)
    await server.start()
    try:
        await wait_for(lambda: server.store.can_sign, what="the signer's first key")
        yield server
    finally:
        await server.stop(grace=0.2)


@contextlib.asynccontextmanager
async def unix_stub(path: Path) -> AsyncIterator[signer_pb2_grpc.SignerStub]:
    async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
        yield signer_pb2_grpc.SignerStub(channel)


@contextlib.asynccontextmanager
async def tls_stub(pki: Pki, name: str, port: int) -> AsyncIterator[signer_pb2_grpc.SignerStub]:
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", pki.client_credentials(name), options=options
    ) as channel:
        yield signer_pb2_grpc.SignerStub(channel)


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    """Await ``call`` and return the AioRpcError it must raise."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the RPC succeeded but should have failed")


async def reason_of(exc: grpc.aio.AioRpcError) -> str:
    trailing = exc.trailing_metadata() or ()
    return dict(trailing).get("svidgate-reason", "")  # type: ignore[arg-type]


__all__ = [
    "ADMIN_ID",
    "CLIENT_ID",
    "GATEWAY_ID",
    "ISSUER",
    "MINTER_ID",
    "SIGNER_ID",
    "STRANGER_ID",
    "TD",
    "BaoServer",
    "Pki",
    "SignerProcess",
    "bao_server",
    "base_config",
    "deep_merge",
    "reason_of",
    "rpc_error",
    "running_signer",
    "signer_pb2",
    "tls_stub",
    "unix_stub",
    "vault_keys",
    "wait_for",
    "write_config",
]


class SignerProcess:
    """``svidgate signer serve --config PATH`` as a real child process."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, socket: Path, timeout: float = 20.0) -> None:
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
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            if socket.exists():
                async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
                    health = health_pb2_grpc.HealthStub(channel)
                    try:
                        reply = await health.Check(
                            health_pb2.HealthCheckRequest(service=f"{SERVICE}.Sign"), timeout=1
                        )
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            return
                    except grpc.aio.AioRpcError:
                        pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"signer did not become ready: {self.log.read_text()[-3000:]}")

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait, return the exit code (a graceful shutdown returns 0)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return int(self.proc.returncode)
