"""Issue 9, item 1: the signer is who the gateway thinks it is. A red team against real
processes: `svidgate gateway serve` with its signer on TCP, a genuine `svidgate signer serve`,
and an impostor grpc.aio signer holding the upstream's SVID (same trust domain, DNS SAN
``localhost``) that says "valid" to every token and publishes the attacker's key."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.serialization import Encoding
from gateway_harness import (
    BUNDLE_A,
    UPSTREAM_ID,
    WEB_ID,
    A,
    B,
    Echo,
    GatewayProcess,
    LabPki,
    gateway_config,
)
from signer_lab import SIGNER_ID, Attacker, L4Switch, impostor_server, jwt_routes, lab_signer
from support.signer_process import SignerProcess
from support.waiting import wait_for
from svidgate.gateway.config import SignerTLS
from svidgate.gateway.signer_channel import (
    SignerConnector,
    SignerIdentityError,
    check_signer_identity,
)
from svidgate.pki.bundle import BundleSet, load_bundle
from svidgate.pki.ca import CertificateAuthority
from svidgate.pki.spiffe_id import parse_spiffe_id

SVIDGATE = [sys.executable, "-m", "svidgate.cli"]
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
            "bundle": BUNDLE_A,
            "spiffe_id": SIGNER_ID,
            **tls,
        },
    }
    jwt_routes(doc, [WEB_ID])
    return doc


@pytest.fixture
async def signer(test_pki: LabPki) -> AsyncIterator[SignerProcess]:
    proc = lab_signer(test_pki, tcp=True)
    await proc.start()
    yield proc
    await asyncio.to_thread(proc.stop)


@pytest.fixture
async def gateways() -> AsyncIterator[list[GatewayProcess]]:
    procs: list[GatewayProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


async def _start(
    procs: list[GatewayProcess], pki: LabPki, doc: dict[str, Any], ready: str = "/healthz"
) -> GatewayProcess:
    """A gateway process, started once it is live (``/healthz``): with an impostor at the
    signer's address it never becomes ready."""
    gw = GatewayProcess(pki, doc)
    procs.append(gw)
    await gw.start(ready)
    return gw


def _key_set_pushed(gw: GatewayProcess) -> bool:
    return any(m.startswith("signer key set") for m in gw.messages())


async def test_impostor_reached_after_the_identity_check_never_gets_a_200(
    test_pki: LabPki, echo: Echo, signer: SignerProcess, gateways: list[GatewayProcess]
) -> None:
    """Check-then-use: an L4 switch sends the gateway's first connection to the genuine signer
    and every later one to the impostor (a compromised backend behind the same address)."""
    attacker = Attacker()
    async with impostor_server(test_pki, attacker) as (impostor_port, impostor):
        switch = L4Switch(lambda index: signer.tcp_port if index == 0 else impostor_port)
        await switch.start()
        try:
            gw = await _start(gateways, test_pki, tcp_doc(test_pki, echo, switch.port))
            await wait_for(lambda: len(switch.backends) >= 1, 20, "a signer connection")
            # the gateway's channel is up on that first connection: its key set came over it
            await wait_for(lambda: _key_set_pushed(gw), 20, "the key set over WatchKeys")
            forged = attacker.token(WEB_ID)
            genuine = await signer.sign_async(WEB_ID)
            for path in ("/jwt/remote/1", "/jwt/local/1"):
                assert (await gw.get(path, forged))[0] == 401, path
                assert (await gw.get(path, genuine))[0] == 200, path
            switch.drop()  # from now on only the impostor answers at the signer's address
            for attempt in range(8):
                status, retry_after = await gw.get(f"/jwt/remote/{attempt}", forged)
                assert (status, retry_after) == (503, "1"), attempt
                fresh = await signer.sign_async(WEB_ID)  # not cached: it needs a Verify
                assert (await gw.get(f"/jwt/remote/{attempt}", fresh))[0] == 503
                # local mode keeps the genuine key set: the forged token's kid is unknown
                assert (await gw.get(f"/jwt/local/{attempt}", forged))[0] == 401
            assert impostor_port in switch.backends[1:]  # the impostor was dialled ...
            assert impostor.calls == []  # ... and never received a single RPC
            await wait_for(lambda: IDENTITY_LOG in gw.messages(), 20, "the identity log line")
        finally:
            await switch.close()


