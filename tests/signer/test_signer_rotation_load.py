"""Rotation under load: a real signer process on vault-kv, a client running Sign+Verify
continuously (thousands of operations) while 5 rotations happen — zero failures; tokens from
before each rotation verify until they expire, then `unknown_kid` once their key is removed."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from signer_harness import (
    CLIENT_ID,
    BaoServer,
    SignerProcess,
    base_config,
    deep_merge,
    reason_of,
    rpc_error,
    signer_pb2,
    unix_stub,
    vault_keys,
    wait_for,
)

# max_ttl 2s + clock_skew 1s + poll_interval 200ms = retain 3.2s; prepare_ahead 3s (the safety
# rule: >= poll_interval 200ms + clock_skew 1s + keys.vault.timeout 1500ms)
TIMING = {
    "tokens": {"default_ttl": "2s", "max_ttl": "2s", "clock_skew": "1s"},
    "rotation": {"period": "1h", "prepare_ahead": "3s", "poll_interval": "200ms"},
}
VAULT_TIMEOUT = "1500ms"
ROTATIONS = 5
MIN_OPS = 3000
WORKERS = 16


async def test_rotation_under_load(
    bao: BaoServer, short_dir: Path, signer_process: Callable[..., SignerProcess]
) -> None:
    token_file = short_dir / "vault-token"
    token_file.write_text(bao.signer_token())
    token_file.chmod(0o600)  # credential files must be owner-only
    sock = short_dir / "s.sock"
    keys = vault_keys(bao, "vault-kv", "ES256", token_file)
    keys["vault"]["timeout"] = VAULT_TIMEOUT
    config = short_dir / "signer.yaml"

    config.write_text(
        yaml.safe_dump(deep_merge(base_config(sock, short_dir), {"keys": keys, **TIMING}))
    )
    proc = signer_process(config, short_dir / "signer.log")
    await proc.start(sock)
    try:
        async with unix_stub(sock) as stub:
            await run_scenario(stub)
    finally:
        assert proc.stop() == 0, (short_dir / "signer.log").read_text()[-3000:]
    assert not sock.exists()


async def run_scenario(s: Any) -> None:
    """``s`` is a grpc.aio SignerStub (generated stubs are untyped)."""
    failures: list[str] = []
    ops = 0
    kids_seen: set[str] = set()
    saved: list[signer_pb2.SignResponse] = []  # one token signed just before each rotation
    saved_checks = 0
    stop = asyncio.Event()

    async def worker() -> None:
        nonlocal ops
        while not stop.is_set():
            try:
                signed = await s.Sign(
                    signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"]), timeout=5
                )
                await s.Verify(
                    signer_pb2.VerifyRequest(
                        token=signed.token, audience=["orders"], expected_subject=CLIENT_ID
                    ),
                    timeout=5,
                )
                kids_seen.add(signed.kid)
                ops += 2
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code()}: {exc.details()}")

    async def check_saved() -> None:
        """Every saved token keeps verifying while it has not expired."""
        nonlocal saved_checks
        while not stop.is_set():
            for token in list(saved):
                if time.time() < token.expires_at - 0.3:
                    try:
                        await s.Verify(
                            signer_pb2.VerifyRequest(token=token.token, audience=["orders"]),
                            timeout=5,
                        )
                        saved_checks += 1
                    except grpc.aio.AioRpcError as exc:
                        failures.append(f"saved token {token.kid}: {exc.details()}")
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(worker()) for _ in range(WORKERS)]
    tasks.append(asyncio.create_task(check_saved()))
    rotated: list[str] = []
    try:
        await wait_for(lambda: ops > 0 or bool(failures), 10, "the workers' first operations")
        for _ in range(ROTATIONS):
            before = await s.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"]))
            saved.append(before)
            reply = await s.Rotate(signer_pb2.RotateRequest())
            rotated.append(reply.prepared_kid)
            # the prepared key activates prepare_ahead (3 s) later: rotate again once the
            # workers' tokens carry it
            kid = reply.prepared_kid
            await wait_for(lambda kid=kid: kid in kids_seen, 10, f"{kid} to sign")
        await wait_for(lambda: ops >= MIN_OPS, 60, f"{MIN_OPS} operations", interval=0.1)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    print(f"rotation under load: {ops} operations, {len(kids_seen)} keys, 0 failures")
    assert failures == [], failures[:5]
    assert ops >= MIN_OPS
    assert saved_checks >= ROTATIONS
    # every key took its turn: the bootstrap key and the 5 rotated ones all signed
    assert set(rotated) <= kids_seen and len(kids_seen) == ROTATIONS + 1
    assert len({t.kid for t in saved}) == ROTATIONS
    # the last old key retires when the 5th prepared key activates and is removed retain
    # (3.2 s) later, which the key set pushed over WatchKeys shows; then every saved token fails
    # with unknown_kid (not expired: the key lookup comes first and the key is gone)
    await until_only_key(s, rotated[-1])
    for token in saved:
        err = await rpc_error(
            s.Verify(signer_pb2.VerifyRequest(token=token.token, audience=["orders"]))
        )
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert await reason_of(err) == "unknown_kid", err.details()
    jwks = await s.GetJWKS(signer_pb2.GetJWKSRequest())
    assert [k["kid"] for k in json.loads(jwks.jwks_json)["keys"]] == [rotated[-1]]


async def until_only_key(s: Any, kid: str, timeout: float = 15.0) -> None:
    """Follow WatchKeys until the published key set is exactly ``kid``."""
    stream = s.WatchKeys(signer_pb2.WatchKeysRequest(after_sequence=0), timeout=timeout)
    try:
        async for update in stream:
            if [k["kid"] for k in json.loads(update.jwks_json)["keys"]] == [kid]:
                return
    finally:
        stream.cancel()
    raise AssertionError(f"the key set never came down to {kid}")
