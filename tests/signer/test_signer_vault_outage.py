"""Vault stopped mid-run: verification goes on from the cached ring, health reports the degraded
parts, signing continues until the cached key's window runs out; Vault restarted (dev mode: data
lost, setup re-run): signing and rotation resume by themselves."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from signer_harness import (
    CLIENT_ID,
    BaoServer,
    base_config,
    deep_merge,
    reason_of,
    rpc_error,
    running_signer,
    signer_pb2,
    unix_stub,
    vault_keys,
    wait_for,
    write_config,
)
from support.clock import JumpClock

# retain = 2s + 1s + 200ms = 3.2s; a stale ring may sign until synced_at + 3 + 3.2 - 1 s
STALE_SIGNING = timedelta(seconds=3 + 3.2)  # more than that window: the clock jumps past it
# prepare_ahead 3s >= poll_interval 200ms + clock_skew 1s + keys.vault.timeout 1500ms
TIMING = {
    "tokens": {"default_ttl": "2s", "max_ttl": "2s", "clock_skew": "1s"},
    "rotation": {"period": "1h", "prepare_ahead": "3s", "poll_interval": "200ms"},
}
VAULT_TIMEOUT = "1500ms"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health_of(channel: grpc.aio.Channel, name: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=name)
    )
    return int(reply.status)


async def until_health(channel: grpc.aio.Channel, name: str, status: int) -> None:
    """Wait until the signer's health loop (0.1 s period) reports ``status`` for ``name``."""

    async def reached() -> bool:
        return await health_of(channel, name) == status

    await wait_for(reached, 5, f"health of {name or 'the server'} to be {status}")


async def test_vault_outage_and_recovery(short_dir: Path) -> None:
    token_id = f"signer-{uuid.uuid4().hex}"
    with BaoServer() as bao:
        bao.setup_signer()
        token_file = short_dir / "vault-token"
        token_file.write_text(bao.signer_token(token_id=token_id))
        token_file.chmod(0o600)  # credential files must be owner-only
        keys = vault_keys(bao, "vault-kv", "ES256", token_file)
        keys["vault"]["timeout"] = VAULT_TIMEOUT
        sock = short_dir / "s.sock"
        data = deep_merge(base_config(sock, short_dir), {"keys": keys, **TIMING})
        cfg = write_config(short_dir, data)
        clock = JumpClock()
        async with (
            running_signer(cfg, clock=clock) as server,
            unix_stub(sock) as stub,
            grpc.aio.insecure_channel(f"unix:{sock}") as channel,
        ):
            store = server.store
            before = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))

            bao.stop()
            await wait_for(lambda: not store.source_healthy, 5, "outage noticed")
            # verification goes on from the cache; readiness shows what is degraded
            await stub.Verify(signer_pb2.VerifyRequest(token=before.token, audience=["a"]))
            await until_health(channel, "svidgate.signer.v1.Signer.KeySource", NOT_SERVING)
            assert await health_of(channel, "") == SERVING
            assert await health_of(channel, "svidgate.signer.v1.Signer.KeySource") == NOT_SERVING
            err = await rpc_error(stub.Rotate(signer_pb2.RotateRequest()))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert await reason_of(err) == "source_unavailable"
            # signing continues from the cached key while its window allows …
            during = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))
            assert during.kid == before.kid
            await stub.Verify(signer_pb2.VerifyRequest(token=during.token, audience=["a"]))
            # … and stops when a token could outlive the key (stale ring, no Vault): the store's
            # clock jumps past the window instead of the test waiting it out
            clock.jump(STALE_SIGNING)
            store.wake()
            await wait_for(lambda: not store.can_sign, 5, "signing window to run out")
            err = await rpc_error(
                stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert await reason_of(err) == "signing_unavailable"
            await until_health(channel, "svidgate.signer.v1.Signer.Sign", NOT_SERVING)
            assert await health_of(channel, "svidgate.signer.v1.Signer.Sign") == NOT_SERVING
            assert await health_of(channel, "") == SERVING
            assert store.ring is not None and store.ring.keys  # nothing was dropped

            bao.start()  # same port; dev mode lost everything: set up again
            bao.setup_signer()
            bao.signer_token(token_id=token_id)
            await wait_for(lambda: store.source_healthy and store.can_sign, 10, "recovery")

            # the emptied KV path gets a new key, published before it signs; the cached key
            # keeps signing until then
            def active_kid() -> str:
                assert store.ring is not None
                found = store.ring.active(store.clock())
                return found.kid if found is not None else ""

            await wait_for(lambda: active_kid() != before.kid, 5, "the new key's activation")
            after = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))
            assert after.kid != before.kid
            await stub.Verify(signer_pb2.VerifyRequest(token=after.token, audience=["a"]))
            rotated = await stub.Rotate(signer_pb2.RotateRequest())
            assert rotated.active_kid == after.kid and rotated.prepared_kid
            await until_health(channel, "svidgate.signer.v1.Signer.KeySource", SERVING)
            await until_health(channel, "svidgate.signer.v1.Signer.Sign", SERVING)
            assert await health_of(channel, "svidgate.signer.v1.Signer.KeySource") == SERVING
            assert await health_of(channel, "svidgate.signer.v1.Signer.Sign") == SERVING