async def test_impostor_at_the_signer_address_gets_503_and_readyz_says_why(
    test_pki: LabPki, echo: Echo, gateways: list[GatewayProcess]
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
        "tls": {"cert": "gateway.crt", "key": "gateway.key", "bundle": BUNDLE_A},
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
    test_pki: LabPki, echo: Echo, signer: SignerProcess, gateways: list[GatewayProcess]
) -> None:
    gw = await _start(gateways, test_pki, tcp_doc(test_pki, echo, signer.tcp_port), "/readyz")
    assert await gw.admin_get("/readyz") == 200
    token = await signer.sign_async(WEB_ID)
    for verify in ("remote", "local"):
        assert (await gw.get(f"/jwt/{verify}/1", token))[0] == 200, verify
        assert (await gw.get(f"/jwt/{verify}/1", "e30.e30.e30"))[0] == 401, verify
    # WatchKeys over the verified connection: a rotation reaches the gateway unasked
    rotated = await signer.rotate_async()
    await wait_for(
        lambda: any(m.startswith("signer key set") and "," in m for m in gw.messages()),
        20,
        "the pushed key set with two kids",
    )

    async def prepared_key_signs() -> bool:  # prepare_ahead (1 s) after the rotation
        return (await signer.sign_reply_async(WEB_ID)).kid == rotated.prepared_kid

    await wait_for(prepared_key_signs, 20, "the prepared key to sign", interval=0.1)
    newer = await signer.sign_async(WEB_ID)
    assert newer.split(".")[0] != token.split(".")[0]  # another kid in the header
    for verify in ("remote", "local"):
        assert (await gw.get(f"/jwt/{verify}/2", newer))[0] == 200, verify


async def test_a_slow_signer_connection_is_waited_for_not_dialled_again(
    test_pki: LabPki, echo: Echo, signer: SignerProcess, gateways: list[GatewayProcess]
) -> None:
    """A connection to the signer that takes a while (here 1.5 s between TCP accept and the
    signer's answer) is given time: the key set arrives over that one connection. Before, gRPC
    gave each attempt 100 ms (grpc.min_reconnect_backoff_ms is its minimum connect timeout) and
    dialled again and again: a slow TCP signer, or a loaded host, never got a connection up (and
    the check-then-use test above fell through to its impostor)."""
    switch = L4Switch(lambda index: signer.tcp_port, delay=1.5)
    await switch.start()
    try:
        gw = await _start(gateways, test_pki, tcp_doc(test_pki, echo, switch.port))
        await wait_for(lambda: _key_set_pushed(gw), 30, "the key set over WatchKeys")
        assert len(switch.backends) == 1, switch.backends
        token = await signer.sign_async(WEB_ID)
        assert (await gw.get("/jwt/remote/1", token))[0] == 200
        assert len(switch.backends) == 1, switch.backends
    finally:
        await switch.close()


async def test_reloaded_client_certificate_applies_to_new_signer_connections(
    test_pki: LabPki, echo: Echo, signer: SignerProcess, gateways: list[GatewayProcess]
) -> None:
    """The signer admits only the gateway's ID: once signer-client.crt holds another SVID, the
    next connection is refused by the signer (503); restored, the next one works again. Each
    request carries a fresh token, so every answer is a Verify on the current connection."""
    switch = L4Switch(lambda index: signer.tcp_port)
    await switch.start()

    async def status() -> int:
        return (await gw.get("/jwt/remote/x", await signer.sign_async(WEB_ID)))[0]

    async def eventually_200() -> None:
        async def verified() -> bool:
            return await status() == 200

        await wait_for(verified, 20, "the gateway to verify through the signer", interval=0.1)

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


