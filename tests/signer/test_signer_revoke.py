"""Issue 9, item 3 (red team): revocation. The key source is the truth.

Before, a key deleted from its source kept signing until a new key activated and verifying for
the retention after that, because the ring kept keys the source no longer had. Now a key gone
from the source (a file deleted, a KV version destroyed or its metadata deleted, a Transit
version trimmed) is gone at the next poll and its tokens fail with `unknown_kid`; `Revoke` /
`svidgate signer revoke` deletes one from the source and the ring at once; a revoked active key
is replaced by a fresh key at once; an unreachable source is an error, never an empty one.
Real `svidgate signer serve` processes, real grpc.aio servers, a real OpenBao dev server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from signer_harness import (
    CLIENT_ID,
    BaoServer,
    Pki,
    SignerProcess,
    base_config,
    deep_merge,
    reason_of,
    rpc_error,
    running_signer,
    signer_pb2,
    tls_stub,
    unix_stub,
    vault_keys,
    wait_for,
    write_config,
)
from support.bao import bao_binary
from svidgate.signer import vault_policy
from svidgate.signer.server import SignerServer

# a fresh key would normally wait 40 s (prepare_ahead, >= poll_interval 250ms + clock_skew 30s +
# keys.vault.timeout 5s): revocation must not
TIMING = {"rotation": {"period": "1h", "prepare_ahead": "40s", "poll_interval": "250ms"}}
HEALTH_SOURCE = "svidgate.signer.v1.Signer.KeySource"
SETTLE = 5.0  # poll_interval + a few seconds: every deadline below (support.waiting)


def sign(subject: str = CLIENT_ID) -> signer_pb2.SignRequest:
    return signer_pb2.SignRequest(subject=subject, audience=["orders"])


def verify(token: str) -> signer_pb2.VerifyRequest:
    return signer_pb2.VerifyRequest(token=token, audience=["orders"])


async def verify_reason(stub: Any, token: str) -> str:
    """ "" when the token verifies, else the failure's reason code."""
    try:
        await stub.Verify(verify(token))
    except grpc.aio.AioRpcError as exc:
        return await reason_of(exc)
    return ""


async def kids(stub: Any) -> set[str]:
    jwks = await stub.GetJWKS(signer_pb2.GetJWKSRequest())
    return {k["kid"] for k in json.loads(jwks.jwks_json)["keys"]}


def svidgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svidgate.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def start_process(short_dir: Path, data: dict[str, Any]) -> tuple[SignerProcess, Path]:
    config = short_dir / "signer.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = SignerProcess(config, short_dir / "signer.log")
    await proc.start(short_dir / "s.sock")
    return proc, config


# -- the Revoke RPC and `svidgate signer revoke` ----------------------------------------------


