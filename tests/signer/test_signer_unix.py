"""The signer over its Unix socket (file key source, in-process grpc.aio server): Sign→Verify per
algorithm, typed failures with reason metadata, socket mode, JWKS/WatchKeys, health, reflection."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import stat
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from signer_harness import (
    CLIENT_ID,
    base_config,
    deep_merge,
    reason_of,
    rpc_error,
    running_signer,
    signer_pb2,
    unix_stub,
    write_config,
)
from support.waiting import wait_for
from svidgate.pki.jose import ALGORITHMS
from svidgate.signer.server import SignerServer

from svidgate.config import ConfigError


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@pytest.mark.parametrize("alg", ALGORITHMS)
async def test_sign_then_verify_each_algorithm(short_dir: Path, alg: str) -> None:
    sock = short_dir / "s.sock"
    # extra claims need authorization.claims (issue 9): `scope` is granted to the subject
    grant = {"authorization": {"claims": {"scope": [CLIENT_ID]}}}
    cfg = write_config(
        short_dir,
        deep_merge(base_config(sock, short_dir / "keys"), {"keys": {"algorithm": alg}, **grant}),
    )
    async with running_signer(cfg), unix_stub(sock) as stub:
        signed = await stub.Sign(
            signer_pb2.SignRequest(
                subject=CLIENT_ID, audience=["orders"], claims_json='{"scope":"read"}'
            )
        )
        header = json.loads(base64.urlsafe_b64decode(signed.token.split(".")[0] + "=="))
        assert header == {"alg": alg, "kid": signed.kid, "typ": "JWT"}
        verified = await stub.Verify(
            signer_pb2.VerifyRequest(
                token=signed.token, audience=["orders"], expected_subject=CLIENT_ID
            )
        )
        assert verified.subject == CLIENT_ID
        assert verified.kid == signed.kid
        assert verified.expires_at == signed.expires_at
        assert verified.key_valid_until >= verified.expires_at
        claims = json.loads(verified.claims_json)
        assert claims["scope"] == "read" and claims["exp"] - claims["iat"] == 300
    key_files = list((short_dir / "keys").glob("*.pem"))
    assert key_files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in key_files)


async def test_failures_carry_reason_code_and_metadata(short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    grant = {"authorization": {"claims": {"blob": [CLIENT_ID]}}}  # to reach the size limit
    cfg = write_config(short_dir, deep_merge(base_config(sock, short_dir / "keys"), grant))
    async with running_signer(cfg), unix_stub(sock) as stub:
        signed = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"]))
        cases = [
            (signer_pb2.VerifyRequest(token=signed.token, audience=["payments"]), "bad_audience"),
            (signer_pb2.VerifyRequest(token="x.y", audience=["orders"]), "malformed"),
            (signer_pb2.VerifyRequest(token="a" * 9000, audience=["orders"]), "too_large"),
            (
                signer_pb2.VerifyRequest(
                    token=signed.token[:-4]
                    + ("AAAA" if not signed.token.endswith("AAAA") else "BBBB"),
                    audience=["orders"],
                ),
                "bad_signature",
            ),
            (
                signer_pb2.VerifyRequest(
                    token=signed.token, audience=["orders"], expected_subject=CLIENT_ID + "x"
                ),
                "bad_subject",
            ),
            (
                signer_pb2.VerifyRequest(
                    token=signed.token,
                    audience=["orders"],
                    certificate_thumbprint=b64(b"\x00" * 32),
                    require_binding=True,
                ),
                "binding_mismatch",
            ),
        ]
        for request, reason in cases:
            err = await rpc_error(stub.Verify(request))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, reason
            assert err.details().startswith(f"{reason}: "), err.details()
            assert await reason_of(err) == reason
        # request errors
        err = await rpc_error(stub.Sign(signer_pb2.SignRequest(audience=["orders"])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("invalid_argument: subject is required")
        err = await rpc_error(
            stub.Sign(signer_pb2.SignRequest(subject="spiffe://evil.org/x", audience=["a"]))
        )
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await reason_of(err) == "permission_denied"
        err = await rpc_error(
            stub.Sign(
                signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"], claims_json='{"sub":"x"}')
            )
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        big = json.dumps({"blob": "x" * 9000})
        err = await rpc_error(
            stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"], claims_json=big))
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "8192 bytes" in err.details()
        err = await rpc_error(stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = await rpc_error(stub.Verify(signer_pb2.VerifyRequest(token=signed.token)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_ttl_default_cap_and_binding(short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    cfg = write_config(short_dir, base_config(sock, short_dir / "keys"))
    thumb = b64(hashlib.sha256(b"leaf").digest())
    async with running_signer(cfg), unix_stub(sock) as stub:
        for ttl, lifetime in ((0, 300), (1, 1), (60, 60), (10**9, 900)):
            signed = await stub.Sign(
                signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"], ttl_seconds=ttl)
            )
            verified = await stub.Verify(
                signer_pb2.VerifyRequest(token=signed.token, audience=["a"])
            )
            claims = json.loads(verified.claims_json)
            assert claims["exp"] - claims["iat"] == lifetime
        err = await rpc_error(
            stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"], ttl_seconds=-5))
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        bound = await stub.Sign(
            signer_pb2.SignRequest(
                subject=CLIENT_ID,
                audience=["a"],
                bind_certificate=True,
                certificate_thumbprint=thumb,
            )
        )
        ok = await stub.Verify(
            signer_pb2.VerifyRequest(
                token=bound.token,
                audience=["a"],
                certificate_thumbprint=thumb,
                require_binding=True,
            )
        )
        assert json.loads(ok.claims_json)["cnf"] == {"x5t#S256": thumb}
        err = await rpc_error(
            stub.Verify(signer_pb2.VerifyRequest(token=bound.token, audience=["a"]))
        )
        assert await reason_of(err) == "binding_mismatch"


@pytest.mark.parametrize(("mode", "expected"), [(None, 0o600), ("0660", 0o660)])
async def test_socket_mode(short_dir: Path, mode: str | None, expected: int) -> None:
    sock = short_dir / "s.sock"
    data = base_config(sock, short_dir / "keys")
    if mode is not None:
        data = deep_merge(data, {"listen": {"unix_mode": mode}})
    async with running_signer(write_config(short_dir, data)):
        assert stat.S_ISSOCK(sock.stat().st_mode)
        assert stat.S_IMODE(sock.stat().st_mode) == expected
    assert not sock.exists()  # removed on shutdown


async def test_jwks_watch_and_rotate(short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    cfg = write_config(short_dir, base_config(sock, short_dir / "keys"))
    async with running_signer(cfg), unix_stub(sock) as stub:
        first = await stub.GetJWKS(signer_pb2.GetJWKSRequest())
        keys = json.loads(first.jwks_json)["keys"]
        assert len(keys) == 1 and keys[0]["alg"] == "ES256" and "d" not in keys[0]
        stream = stub.WatchKeys(signer_pb2.WatchKeysRequest(after_sequence=0))
        initial = await asyncio.wait_for(stream.read(), 5)
        assert initial.sequence == first.sequence
        rotated = await stub.Rotate(signer_pb2.RotateRequest())
        assert rotated.active_kid == keys[0]["kid"] and rotated.prepared_kid != rotated.active_kid
        pushed = await asyncio.wait_for(stream.read(), 5)
        assert pushed.sequence == first.sequence + 1
        # a watcher with a sequence from elsewhere (another replica) gets the current set now
        ahead = stub.WatchKeys(signer_pb2.WatchKeysRequest(after_sequence=pushed.sequence + 10**6))
        current = await asyncio.wait_for(ahead.read(), 5)
        assert current.sequence == pushed.sequence and current.jwks_json == pushed.jwks_json
        ahead.cancel()
        kids = {k["kid"] for k in json.loads(pushed.jwks_json)["keys"]}
        assert kids == {rotated.active_kid, rotated.prepared_kid}
        # the prepared key is published but does not sign yet
        signed = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))
        assert signed.kid == rotated.active_kid
        stream.cancel()


async def test_health_and_reflection(short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    cfg = write_config(short_dir, base_config(sock, short_dir / "keys"))
    async with running_signer(cfg), grpc.aio.insecure_channel(f"unix:{sock}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in (
            "",
            "svidgate.signer.v1.Signer",
            "svidgate.signer.v1.Signer.Sign",
            "svidgate.signer.v1.Signer.KeySource",
        ):
            request = health_pb2.HealthCheckRequest(service=name)

            async def serving(request: health_pb2.HealthCheckRequest = request) -> bool:
                reply = await health.Check(request)
                return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

            # health follows the key store within ~0.1 s
            await wait_for(serving, 5, f"{name or 'the server'} to be SERVING", interval=0.05)
            reply = await health.Check(request)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = refl.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        names = {s.name for s in reply.list_services_response.service}
        assert {"svidgate.signer.v1.Signer", "grpc.health.v1.Health"} <= names
        await call.done_writing()


async def test_restart_keeps_file_keys(short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    cfg = write_config(short_dir, base_config(sock, short_dir / "keys"))
    async with running_signer(cfg), unix_stub(sock) as stub:
        signed = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))
        before = await stub.GetJWKS(signer_pb2.GetJWKSRequest())
    async with running_signer(cfg), unix_stub(sock) as stub:
        verified = await stub.Verify(signer_pb2.VerifyRequest(token=signed.token, audience=["a"]))
        assert verified.kid == signed.kid
        after = await stub.GetJWKS(signer_pb2.GetJWKSRequest())
        assert after.jwks_json == before.jwks_json
        assert after.sequence > before.sequence  # sequence numbers survive a restart


async def test_scheduled_rotation(short_dir: Path) -> None:
    """rotation.period drives rotations by itself: each new key is published prepare_ahead
    before it signs, and retired keys leave the JWKS retain_retired after their retirement."""
    sock = short_dir / "s.sock"
    data = deep_merge(
        base_config(sock, short_dir / "keys"),
        {
            # iat is whole seconds (floor), so a 1 s token may have < 1 s left: allow 1 s skew
            "tokens": {"default_ttl": "1s", "max_ttl": "1s", "clock_skew": "1s"},
            "rotation": {"period": "1500ms", "prepare_ahead": "1200ms", "poll_interval": "200ms"},
        },
    )
    async with running_signer(write_config(short_dir, data)) as server, unix_stub(sock) as stub:
        store = server.store
        published: dict[str, float] = {}
        signing: dict[str, float] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10.0
        first_removed = False
        # sample until the evidence is in: three keys signed and the first one left the JWKS
        while loop.time() < deadline and not (len(signing) >= 3 and first_removed):
            now = loop.time()
            kids = [key["kid"] for key in json.loads(store.jwks_json)["keys"]]
            for kid in kids:
                published.setdefault(kid, now)
            signed = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"]))
            signing.setdefault(signed.kid, now)
            await stub.Verify(signer_pb2.VerifyRequest(token=signed.token, audience=["a"]))
            first_removed = bool(signing) and next(iter(signing)) not in kids
            await asyncio.sleep(0.05)
        assert len(signing) >= 3  # bootstrap + at least two scheduled rotations
        assert first_removed, "the bootstrap key left the JWKS retain_retired after retiring"
        for kid, first_signed in signing.items():
            assert published[kid] <= first_signed
        later = [kid for kid in signing if published[kid] > min(published.values())]
        assert later and all(signing[kid] - published[kid] >= 0.3 for kid in later)
        # retain = 1s + 1s + 200ms: the active, a prepared and recently retired keys at most
        assert len(json.loads(store.jwks_json)["keys"]) <= 4
        assert len(list((short_dir / "keys").glob("*.pem"))) <= 4


async def test_a_second_signer_on_the_same_socket_is_refused(short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    cfg = write_config(short_dir, base_config(sock, short_dir / "keys"))
    async with running_signer(cfg):
        second = SignerServer(cfg)
        with pytest.raises(ConfigError, match="is in use"):
            await second.start()
        await second.stop(grace=0)  # as serve() does: must not remove the other's socket
        assert sock.exists()
        async with unix_stub(sock) as stub:  # the first one is untouched
            await stub.GetJWKS(signer_pb2.GetJWKSRequest())
    # a stale socket file (its process died) is replaced
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))
    stale.close()
    async with running_signer(cfg), unix_stub(sock) as stub:
        await stub.GetJWKS(signer_pb2.GetJWKSRequest())
