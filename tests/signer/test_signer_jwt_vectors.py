"""The JWT vectors in tests/signer/vectors/jwt (files named for their defect, see README), decided
identically by every verifier: the pki core (svidgate.pki.jwt_svid), the signer's Verify RPC
(a real grpc.aio signer on a Unix socket) and the gateway's SignerClient in local mode, fed the
signer's JWKS over GetJWKS/WatchKeys (and, for good measure, in remote mode)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from signer_harness import base_config, reason_of, unix_stub, wait_for, write_config
from svidgate.gateway.errors import TokenRejected
from svidgate.gateway.signer_client import SignerClient
from svidgate.pki.jwt_svid import (
    REASONS,
    JwtSvidError,
    UnknownKidError,
    VerificationKey,
    VerificationPolicy,
    verify_jwt_svid,
)
from svidgate.signer.server import SignerServer
from svidgate.signer.v1 import signer_pb2

VECTORS = Path(__file__).resolve().parent / "vectors" / "jwt"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text())
CASES: dict[str, dict[str, Any]] = MANIFEST["cases"]
EXPECTED = {name: case["reason"] for name, case in CASES.items()}
NOW = datetime.fromtimestamp(MANIFEST["now"], UTC)
POLICY = VerificationPolicy(
    MANIFEST["issuer"],
    timedelta(seconds=MANIFEST["clock_skew_seconds"]),
    timedelta(seconds=MANIFEST["max_ttl_seconds"]),
)


def signing_key() -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((VECTORS / "signing-key.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def token_of(case: dict[str, Any]) -> str:
    return (VECTORS / case["token"]).read_text().strip()


def lookup(kid: str) -> VerificationKey:
    if kid != MANIFEST["kid"]:
        raise UnknownKidError("no such key")
    return VerificationKey(kid, "ES256", signing_key().public_key())


def test_every_vector_file_is_used_and_every_reason_is_known() -> None:
    assert {p.name for p in VECTORS.glob("*.jwt")} == {c["token"] for c in CASES.values()}
    assert set(EXPECTED.values()) <= REASONS | {"ok"}
    assert {"expired", "bad_subject", "binding_mismatch", "too_large"} <= set(EXPECTED.values())


# -- path 1: the pki core ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "case"), sorted(CASES.items()))
def test_core(name: str, case: dict[str, Any]) -> None:
    try:
        verified = verify_jwt_svid(
            token_of(case),
            lookup=lookup,
            policy=POLICY,
            audiences=[MANIFEST["audience"]],
            now=NOW,
            expected_subject=case.get("expected_subject"),
            certificate_thumbprint=case.get("certificate_thumbprint"),
            require_binding=case.get("require_binding", False),
        )
    except JwtSvidError as err:
        assert err.reason == case["reason"], (name, str(err))
        assert str(err).startswith(f"{err.reason}: ")
        return
    assert case["reason"] == "ok", name
    assert verified.kid == MANIFEST["kid"]


# -- a real signer holding the vectors' key, its clock at the vectors' `now` ------------------


def _key_directory(directory: Path) -> Path:
    """A file key source holding signing-key.pem under its RFC 7638 kid, active since before
    the vectors were issued (the layout signer/sources/file.py reads)."""
    keys = directory / "keys"
    keys.mkdir(mode=0o700)
    kid = MANIFEST["kid"]
    pem = keys / f"{kid}.pem"
    pem.write_bytes((VECTORS / "signing-key.pem").read_bytes())
    pem.chmod(0o600)
    activated = datetime.fromtimestamp(MANIFEST["key_activated_at"], UTC).isoformat()
    entry = {"kid": kid, "alg": "ES256", "created_at": activated, "activate_at": activated}
    (keys / "state.json").write_text(json.dumps({"generation": 1, "keys": [entry]}))
    return keys


@contextlib.asynccontextmanager
async def vector_signer(directory: Path) -> AsyncIterator[Path]:
    """The signer (grpc.aio, Unix socket) on the vectors' key; yields its socket path."""
    sock = directory / "s.sock"
    cfg = write_config(directory, base_config(sock, _key_directory(directory)))
    assert cfg.issuer == MANIFEST["issuer"]
    assert cfg.tokens.max_ttl == POLICY.max_ttl and cfg.tokens.clock_skew == POLICY.clock_skew
    server = SignerServer(cfg)
    server.store.clock = lambda: NOW  # the key store's injected clock: the vectors' fixed time
    await server.start()
    try:
        await wait_for(lambda: server.store.can_verify, what="the vector key")
        assert [s["kid"] for s in server.store.statuses()] == [MANIFEST["kid"]]
        yield sock
    finally:
        await server.stop(grace=0.2)


# -- path 2: the signer's Verify RPC ----------------------------------------------------------


async def test_signer_verify_rpc(short_dir: Path) -> None:
    got: dict[str, str] = {}
    async with vector_signer(short_dir) as sock, unix_stub(sock) as stub:
        for name, case in sorted(CASES.items()):
            request = signer_pb2.VerifyRequest(
                token=token_of(case),
                audience=[MANIFEST["audience"]],
                expected_subject=case.get("expected_subject", ""),
                certificate_thumbprint=case.get("certificate_thumbprint", ""),
                require_binding=case.get("require_binding", False),
            )
            try:
                response = await stub.Verify(request)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED, (name, err.details())
                got[name] = await reason_of(err)
                assert (err.details() or "").startswith(f"{got[name]}: "), err.details()
            else:
                assert response.kid == MANIFEST["kid"]
                got[name] = "ok"
    assert got == EXPECTED


# -- path 3: the gateway's local mode (and its remote mode) -----------------------------------


async def _gateway_reasons(client: SignerClient, mode: str) -> dict[str, str]:
    got: dict[str, str] = {}
    for name, case in sorted(CASES.items()):
        try:
            await client.verify(
                token_of(case),
                audience=MANIFEST["audience"],
                mode=mode,  # type: ignore[arg-type]
                expected_subject=case.get("expected_subject"),
                certificate_thumbprint=case.get("certificate_thumbprint"),
                require_binding=case.get("require_binding", False),
            )
        except TokenRejected as err:
            got[name] = err.reason
        else:
            got[name] = "ok"
    return got


async def test_gateway_local_mode_fed_by_the_signer(short_dir: Path) -> None:
    async with vector_signer(short_dir) as sock:
        client = SignerClient(
            address=f"unix:{sock}",
            timeout=timedelta(seconds=2),
            clock=lambda: float(MANIFEST["now"]),
        )
        async with client:
            await wait_for(lambda: client.ready(mode="local"), what="the pushed key set")
            keyset = client.keyset
            assert keyset is not None and list(keyset.keys) == [MANIFEST["kid"]]
            # no issuer, max_ttl or skew configured here: all three come from the signer
            assert keyset.issuer == MANIFEST["issuer"]
            assert keyset.max_ttl == POLICY.max_ttl and keyset.clock_skew == POLICY.clock_skew
            assert await _gateway_reasons(client, "local") == EXPECTED
            assert await _gateway_reasons(client, "remote") == EXPECTED