async def test_revoke_rpc_and_cli(short_dir: Path) -> None:
    keys_dir = short_dir / "keys"
    data = deep_merge(base_config(short_dir / "s.sock", keys_dir), TIMING)
    proc, config = await start_process(short_dir, data)
    try:
        async with unix_stub(short_dir / "s.sock") as stub:
            old = await stub.Sign(sign())
            rotated = await stub.Rotate(signer_pb2.RotateRequest())  # prepared for 40 s
            watch = stub.WatchKeys(signer_pb2.WatchKeysRequest())
            assert old.kid in (await watch.read()).jwks_json

            revoked = await stub.Revoke(signer_pb2.RevokeRequest(kid=old.kid))
            fresh = revoked.active_kid
            assert revoked.revoked_kid == old.kid
            assert fresh not in ("", old.kid, rotated.prepared_kid)  # activated at once
            # at once: no poll, no prepare_ahead
            assert await verify_reason(stub, old.token) == "unknown_kid"
            assert await kids(stub) == {fresh, rotated.prepared_kid}
            now = await stub.Sign(sign())
            assert now.kid == fresh and await verify_reason(stub, now.token) == ""

            # the new key set is pushed to watchers
            async def pushed_without_old() -> bool:
                message = await asyncio.wait_for(watch.read(), SETTLE)
                return old.kid not in message.jwks_json

            await wait_for(pushed_without_old, SETTLE, "a WatchKeys push without the revoked kid")
            watch.cancel()
            # deleted from the source: the file is gone, state.json no longer names it
            assert not (keys_dir / f"{old.kid}.pem").exists()
            assert old.kid not in (keys_dir / "state.json").read_text()

            err = await rpc_error(stub.Revoke(signer_pb2.RevokeRequest(kid=old.kid)))
            assert err.code() == grpc.StatusCode.NOT_FOUND
            assert err.details().startswith(f"not_found: {old.kid} is not in file:")
            assert await reason_of(err) == "not_found"
            err = await rpc_error(stub.Revoke(signer_pb2.RevokeRequest(kid="../state.json")))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

        # the command: revoke the prepared key (the active one stays); --kid=KID because a kid
        # (base64url) may begin with "-", which argparse takes for an option in `--kid KID`
        done = svidgate(
            "signer", "revoke", "--config", str(config), f"--kid={rotated.prepared_kid}"
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout == f"revoked {rotated.prepared_kid} (active {fresh})\n"
        done = svidgate(
            "signer", "revoke", "--config", str(config), f"--kid={rotated.prepared_kid}"
        )
        assert done.returncode == 2 and done.stdout == ""
        assert done.stderr.startswith(
            f"svidgate: error: Revoke failed: not_found: {rotated.prepared_kid}"
        )
        async with unix_stub(short_dir / "s.sock") as stub:
            assert await kids(stub) == {fresh}
    finally:
        assert proc.stop() == 0
    log = (short_dir / "signer.log").read_text()
    assert f"key {old.kid} revoked" in log and f"key {fresh} appeared" in log
    assert "PRIVATE KEY" not in log


async def test_revoke_needs_authorization_rotate_over_tcp(pki: Pki, short_dir: Path) -> None:
    crt, key = pki.files("signer")
    data = deep_merge(
        base_config(short_dir / "s.sock", short_dir / "keys"),
        {
            "listen": {"tcp": "127.0.0.1:0"},
            "tls": {"cert": str(crt), "key": str(key), "bundle": str(pki.dir / "bundle.pem")},
        },
    )
    async with running_signer(write_config(short_dir, data)) as server:
        assert server.tcp_port
        kid = server.store.signing_kid()
        for name in ("client", "gateway", "minter", "stranger"):
            async with tls_stub(pki, name, server.tcp_port) as stub:
                err = await rpc_error(stub.Revoke(signer_pb2.RevokeRequest(kid=kid)))
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED, name
                assert err.details().endswith("may not call Revoke")
        assert server.store.signing_kid() == kid
        async with tls_stub(pki, "admin", server.tcp_port) as admin:
            reply = await admin.Revoke(signer_pb2.RevokeRequest(kid=kid))
        assert reply.revoked_kid == kid and reply.active_kid not in ("", kid)


# -- file source: the operator deletes a key ---------------------------------------------------


async def test_a_deleted_key_file_is_gone_at_the_next_poll(short_dir: Path) -> None:
    keys_dir = short_dir / "keys"
    data = deep_merge(base_config(short_dir / "s.sock", keys_dir), TIMING)
    proc, _ = await start_process(short_dir, data)
    try:
        async with (
            unix_stub(short_dir / "s.sock") as stub,
            grpc.aio.insecure_channel(f"unix:{short_dir / 's.sock'}") as channel,
        ):
            old = await stub.Sign(sign())
            (keys_dir / f"{old.kid}.pem").unlink()  # the operator revokes it

            async def gone() -> bool:
                return await verify_reason(stub, old.token) == "unknown_kid"

            await wait_for(gone, SETTLE, "the deleted key to stop verifying")
            # a fresh key signs at once (not prepare_ahead = 40 s later)
            await wait_for(lambda: _signs_with_other(stub, old.kid), SETTLE, "a fresh key")
            new = await stub.Sign(sign())
            assert new.kid != old.kid and old.kid not in await kids(stub)

            # a directory that vanishes is an error, not an empty source: the cache stays
            keys_dir.rename(short_dir / "keys.moved")
            health = health_pb2_grpc.HealthStub(channel)

            async def unhealthy() -> bool:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=HEALTH_SOURCE))
                return reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            await wait_for(unhealthy, SETTLE, "the key source to be reported down")
            assert await verify_reason(stub, new.token) == ""
            assert await kids(stub) == {new.kid}
            assert not keys_dir.exists()  # not re-created empty
            (short_dir / "keys.moved").rename(keys_dir)

            async def healthy() -> bool:
                return not await unhealthy()

            await wait_for(healthy, SETTLE, "the key source to recover")
            assert await kids(stub) == {new.kid}
    finally:
        assert proc.stop() == 0
    log = (short_dir / "signer.log").read_text()
    assert f"key {old.kid} is gone from the key source (revoked)" in log
    assert "the key directory is gone" in log