# ---------------------------------------------------------------------------------------------
# The connector itself (gateway/signer_channel.py) against real TLS servers on loopback


def _chain(issued: Any) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in issued.chain]


def test_check_signer_identity_wants_the_pinned_svid_of_the_bundle(test_pki: LabPki) -> None:
    bundles = BundleSet.from_bundles([load_bundle(test_pki.bundle(A), A)])
    expected = parse_spiffe_id(SIGNER_ID)
    now = datetime.now(UTC)
    genuine = test_pki.cas[A].issue(SIGNER_ID)
    svid = check_signer_identity(_chain(genuine), bundles, expected, now=now)
    assert svid.spiffe_id == expected
    rogue_ca = CertificateAuthority.create("example.org")  # same trust domain, other keys
    cases = {
        "signer presented spiffe://example.org/orders": _chain(test_pki.cas[A].issue(UPSTREAM_ID)),
        "does not chain": _chain(rogue_ca.issue(SIGNER_ID)),
        "no trust bundle for trust domain other.org": _chain(
            test_pki.cas[B].issue("spiffe://other.org/signer")
        ),
        "expired": _chain(test_pki.cas[A].issue(SIGNER_ID, now=now - timedelta(hours=2))),
        "presented no certificate": [],
        "malformed certificate": [b"not DER"],
    }
    for fragment, chain in cases.items():
        with pytest.raises(SignerIdentityError, match=fragment):
            check_signer_identity(chain, bundles, expected, now=now)


def _signer_tls(pki: LabPki, **extra: Any) -> SignerTLS:
    doc = {"cert": "gateway.crt", "key": "gateway.key", "bundle": BUNDLE_A}
    return SignerTLS.model_validate(
        {**doc, "spiffe_id": SIGNER_ID, **extra}, context={"base_dir": pki.dir}
    )


@contextlib.asynccontextmanager
async def _tls_server(
    pki: LabPki, name: str, handler: Any, *, tls: bool = True
) -> AsyncIterator[int]:
    """A TLS server on loopback with the SVID ``name`` (issued with a DNS SAN localhost),
    requiring a client certificate of the lab's trust domain and offering ALPN h2."""
    ctx = None
    if tls:
        cert, key = pki.dir / f"{name}.crt", pki.dir / f"{name}.key"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        ctx.load_verify_locations(cafile=str(pki.bundle(A)))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols(["h2"])
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ctx)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def _connector(pki: LabPki, port: int, **kwargs: Any) -> AsyncIterator[Any]:
    connector = SignerConnector(f"127.0.0.1:{port}", _signer_tls(pki), **kwargs)
    target = await connector.start()
    path = target.removeprefix("unix:")
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    try:
        yield connector, path
    finally:
        await connector.close()
    assert not os.path.exists(os.path.dirname(path))


