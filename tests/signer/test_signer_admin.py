"""The signer's admin listener (``admin_listen``, plain HTTP) on a real ``svidgate signer serve``
process with keys in a real OpenBao: /healthz, /readyz (an active key and a serving key
source), /metrics (RPCs by method and code, tokens issued, rotations, key-source errors, active
key age); the listener's connection bound."""

from __future__ import annotations

import asyncio
import re
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from signer_harness import BaoServer, base_config, deep_merge, vault_keys
from support.ports import free_port
from support.signer_process import SignerProcess
from support.waiting import wait_for
from svidgate.signer.v1 import signer_pb2

from svidgate.admin_http import MAX_CONNECTIONS

# prepare_ahead 2s >= poll_interval 500ms + clock_skew 500ms + keys.vault.timeout 1s
TIMING = {
    "tokens": {"default_ttl": "5m", "max_ttl": "15m", "clock_skew": "500ms"},
    "rotation": {"period": "24h", "prepare_ahead": "2s", "poll_interval": "500ms"},
}


async def _get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


def _sample(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.split("{")[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if found == labels:
            return float(value)
    return None


def _signer(
    bao: BaoServer, short_dir: Path, make: Callable[..., SignerProcess], admin: int
) -> SignerProcess:
    token_file = short_dir / "vault-token"
    token_file.write_text(bao.signer_token(token_id=f"signer-{uuid.uuid4().hex}"))
    token_file.chmod(0o600)
    keys = vault_keys(bao, "vault-kv", "ES256", token_file)
    keys["vault"]["timeout"] = "1s"
    sock = short_dir / "s.sock"
    extra: dict[str, Any] = {"keys": keys, **TIMING, "admin_listen": f"127.0.0.1:{admin}"}
    config = short_dir / "signer.yaml"
    config.write_text(yaml.safe_dump(deep_merge(base_config(sock, short_dir), extra)))
    return make(config, short_dir / "signer.log")


async def test_probes_and_metrics_of_a_real_signer(
    bao: BaoServer, short_dir: Path, signer_process: Callable[..., SignerProcess]
) -> None:
    admin = free_port()
    signer = _signer(bao, short_dir, signer_process, admin)
    await signer.start()
    assert await _get(admin, "/healthz") == (200, '{"status": "ok"}')
    status, body = await _get(admin, "/readyz")
    assert status == 200 and '"ready"' in body

    for _ in range(3):
        await signer.sign_async()
    with pytest.raises(grpc.RpcError) as refused:  # an invalid subject: INVALID_ARGUMENT
        await asyncio.to_thread(
            signer.call, "Sign", signer_pb2.SignRequest(subject="not-an-id", audience=["a"])
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _, text = await _get(admin, "/metrics")
    assert _sample(text, "svidgate_signer_rpc_total", method="Sign", code="OK") == 3
    assert _sample(text, "svidgate_signer_rpc_total", method="Sign", code="INVALID_ARGUMENT") == 1
    assert _sample(text, "svidgate_signer_tokens_issued_total") == 3
    assert _sample(text, "svidgate_signer_key_source_errors_total") == 0
    assert _sample(text, "svidgate_signer_key_rotations_total") == 0
    age = _sample(text, "svidgate_signer_active_key_age_seconds")
    assert age is not None and 0 <= age < 600
    assert _sample(text, "process_resident_memory_bytes") is not None

    first = (await asyncio.to_thread(signer.rotate)).active_kid

    async def rotated() -> bool:
        _, now = await _get(admin, "/metrics")
        return _sample(now, "svidgate_signer_key_rotations_total") == 1

    await wait_for(rotated, 15, "the prepared key to become active and be counted")
    _, text = await _get(admin, "/metrics")
    assert _sample(text, "svidgate_signer_rpc_total", method="Rotate", code="OK") == 1
    assert (await signer.sign_reply_async()).kid != first
    assert signer.stop() == 0


async def test_readyz_follows_the_key_source(
    short_dir: Path, signer_process: Callable[..., SignerProcess]
) -> None:
    """A signer on an OpenBao of its own: stopped, the key source fails (errors counted,
    /readyz 503 key_source_unavailable, /healthz still 200)."""
    admin = free_port()
    with BaoServer() as own:
        own.setup_signer()
        signer = _signer(own, short_dir, signer_process, admin)
        await signer.start()
        assert (await _get(admin, "/readyz"))[0] == 200
        own.stop()

        async def unavailable() -> bool:
            status, body = await _get(admin, "/readyz")
            return status == 503 and "key_source_unavailable" in body

        await wait_for(unavailable, 15, "/readyz to report the key source down")
        assert (await _get(admin, "/healthz"))[0] == 200
        _, text = await _get(admin, "/metrics")
        errors = _sample(text, "svidgate_signer_key_source_errors_total")
        assert errors is not None and errors >= 1
        signer.stop()


async def test_admin_listener_is_bounded(
    bao: BaoServer, short_dir: Path, signer_process: Callable[..., SignerProcess]
) -> None:
    admin = free_port()
    signer = _signer(bao, short_dir, signer_process, admin)
    await signer.start()
    idle = [socket.create_connection(("127.0.0.1", admin)) for _ in range(MAX_CONNECTIONS)]
    try:
        await asyncio.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", admin), timeout=5)
        extra.settimeout(5)
        try:
            assert extra.recv(1) == b""  # closed at once: the limit is reached
        except ConnectionResetError:
            pass
        finally:
            extra.close()
    finally:
        for s in idle:
            s.close()

    async def served() -> bool:
        try:
            return (await _get(admin, "/healthz"))[0] == 200
        except aiohttp.ClientError:
            return False

    await wait_for(served, 10, "the admin listener to serve again once connections closed")
    signer.stop()