async def _signs_with_other(stub: Any, kid: str) -> bool:
    try:
        return bool((await stub.Sign(sign())).kid != kid)
    except grpc.aio.AioRpcError:
        return False


# -- vault-kv -----------------------------------------------------------------------------------


def token_file(bao: BaoServer, directory: Path, token: str | None = None) -> Path:
    path = directory / f"vault-token-{uuid.uuid4().hex[:6]}"
    path.write_text((token or bao.signer_token("1h")) + "\n")
    path.chmod(0o600)
    return path


def kv_versions(bao: BaoServer, kv_path: str) -> dict[str, dict[str, Any]]:
    return dict(bao.api("GET", f"secret/metadata/{kv_path}")["data"]["versions"])


def bao_cli(bao: BaoServer, *args: str) -> None:
    """Run the `bao` CLI as an operator would (root token)."""
    env = {**os.environ, "BAO_ADDR": bao.address, "BAO_TOKEN": bao.root_token}
    done = subprocess.run(
        [bao_binary(), *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr


async def test_kv_revoke_reaches_every_replica(bao: BaoServer, short_dir: Path) -> None:
    keys = vault_keys(bao, "vault-kv", "ES256", token_file(bao, short_dir))
    kv_path = keys["vault"]["kv_path"]
    configs = [
        write_config(
            short_dir,
            deep_merge(base_config(short_dir / f"{n}.sock", short_dir), {"keys": keys, **TIMING}),
        )
        for n in ("a", "b")
    ]
    a, b = SignerServer(configs[0]), SignerServer(configs[1])
    await asyncio.gather(a.start(), b.start())
    try:
        await wait_for(lambda: a.store.can_sign and b.store.can_sign, 10, "both ready")
        await wait_for(lambda: a.store.jwks_json == b.store.jwks_json, 5, "same key ring")
        async with unix_stub(short_dir / "a.sock") as sa, unix_stub(short_dir / "b.sock") as sb:
            old = await sb.Sign(sign())
            assert await verify_reason(sa, old.token) == ""
            reply = await sa.Revoke(signer_pb2.RevokeRequest(kid=old.kid))
            assert await verify_reason(sa, old.token) == "unknown_kid"  # at once on a

            async def b_forgets() -> bool:
                return await verify_reason(sb, old.token) == "unknown_kid"

            await wait_for(b_forgets, SETTLE, "replica b to drop the revoked kid")
            # b signs with a's fresh key and creates none of its own
            await wait_for(lambda: _signs_with(sb, reply.active_kid), SETTLE, "b to sign with it")
        versions = kv_versions(bao, kv_path)
        assert [v["destroyed"] for _, v in sorted(versions.items())] == [True, False]
    finally:
        await asyncio.gather(a.stop(grace=0.1), b.stop(grace=0.1))


async def _signs_with(stub: Any, kid: str) -> bool:
    try:
        return bool((await stub.Sign(sign())).kid == kid)
    except grpc.aio.AioRpcError:
        return False


async def test_kv_operator_destroy_and_metadata_delete(bao: BaoServer, short_dir: Path) -> None:
    keys = vault_keys(bao, "vault-kv", "ES256", token_file(bao, short_dir))
    kv_path = keys["vault"]["kv_path"]
    data = deep_merge(base_config(short_dir / "s.sock", short_dir), {"keys": keys, **TIMING})
    proc, _ = await start_process(short_dir, data)
    try:
        async with unix_stub(short_dir / "s.sock") as stub:
            first = await stub.Sign(sign())
            bao_cli(bao, "kv", "destroy", "-mount=secret", "-versions=1", kv_path)

            async def first_gone() -> bool:
                return await verify_reason(stub, first.token) == "unknown_kid"

            await wait_for(first_gone, SETTLE, "the destroyed version's key to stop verifying")
            await wait_for(
                lambda: _signs_with_other(stub, first.kid), SETTLE, "a fresh key at once"
            )
            second = await stub.Sign(sign())
            assert await kids(stub) == {second.kid}
            # a soft delete counts too (the version's deletion time has passed)
            bao_cli(bao, "kv", "delete", "-mount=secret", "-versions=2", kv_path)

            async def second_gone() -> bool:
                return await verify_reason(stub, second.token) == "unknown_kid"

            await wait_for(second_gone, SETTLE, "the deleted version's key to stop verifying")
            await wait_for(
                lambda: _signs_with_other(stub, second.kid), SETTLE, "a fresh key at once"
            )
            third = await stub.Sign(sign())
            assert third.kid not in (first.kid, second.kid)
            # the whole secret deleted: no key is left, a new one is bootstrapped
            bao_cli(bao, "kv", "metadata", "delete", "-mount=secret", kv_path)

            async def third_gone() -> bool:
                return await verify_reason(stub, third.token) == "unknown_kid"

            await wait_for(third_gone, SETTLE, "every key to be gone with the metadata")
            await wait_for(lambda: _signs_with_other(stub, third.kid), SETTLE, "a bootstrapped key")
    finally:
        assert proc.stop() == 0
    log = (short_dir / "signer.log").read_text()
    for kid in (first.kid, second.kid, third.kid):
        assert f"key {kid} is gone from the key source (revoked)" in log


async def test_kv_mount_gone_is_an_error_not_an_empty_source(
    bao: BaoServer, short_dir: Path
) -> None:
    """A 404 that names a missing route is an error: the cached keys stay in use."""
    mount = f"kv-{uuid.uuid4().hex[:8]}"
    bao.api("POST", f"sys/mounts/{mount}", {"type": "kv", "options": {"version": "2"}})
    keys = vault_keys(bao, "vault-kv", "ES256", token_file(bao, short_dir, bao.root_token))
    keys["vault"]["kv_mount"] = mount
    cfg = write_config(
        short_dir,
        deep_merge(base_config(short_dir / "s.sock", short_dir), {"keys": keys, **TIMING}),
    )
    async with running_signer(cfg) as server, unix_stub(short_dir / "s.sock") as stub:
        signed = await stub.Sign(sign())
        bao.api("DELETE", f"sys/mounts/{mount}")
        await wait_for(lambda: not server.store.source_healthy, SETTLE, "the source error")
        assert "no handler for route" in (server.store.last_error or "")
        assert await verify_reason(stub, signed.token) == ""
        assert await kids(stub) == {signed.kid}


# -- vault-transit ------------------------------------------------------------------------------


def transit_data(bao: BaoServer, name: str) -> dict[str, Any]:
    return dict(bao.api("GET", f"transit/keys/{name}")["data"])


async def test_transit_revoke_and_operator_trim(bao: BaoServer, short_dir: Path) -> None:
    keys = vault_keys(bao, "vault-transit", "ES256", token_file(bao, short_dir))
    name = keys["vault"]["transit_key"]
    cfg = write_config(
        short_dir,
        deep_merge(base_config(short_dir / "s.sock", short_dir), {"keys": keys, **TIMING}),
    )
    async with running_signer(cfg), unix_stub(short_dir / "s.sock") as stub:
        v1 = await stub.Sign(sign())
        v2 = (await stub.Rotate(signer_pb2.RotateRequest())).prepared_kid  # prepared for 40 s
        # Transit drops versions from the oldest end only: v2 has a published older version
        err = await rpc_error(stub.Revoke(signer_pb2.RevokeRequest(kid=v2)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details().startswith("failed_precondition: vault-transit:")
        assert f"({v1.kid}); revoke those first" in err.details()
        assert transit_data(bao, name)["latest_version"] == 2

        # revoking the active, oldest version: trimmed; v2 is now the oldest and active at once
        reply = await stub.Revoke(signer_pb2.RevokeRequest(kid=v1.kid))
        assert (reply.revoked_kid, reply.active_kid) == (v1.kid, v2)
        assert await verify_reason(stub, v1.token) == "unknown_kid"
        data = transit_data(bao, name)
        assert set(data["keys"]) == {"2"} and data["min_available_version"] == 2
        t2 = await stub.Sign(sign())
        assert t2.kid == v2

        # revoking the newest version: a fresh version is rotated in and takes over at once
        reply = await stub.Revoke(signer_pb2.RevokeRequest(kid=v2))
        assert reply.active_kid not in ("", v2)
        assert await verify_reason(stub, t2.token) == "unknown_kid"
        assert set(transit_data(bao, name)["keys"]) == {"3"}
        t3 = await stub.Sign(sign())
        assert t3.kid == reply.active_kid

        # the operator trims in Vault: archived versions are gone at the next poll
        v4 = (await stub.Rotate(signer_pb2.RotateRequest())).prepared_kid
        bao_cli(
            bao,
            "write",
            f"transit/keys/{name}/config",
            "min_decryption_version=4",
            "min_encryption_version=4",
        )

        async def v3_gone() -> bool:
            return await verify_reason(stub, t3.token) == "unknown_kid"

        await wait_for(v3_gone, SETTLE, "the archived version to stop verifying")
        await wait_for(lambda: _signs_with(stub, v4), SETTLE, "v4, now the oldest, to sign at once")


async def test_transit_revoke_under_the_least_privilege_policy(
    bao: BaoServer, short_dir: Path
) -> None:
    """The default policy may not trim: Revoke says what the operator must run and changes
    nothing in Vault (no stray version); with the optional policy paths it does the job."""
    unique = uuid.uuid4().hex[:8]
    name = f"svidgate-{unique}"
    hcl = vault_policy.signer_policy_hcl(
        kv_mount="secret",
        kv_path=f"svidgate/lp-{unique}",
        transit_mount="transit",
        transit_key=name,
    )
    bao.api("PUT", f"sys/policies/acl/lp-{unique}", {"policy": hcl})
    token = bao.api(
        "POST", "auth/token/create", {"policies": [f"lp-{unique}"], "no_default_policy": True}
    )["auth"]["client_token"]
    keys = vault_keys(bao, "vault-transit", "ES256", token_file(bao, short_dir, token))
    keys["vault"]["transit_key"] = name
    cfg = write_config(
        short_dir,
        deep_merge(base_config(short_dir / "s.sock", short_dir), {"keys": keys, **TIMING}),
    )
    async with running_signer(cfg), unix_stub(short_dir / "s.sock") as stub:
        signed = await stub.Sign(sign())
        err = await rpc_error(stub.Revoke(signer_pb2.RevokeRequest(kid=signed.kid)))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"bao write -f transit/keys/{name}/rotate" in err.details()
        assert "min_decryption_version=2 min_encryption_version=2" in err.details()
        assert f"bao write transit/keys/{name}/trim min_available_version=2" in err.details()
        assert transit_data(bao, name)["latest_version"] == 1
        assert await verify_reason(stub, signed.token) == ""
        # the optional policy paths are enough to let the signer do it itself
        hcl = vault_policy.signer_policy_hcl(
            kv_mount="secret",
            kv_path=f"svidgate/lp-{unique}",
            transit_mount="transit",
            transit_key=name,
            transit_revoke=True,
        )
        bao.api("PUT", f"sys/policies/acl/lp-{unique}", {"policy": hcl})
        reply = await stub.Revoke(signer_pb2.RevokeRequest(kid=signed.kid))
        assert reply.active_kid not in ("", signed.kid)
        assert await verify_reason(stub, signed.token) == "unknown_kid"
        assert set(transit_data(bao, name)["keys"]) == {"2"}