async def _round_trip(path: str, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:

        async def send() -> None:
            for i in range(0, len(payload), 1 << 16):
                writer.write(payload[i : i + (1 << 16)])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        received = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
        await sender
        return received
    finally:
        writer.close()


async def test_connector_relays_both_ways_once_the_signer_is_verified(test_pki: LabPki) -> None:
    test_pki.issue(SIGNER_ID, "signer", dns=["localhost"])
    payload = os.urandom(4 * 1024 * 1024)  # far more than the socket buffers: back-pressure
    async with (
        _tls_server(test_pki, "signer", _echo) as port,
        _connector(test_pki, port) as (connector, path),
    ):
        assert await _round_trip(path, payload) == payload
        assert connector.identity_error is None


WRONG_SIGNERS = {
    "upstream": "signer presented spiffe://example.org/orders, expected " + SIGNER_ID,
    "rogue": "the signer's certificate is not trusted: unable to get local issuer certificate",
    "expired": "the signer's certificate is not trusted: certificate has expired",
}


@pytest.mark.parametrize("name", sorted(WRONG_SIGNERS))
async def test_connector_closes_a_wrong_signer_before_relaying_a_byte(
    test_pki: LabPki, name: str
) -> None:
    """The upstream's SVID (DNS SAN localhost), the signer's ID from a CA outside the bundle,
    and the signer's own ID expired."""
    if name == "rogue":
        rogue = CertificateAuthority.create("example.org")
        rogue.issue(SIGNER_ID, dns=["localhost"]).write(test_pki.dir / name)
    elif name == "expired":
        old = datetime.now(UTC) - timedelta(hours=2)
        test_pki.cas[A].issue(SIGNER_ID, dns=["localhost"], now=old).write(test_pki.dir / name)
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            received.append(await reader.read())
        writer.close()

    async with (
        _tls_server(test_pki, name, record) as port,
        _connector(test_pki, port) as (connector, path),
    ):
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing relayed
        writer.close()
        if name == "upstream":  # the TLS handshake itself succeeded
            await wait_for(lambda: bool(received), 20, "the impostor's side to close")
        assert b"".join(received) == b""
        assert connector.identity_error == f"signer identity check failed: {WRONG_SIGNERS[name]}"


async def test_connector_bounds_connections_and_handshake_time(test_pki: LabPki) -> None:
    test_pki.issue(SIGNER_ID, "signer", dns=["localhost"])
    async with (
        _tls_server(test_pki, "signer", _echo) as port,
        _connector(test_pki, port, max_connections=2) as (connector, path),
    ):
        opened = [await asyncio.open_unix_connection(path) for _ in range(2)]
        for reader, writer in opened:
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        reader, writer = await asyncio.open_unix_connection(path)  # a third: refused at once
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        assert connector.active == 2
        for _, writer in opened:
            writer.close()
        await wait_for(lambda: connector.active == 0, 20, "the relays to end")
        assert await _round_trip(path, b"again") == b"again"

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)  # accepts TCP, never answers the TLS handshake

    async with (
        _tls_server(test_pki, "signer", silent, tls=False) as port,
        _connector(test_pki, port, connect_timeout=0.5) as (connector, path),
    ):
        reader, writer = await asyncio.open_unix_connection(path)
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        assert 0.4 <= time.monotonic() - started < 5
        writer.close()
        assert connector.identity_error is None  # unreachable is not an identity failure


async def test_gateway_recovers_once_the_genuine_signer_answers_again(
    test_pki: LabPki, echo: Echo, signer: SignerProcess, gateways: list[GatewayProcess]
) -> None:
    """A refused impostor does not lock the gateway out: when the address leads to the genuine
    signer again, the next connection is verified and verification resumes."""
    attacker = Attacker()
    async with impostor_server(test_pki, attacker) as (impostor_port, impostor):
        backend = [impostor_port]
        switch = L4Switch(lambda index: backend[0])
        await switch.start()
        try:
            gw = await _start(gateways, test_pki, tcp_doc(test_pki, echo, switch.port))
            await wait_for(lambda: IDENTITY_LOG in gw.messages(), 20, "the refusal")
            assert (await gw.get("/jwt/remote/1", await signer.sign_async(WEB_ID)))[0] == 503
            backend[0] = signer.tcp_port

            async def ready() -> bool:
                return await gw.admin_get("/readyz") == 200

            await wait_for(ready, 15, "the gateway's /readyz", interval=0.1)
            assert await gw.admin_get("/readyz") == 200
            for verify in ("remote", "local"):
                token = await signer.sign_async(WEB_ID)
                assert (await gw.get(f"/jwt/{verify}/2", token))[0] == 200
            assert impostor.calls == []
        finally:
            await switch.close()
