"""Vault / OpenBao key sources against a real `bao server -dev`: Sign→Verify per algorithm and
source, least-privilege token, two replicas converging, AppRole login and token renewal."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from signer_harness import (
    CLIENT_ID,
    BaoServer,
    Pki,
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
from support.waiting import sleep_until
from svidgate.pki.jose import ALGORITHMS
from svidgate.signer.config import VaultConfig
from svidgate.signer.errors import KeySourceError, SourceConflictError
from svidgate.signer.rotation import Action, NewKeyPlan
from svidgate.signer.server import SignerServer
from svidgate.signer.sources.vault_kv import VaultKvKeySource
from svidgate.signer.vault import VaultClient


def token_dead(bao: BaoServer, accessor: str) -> bool:
    """True once OpenBao no longer knows the token (expired at its max TTL and revoked)."""
    try:
        bao.api("POST", "auth/token/lookup-accessor", {"accessor": accessor})
    except RuntimeError:
        return True
    return False


def token_file(bao: BaoServer, directory: Path) -> Path:
    path = directory / "vault-token"
    path.write_text(bao.signer_token("1h") + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("source", ["vault-kv", "vault-transit"])
@pytest.mark.parametrize("alg", ALGORITHMS)
async def test_sign_verify_per_source_and_algorithm(
    bao: BaoServer, short_dir: Path, source: str, alg: str
) -> None:
    sock = short_dir / "s.sock"
    keys = vault_keys(bao, source, alg, token_file(bao, short_dir))
    cfg = write_config(short_dir, deep_merge(base_config(sock, short_dir), {"keys": keys}))
    async with running_signer(cfg), unix_stub(sock) as stub:
        signed = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"]))
        verified = await stub.Verify(
            signer_pb2.VerifyRequest(token=signed.token, audience=["orders"])
        )
        assert verified.subject == CLIENT_ID and verified.kid == signed.kid
        rotated = await stub.Rotate(signer_pb2.RotateRequest())
        assert rotated.prepared_kid not in ("", rotated.active_kid)
        jwks = json.loads((await stub.GetJWKS(signer_pb2.GetJWKSRequest())).jwks_json)
        assert {k["kid"] for k in jwks["keys"]} == {rotated.prepared_kid, rotated.active_kid}
        assert all(k["alg"] == alg for k in jwks["keys"])
    if source == "vault-kv":
        meta = bao.api("GET", f"secret/metadata/{keys['vault']['kv_path']}")["data"]
        assert meta["current_version"] == 2  # one version per key, written with CAS
    else:
        data = bao.api("GET", f"transit/keys/{keys['vault']['transit_key']}")["data"]
        assert data["latest_version"] == 2 and data["exportable"] is False


async def test_two_replicas_converge(bao: BaoServer, short_dir: Path) -> None:
    tokens = token_file(bao, short_dir)
    keys = vault_keys(bao, "vault-kv", "ES256", tokens)
    keys["vault"]["timeout"] = "2s"
    # prepare_ahead 3s >= poll_interval 250ms + clock_skew 500ms + keys.vault.timeout 2s
    timing = {
        "tokens": {"clock_skew": "500ms"},
        "rotation": {"period": "1h", "prepare_ahead": "3s", "poll_interval": "250ms"},
    }
    configs = [
        write_config(
            short_dir,
            deep_merge(base_config(short_dir / f"{n}.sock", short_dir), {"keys": keys, **timing}),
        )
        for n in ("a", "b")
    ]
    a, b = SignerServer(configs[0]), SignerServer(configs[1])
    await asyncio.gather(a.start(), b.start())  # both race to bootstrap the empty path
    try:
        await wait_for(lambda: a.store.can_sign and b.store.can_sign, 10, "both ready")
        await wait_for(lambda: a.store.jwks_json == b.store.jwks_json, 5, "same key ring")
        assert len(json.loads(a.store.jwks_json)["keys"]) == 1
        async with unix_stub(short_dir / "a.sock") as sa, unix_stub(short_dir / "b.sock") as sb:
            await converge(a, b, sa, sb)
    finally:
        await asyncio.gather(a.stop(grace=0.1), b.stop(grace=0.1))
    meta = bao.api("GET", f"secret/metadata/{keys['vault']['kv_path']}")["data"]
    assert meta["current_version"] == 2  # check-and-set: one bootstrap, one rotation


async def converge(a: SignerServer, b: SignerServer, sa: Any, sb: Any) -> None:
    rotated = await sa.Rotate(signer_pb2.RotateRequest())
    # b sees the prepared key (poll) well before it activates (prepare_ahead 3 s)
    await wait_for(lambda: rotated.prepared_kid in b.store.jwks_json, 1.5, "b polls")
    for _ in range(3):
        ta = await sa.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["x"]))
        tb = await sb.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["x"]))
        await sb.Verify(signer_pb2.VerifyRequest(token=ta.token, audience=["x"]))
        await sa.Verify(signer_pb2.VerifyRequest(token=tb.token, audience=["x"]))
        await asyncio.sleep(0.2)

    def active(server: SignerServer) -> str:
        assert server.store.ring is not None
        key = server.store.ring.active(server.store.clock())
        return key.kid if key is not None else ""

    await wait_for(lambda: active(a) == active(b) == rotated.prepared_kid, 5, "activation")
    # after activation both sign with the new key
    ta = await sa.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["x"]))
    tb = await sb.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["x"]))
    assert ta.kid == tb.kid == rotated.prepared_kid
    assert a.store.jwks_json == b.store.jwks_json


async def test_approle_login_and_token_renewal(bao: BaoServer, short_dir: Path) -> None:
    role_id, secret_id = bao.approle("signer-renew", token_ttl="2s", token_max_ttl="5s")
    secret_file = short_dir / "secret-id"
    secret_file.write_text(secret_id)
    secret_file.chmod(0o600)  # credential files must be owner-only
    cfg = VaultConfig.model_validate(
        {
            "address": bao.address,
            "auth": {"method": "approle", "role_id": role_id, "secret_id_file": str(secret_file)},
        }
    )
    client = VaultClient(cfg)
    await client.login()
    logged_in = time.monotonic()  # the first token was issued before this
    first = (await client.token_info())["accessor"]
    task = asyncio.create_task(client.renew_forever(retry_after=0.2))
    try:
        await sleep_until(logged_in + 2.5)  # past the 2 s TTL: only renewal keeps it alive
        info = await client.token_info()
        assert info["accessor"] == first and client.renewals >= 1
        # past the 5 s max TTL (OpenBao counts leases in whole seconds: it says when) renewal
        # cannot extend: the client logs in again
        await wait_for(
            lambda: asyncio.to_thread(token_dead, bao, first),
            10,
            "the first token's max TTL",
            interval=0.1,
        )
        info = await client.token_info()
        assert info["accessor"] != first and client.logins >= 2
        assert info["policies"] == ["svidgate-signer"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        client.close()


async def test_signer_with_approle_and_least_privilege(bao: BaoServer, short_dir: Path) -> None:
    role_id, secret_id = bao.approle("signer-kv")
    (short_dir / "secret-id").write_text(secret_id)
    (short_dir / "secret-id").chmod(0o600)  # credential files must be owner-only
    auth = {"method": "approle", "role_id": role_id, "secret_id_file": "secret-id"}
    keys = vault_keys(bao, "vault-kv", "EdDSA", short_dir / "unused", **auth)
    sock = short_dir / "s.sock"
    cfg = write_config(short_dir, deep_merge(base_config(sock, short_dir), {"keys": keys}))
    async with running_signer(cfg), unix_stub(sock) as stub:
        signed = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))
        await stub.Verify(signer_pb2.VerifyRequest(token=signed.token, audience=["a"]))
    # the policy is narrow: outside svidgate/ the signer's token is refused
    token = bao.signer_token()
    with pytest.raises(RuntimeError, match="403"):
        bao.api("GET", "secret/data/other", token=token)


async def test_wrong_transit_key_type_is_reported(bao: BaoServer, short_dir: Path) -> None:
    keys = vault_keys(bao, "vault-transit", "ES256", token_file(bao, short_dir))
    bao.api("POST", f"transit/keys/{keys['vault']['transit_key']}", {"type": "ed25519"})
    sock = short_dir / "s.sock"
    cfg = write_config(short_dir, deep_merge(base_config(sock, short_dir), {"keys": keys}))
    server = SignerServer(cfg)
    await server.start()
    try:
        await wait_for(lambda: server.store.last_error is not None, 5, "source error")
        assert "does not fit ES256" in (server.store.last_error or "")
        assert not server.store.can_verify
        async with unix_stub(sock) as stub:
            err = await rpc_error(
                stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE
            assert await reason_of(err) == "signing_unavailable"
    finally:
        await server.stop(grace=0.1)


async def test_signer_keeps_working_past_token_max_ttl(bao: BaoServer, short_dir: Path) -> None:
    """The server's source upkeep renews the AppRole token and logs in again at its max TTL."""
    role_id, secret_id = bao.approle("signer-short", token_ttl="2s", token_max_ttl="4s")
    (short_dir / "secret-id").write_text(secret_id)
    (short_dir / "secret-id").chmod(0o600)  # credential files must be owner-only
    auth = {"method": "approle", "role_id": role_id, "secret_id_file": "secret-id"}
    keys = vault_keys(bao, "vault-transit", "ES256", short_dir / "unused", **auth)
    sock = short_dir / "s.sock"
    # prepare_ahead >= poll_interval 500ms + clock_skew 30s + keys.vault.timeout 5s
    timing = {"rotation": {"period": "1h", "prepare_ahead": "40s", "poll_interval": "500ms"}}
    cfg = write_config(
        short_dir, deep_merge(base_config(sock, short_dir), {"keys": keys, **timing})
    )
    async with running_signer(cfg) as server, unix_stub(sock) as stub:
        client = server.store.source.client  # type: ignore[attr-defined]
        first = (await client.token_info())["accessor"]
        # beyond the 4 s max TTL of the first token
        await wait_for(
            lambda: asyncio.to_thread(token_dead, bao, first),
            10,
            "the first token's max TTL",
            interval=0.1,
        )
        assert (await client.token_info())["accessor"] != first
        assert client.renewals >= 1
        assert server.store.source_healthy
        signed = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))
        await stub.Verify(signer_pb2.VerifyRequest(token=signed.token, audience=["a"]))
        await stub.Rotate(signer_pb2.RotateRequest())


