"""Issue 9, item 1: the signer is who the gateway thinks it is. A red team against real
processes: `svidgate gateway serve` with its signer on TCP, a genuine `svidgate signer serve`,
and an impostor grpc.aio signer holding the upstream's SVID (same trust domain, DNS SAN
``localhost``) that says "valid" to every token and publishes the attacker's key."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import pytest
import yaml
from gateway_harness import WEB_ID, Echo, LabPki, gateway_config
from signer_lab import (
    SIGNER_ID,
    SVIDGATE,
    Attacker,
    GatewayProc,
    L4Switch,
    SignerProc,
    impostor_server,
    jwt_routes,
    wait_until,
)

IDENTITY_LOG = (
    "signer identity check failed: signer presented spiffe://example.org/orders, "
    f"expected {SIGNER_ID}; connection closed"
)


def tcp_doc(pki: LabPki, echo: Echo, port: int, **tls: Any) -> dict[str, Any]:
    """A gateway with /jwt/remote and /jwt/local and its signer at 127.0.0.1:port, pinned to
    the signer's ID; the client SVID is a copy of the gateway's in signer-client.crt/key."""
    for suffix in ("crt", "key"):
        target = pki.dir / f"signer-client.{suffix}"
        if not target.exists():
            shutil.copy(pki.dir / f"gateway.{suffix}", target)
    doc = gateway_config(pki, echo.port)
    doc["signer"] = {
        "address": f"127.0.0.1:{port}",
        "timeout": "1s",
        "tls": {
            "cert": "signer-client.crt",
            "key": "signer-client.key",
            "bundle": "bundle-a.pem",
            "spiffe_id": SIGNER_ID,
            **tls,
        },
    }
    jwt_routes(doc, [WEB_ID])
    return doc


@pytest.fixture
async def signer(test_pki: LabPki) -> AsyncIterator[SignerProc]:
    proc = SignerProc(test_pki, tcp=True)
    await proc.start()
    yield proc
    proc.stop()


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayProc]]:
    procs: list[GatewayProc] = []
    yield procs
    for proc in procs:
        proc.stop()


async def _start(procs: list[GatewayProc], pki: LabPki, doc: dict[str, Any]) -> GatewayProc:
    gw = GatewayProc(pki, doc)
    procs.append(gw)
    await gw.start()
    return gw


async def test_impostor_reached_after_the_identity_check_never_gets_a_200(
    test_pki: LabPki, echo: Echo, signer: SignerProc, gateways: list[GatewayProc]
) -> None:
    """Check-then-use: an L4 switch sends the gateway's first connection to the genuine signer
    and every later one to the impostor (a compromised backend behind the same address)."""
    attacker = Attacker()
    async with impostor_server(test_pki, attacker) as (impostor_port, impostor):
        switch = L4Switch(lambda index: signer.port if index == 0 else impostor_port)
        await switch.start()
        try:
            gw = await _start(gateways, test_pki, tcp_doc(test_pki, echo, switch.port))
            await wait_until(lambda: len(switch.backends) >= 1, what="a signer connection")
            await asyncio.sleep(1.5)  # whatever the gateway opens on its own, it has opened
            forged = attacker.token(WEB_ID)
            genuine = await signer.sign(WEB_ID)
            for path in ("/jwt/remote/1", "/jwt/local/1"):
                assert (await gw.get(path, forged))[0] == 401, path
                assert (await gw.get(path, genuine))[0] == 200, path
            switch.drop()  # from now on only the impostor answers at the signer's address
            for attempt in range(8):
                status, retry_after = await gw.get(f"/jwt/remote/{attempt}", forged)
                assert (status, retry_after) == (503, "1"), attempt
                fresh = await signer.sign(WEB_ID)  # not cached: it needs a Verify
                assert (await gw.get(f"/jwt/remote/{attempt}", fresh))[0] == 503
                # local mode keeps the genuine key set: the forged token's kid is unknown
                assert (await gw.get(f"/jwt/local/{attempt}", forged))[0] == 401
            assert impostor_port in switch.backends[1:]  # the impostor was dialled ...
            assert impostor.calls == []  # ... and never received a single RPC
            await wait_until(lambda: IDENTITY_LOG in gw.messages(), what="the identity log line")
        finally:
            await switch.close()


async def test_impostor_at_the_signer_address_gets_503_and_readyz_says_why(
    test_pki: LabPki, echo: Echo, gateways: list[GatewayProc]
) -> None:
    attacker = Attacker()
    async with impostor_server(test_pki, attacker) as (impostor_port, impostor):
        gw = await _start(gateways, test_pki, tcp_doc(test_pki, echo, impostor_port))
        forged = attacker.token(WEB_ID)
        for attempt in range(5):
            for verify in ("remote", "local"):
                status, retry_after = await gw.get(f"/jwt/{verify}/{attempt}", forged)
                assert (status, retry_after) == (503, "1"), (verify, attempt)
            await asyncio.sleep(0.2)
        assert await gw.admin_get("/readyz") == 503
        assert impostor.calls == []
        assert IDENTITY_LOG in gw.messages()


def test_tcp_signer_without_spiffe_id_is_refused(test_pki: LabPki) -> None:
    doc = gateway_config(test_pki, 9)
    doc["signer"] = {
        "address": "127.0.0.1:7443",
        "tls": {"cert": "gateway.crt", "key": "gateway.key", "bundle": "bundle-a.pem"},
    }
    path = test_pki.dir / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    for command in ("check", "serve"):
        result = subprocess.run(
            [*SVIDGATE, "gateway", command, "--config", str(path)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "signer.tls.spiffe_id: is required" in result.stderr, command
        assert "Traceback" not in result.stderr


async def test_genuine_signer_over_tcp_remote_local_and_watch_keys(
    test_pki: LabPki, echo: Echo, signer: SignerProc, gateways: list[GatewayProc]
) -> None:
    gw = await _start(gateways, test_pki, tcp_doc(test_pki, echo, signer.port))
    for _ in range(200):
        if await gw.admin_get("/readyz") == 200:
            break
        await asyncio.sleep(0.1)
    assert await gw.admin_get("/readyz") == 200
    token = await signer.sign(WEB_ID)
    for verify in ("remote", "local"):
        assert (await gw.get(f"/jwt/{verify}/1", token))[0] == 200, verify
        assert (await gw.get(f"/jwt/{verify}/1", "e30.e30.e30"))[0] == 401, verify
    # WatchKeys over the verified connection: a rotation reaches the gateway unasked
    await signer.rotate()
    await wait_until(
        lambda: any(m.startswith("signer key set") and "," in m for m in gw.messages()),
        what="the pushed key set with two kids",
    )
    await asyncio.sleep(1.5)  # prepare_ahead: the new key signs from now on
    newer = await signer.sign(WEB_ID)
    assert newer.split(".")[0] != token.split(".")[0]  # another kid in the header
    for verify in ("remote", "local"):
        assert (await gw.get(f"/jwt/{verify}/2", newer))[0] == 200, verify


async def test_reloaded_client_certificate_applies_to_new_signer_connections(
    test_pki: LabPki, echo: Echo, signer: SignerProc, gateways: list[GatewayProc]
) -> None:
    """The signer admits only the gateway's ID: once signer-client.crt holds another SVID, the
    next connection is refused by the signer (503); restored, the next one works again. Each
    request carries a fresh token, so every answer is a Verify on the current connection."""
    switch = L4Switch(lambda index: signer.port)
    await switch.start()

    async def status() -> int:
        return (await gw.get("/jwt/remote/x", await signer.sign(WEB_ID)))[0]

    async def eventually_200() -> None:
        for _ in range(100):
            if await status() == 200:
                return
            await asyncio.sleep(0.1)
        raise AssertionError("the gateway never verified through the signer")

    try:
        gw = await _start(gateways, test_pki, tcp_doc(test_pki, echo, switch.port))
        await eventually_200()
        test_pki.issue("spiffe://example.org/stranger", "signer-client")
        assert await status() == 200  # the open connection keeps its certificate
        switch.drop()
        assert [await status() for _ in range(5)] == [503] * 5
        assert len(switch.backends) >= 2  # new connections were made, with the new SVID
        test_pki.issue("spiffe://example.org/gateway", "signer-client")
        switch.drop()
        await eventually_200()
    finally:
        await switch.close()
