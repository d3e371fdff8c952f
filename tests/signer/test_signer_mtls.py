"""The signer over TCP with mTLS: every RPC is authorized by the caller's SPIFFE ID; Sign mints
only for the caller unless `sign_for_others` allows more; certificate binding uses the caller's
own leaf; the server certificate reloads without a restart."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from signer_harness import (
    ADMIN_ID,
    CLIENT_ID,
    GATEWAY_ID,
    SIGNER_ID,
    Pki,
    base_config,
    deep_merge,
    reason_of,
    rpc_error,
    running_signer,
    signer_pb2,
    tls_stub,
    unix_stub,
    wait_for,
    write_config,
)
from svidgate.pki.bundle import marshal_pem
from svidgate.pki.ca import CertificateAuthority
from svidgate.signer.v1 import signer_pb2_grpc


def tcp_config(pki: Pki, short_dir: Path) -> dict[str, object]:
    crt, key = pki.files("signer")
    return deep_merge(
        base_config(short_dir / "s.sock", short_dir / "keys"),
        {
            "listen": {"tcp": "127.0.0.1:0"},
            "tls": {"cert": str(crt), "key": str(key), "bundle": str(pki.dir / "bundle.pem")},
        },
    )


def thumbprint(pki: Pki, name: str) -> str:
    leaf = x509.load_pem_x509_certificates(pki.files(name)[0].read_bytes())[0]
    digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


async def test_authorization_per_rpc(pki: Pki, short_dir: Path) -> None:
    cfg = write_config(short_dir, tcp_config(pki, short_dir))
    async with running_signer(cfg) as server:
        port = server.tcp_port
        assert port
        # the workload mints for itself (empty subject = its own SPIFFE ID)
        async with tls_stub(pki, "client", port) as client:
            signed = await client.Sign(signer_pb2.SignRequest(audience=["orders"]))
            err = await rpc_error(
                client.Sign(signer_pb2.SignRequest(subject=ADMIN_ID, audience=["orders"]))
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.details().startswith("permission_denied: ")
            assert await reason_of(err) == "permission_denied"
            for call in (
                client.Verify(signer_pb2.VerifyRequest(token=signed.token, audience=["orders"])),
                client.GetJWKS(signer_pb2.GetJWKSRequest()),
                client.Rotate(signer_pb2.RotateRequest()),
            ):
                err = await rpc_error(call)
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        # the gateway verifies, but may not mint or rotate
        async with tls_stub(pki, "gateway", port) as gateway:
            verified = await gateway.Verify(
                signer_pb2.VerifyRequest(token=signed.token, audience=["orders"])
            )
            assert verified.subject == CLIENT_ID
            jwks = await gateway.GetJWKS(signer_pb2.GetJWKSRequest())
            assert json.loads(jwks.jwks_json)["keys"]
            for call in (
                gateway.Sign(signer_pb2.SignRequest(audience=["orders"])),
                gateway.Rotate(signer_pb2.RotateRequest()),
            ):
                err = await rpc_error(call)
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        # an unlisted SPIFFE ID gets PERMISSION_DENIED everywhere
        async with tls_stub(pki, "stranger", port) as stranger:
            for call in (
                stranger.Sign(signer_pb2.SignRequest(audience=["orders"])),
                stranger.Verify(signer_pb2.VerifyRequest(token=signed.token, audience=["o"])),
                stranger.GetJWKS(signer_pb2.GetJWKSRequest()),
                stranger.Rotate(signer_pb2.RotateRequest()),
            ):
                err = await rpc_error(call)
                assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            watch = stranger.WatchKeys(signer_pb2.WatchKeysRequest())
            err = await rpc_error(watch.read())
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        async with tls_stub(pki, "admin", port) as admin:
            rotated = await admin.Rotate(signer_pb2.RotateRequest())
            assert rotated.prepared_kid
        # sign_for_others: the minter may mint for a subject in `sign`, not for anyone
        async with tls_stub(pki, "minter", port) as minter:
            other = await minter.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["o"]))
            assert other.token
            err = await rpc_error(
                minter.Sign(signer_pb2.SignRequest(subject=GATEWAY_ID, audience=["o"]))
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_certificate_binding_uses_caller_leaf(pki: Pki, short_dir: Path) -> None:
    cfg = write_config(short_dir, tcp_config(pki, short_dir))
    async with running_signer(cfg) as server:
        assert server.tcp_port
        async with tls_stub(pki, "client", server.tcp_port) as client:
            bound = await client.Sign(
                signer_pb2.SignRequest(audience=["orders"], bind_certificate=True)
            )
            err = await rpc_error(
                client.Sign(
                    signer_pb2.SignRequest(
                        audience=["o"], bind_certificate=True, certificate_thumbprint="A" * 43
                    )
                )
            )
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        async with tls_stub(pki, "gateway", server.tcp_port) as gateway:
            ok = await gateway.Verify(
                signer_pb2.VerifyRequest(
                    token=bound.token,
                    audience=["orders"],
                    certificate_thumbprint=thumbprint(pki, "client"),
                    require_binding=True,
                )
            )
            assert json.loads(ok.claims_json)["cnf"]["x5t#S256"] == thumbprint(pki, "client")
            err = await rpc_error(
                gateway.Verify(
                    signer_pb2.VerifyRequest(
                        token=bound.token,
                        audience=["orders"],
                        certificate_thumbprint=thumbprint(pki, "stranger"),
                    )
                )
            )
            assert await reason_of(err) == "binding_mismatch"


async def test_client_without_trusted_certificate_is_refused(pki: Pki, short_dir: Path) -> None:
    cfg = write_config(short_dir, tcp_config(pki, short_dir))
    other_ca = CertificateAuthority.create("example.org")
    other_ca.issue(GATEWAY_ID).write(short_dir / "rogue")
    async with running_signer(cfg) as server:
        creds = grpc.ssl_channel_credentials(
            root_certificates=(pki.dir / "bundle.pem").read_bytes(),
            private_key=(short_dir / "rogue.key").read_bytes(),
            certificate_chain=(short_dir / "rogue.crt").read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{server.tcp_port}", creds, options=options
        ) as channel:
            err = await rpc_error(
                signer_pb2_grpc.SignerStub(channel).GetJWKS(signer_pb2.GetJWKSRequest(), timeout=3)
            )
            assert err.code() == grpc.StatusCode.UNAVAILABLE


async def test_server_certificate_reloads(
    pki: Pki, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crt = short_dir / "server.crt"
    key = short_dir / "server.key"
    src_crt, src_key = pki.files("signer")
    crt.write_bytes(src_crt.read_bytes())
    key.write_bytes(src_key.read_bytes())
    data = deep_merge(tcp_config(pki, short_dir), {"tls": {"cert": str(crt), "key": str(key)}})
    cfg = write_config(short_dir, data)
    async with running_signer(cfg) as server:
        assert server.tls is not None and server.tcp_port
        async with tls_stub(pki, "gateway", server.tcp_port) as gateway:
            await gateway.GetJWKS(signer_pb2.GetJWKSRequest())
        # a broken file keeps the old state
        key.write_bytes(b"garbage")

        def refused() -> bool:
            return any("TLS reload failed" in r.getMessage() for r in caplog.records)

        await wait_for(refused, 5, "the TLS poll to refuse the broken key")
        assert server.tls.reloads == 0
        fresh = pki.ca.issue(SIGNER_ID, dns=["localhost"])
        fresh.write(short_dir / "server")
        os.utime(crt)
        await wait_for(lambda: server.tls is not None and server.tls.reloads == 1, 5, "reload")
        async with tls_stub(pki, "gateway", server.tcp_port) as gateway:
            await gateway.GetJWKS(signer_pb2.GetJWKSRequest())
        # the Unix socket keeps working alongside TCP
        async with unix_stub(short_dir / "s.sock") as local:
            await local.GetJWKS(signer_pb2.GetJWKSRequest())


async def test_unix_socket_needs_explicit_subject_even_with_tcp(pki: Pki, short_dir: Path) -> None:
    cfg = write_config(short_dir, tcp_config(pki, short_dir))
    async with running_signer(cfg), unix_stub(short_dir / "s.sock") as local:
        err = await rpc_error(local.Sign(signer_pb2.SignRequest(audience=["o"])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_callers_of_another_trust_domain_are_refused(pki: Pki, short_dir: Path) -> None:
    """tls.bundle is the signer's own trust domain bundle: even when another domain's root is
    in it and a pattern names that domain, its callers are not vouched for."""
    other = pki.cas["other.org"]
    other.issue("spiffe://other.org/gateway").write(short_dir / "foreign")
    bundle = short_dir / "mixed-bundle.pem"
    bundle.write_bytes((pki.dir / "bundle.pem").read_bytes() + marshal_pem(other.bundle()))
    data = deep_merge(
        tcp_config(pki, short_dir),
        {
            "tls": {"bundle": str(bundle)},
            "authorization": {"verify": [GATEWAY_ID, "spiffe://other.org/gateway"]},
        },
    )
    cfg = write_config(short_dir, data)
    async with running_signer(cfg) as server:
        assert server.tcp_port
        creds = grpc.ssl_channel_credentials(
            root_certificates=(pki.dir / "bundle.pem").read_bytes(),
            private_key=(short_dir / "foreign.key").read_bytes(),
            certificate_chain=(short_dir / "foreign.crt").read_bytes(),
        )
        options = [("grpc.ssl_target_name_override", "localhost")]
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{server.tcp_port}", creds, options=options
        ) as channel:
            stub = signer_pb2_grpc.SignerStub(channel)
            err = await rpc_error(stub.GetJWKS(signer_pb2.GetJWKSRequest()))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "not in trust domain example.org" in err.details()
        async with tls_stub(pki, "gateway", server.tcp_port) as gateway:
            await gateway.GetJWKS(signer_pb2.GetJWKSRequest())