async def test_kubernetes_auth_failure_is_one_clear_error(
    bao: BaoServer, short_dir: Path, pki: Pki
) -> None:
    """Kubernetes auth needs a real API server for TokenReview; without one, the login reaches
    OpenBao's kubernetes mount with the configured role and JWT file and fails closed."""
    mounts = bao.api("GET", "sys/auth")
    if "kubernetes/" not in mounts.get("data", mounts):
        bao.api("POST", "sys/auth/kubernetes", {"type": "kubernetes"})
    bao.api(
        "POST",
        "auth/kubernetes/config",
        {
            "kubernetes_host": "https://127.0.0.1:1",
            "kubernetes_ca_cert": pki.bundle().read_text(),  # any CA: nothing dials the host
            "disable_local_ca_jwt": True,
        },
    )
    bao.api(
        "POST",
        "auth/kubernetes/role/signer",
        {
            "bound_service_account_names": ["signer"],
            "bound_service_account_namespaces": ["svidgate"],
            "token_policies": ["svidgate-signer"],
        },
    )
    (short_dir / "sa-token").write_text("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln")
    cfg = VaultConfig.model_validate(
        {
            "address": bao.address,
            "auth": {
                "method": "kubernetes",
                "role": "signer",
                "jwt_file": str(short_dir / "sa-token"),
            },
        }
    )
    client = VaultClient(cfg)
    with pytest.raises(KeySourceError, match=r"^vault login denied$"):
        await client.login()
    missing = VaultConfig.model_validate(
        {
            "address": bao.address,
            "auth": {"method": "kubernetes", "role": "signer", "jwt_file": str(short_dir / "nope")},
        }
    )
    with pytest.raises(KeySourceError, match=r"kubernetes service account token .*cannot read"):
        await VaultClient(missing).login()
    client.close()


async def test_kv_check_and_set_conflict_is_typed(bao: BaoServer, short_dir: Path) -> None:
    keys = vault_keys(bao, "vault-kv", "ES256", token_file(bao, short_dir))
    cfg = VaultConfig.model_validate(keys["vault"])
    first = VaultKvKeySource(VaultClient(cfg), "ES256")
    second = VaultKvKeySource(VaultClient(cfg), "ES256")
    now = datetime.now(UTC)
    plan = NewKeyPlan(Action.BOOTSTRAP, now, now)
    assert await first.load() == [] and await second.load() == []
    created = await first.create(plan)
    with pytest.raises(SourceConflictError):
        await second.create(plan)  # its view (no version yet) is stale
    loaded = await second.load()
    assert [k.kid for k in loaded] == [created.kid]
    later = NewKeyPlan(Action.PREPARE, now, now + timedelta(minutes=10))
    await second.create(later)
    with pytest.raises(SourceConflictError):
        await first.create(later)
    await first.close()
    await second.close()
