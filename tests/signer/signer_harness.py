"""Signer test harness: config files, an in-process grpc.aio signer and gRPC clients over the
Unix socket and mTLS. Identities, the PKI, the signer child process and waiting come from the
shared tests/support/ modules and are re-exported here for the signer tests."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import yaml
from support.bao import BaoServer
from support.pki import (
    ADMIN_ID,
    CLIENT_ID,
    GATEWAY_ID,
    MINTER_ID,
    SIGNER_ID,
    STRANGER_ID,
    TD,
    Pki,
)
from support.signer_process import SignerProcess, deep_merge
from support.waiting import wait_for
from svidgate.signer.config import SignerConfig, load_config
from svidgate.signer.keystore import Clock
from svidgate.signer.server import SignerServer
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc

ISSUER = SIGNER_ID


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


@contextlib.asynccontextmanager
async def running_signer(
    cfg: SignerConfig, *, clock: Clock | None = None
) -> AsyncIterator[SignerServer]:
    """An in-process signer, yielded once it can sign. ``clock`` replaces the key store's clock
    (KeyStore's injectable clock; SignerServer does not take one itself)."""
    server = SignerServer(cfg)
    if clock is not None:
        server.store.clock = clock
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
