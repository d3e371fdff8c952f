"""The gateway on SVIDs and bundles from a real SPIRE agent (tls.source: workload_api).

SPIRE (server + agent, tests/support/spire.py) issues every identity here: the gateway runs as
a child process with its own primary group (``unix:gid:GW_GID``), the test process (gid 0) is
the client and the upstream. The test PKI's other.org CA is a federated trust domain in SPIRE.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from gateway_harness import Echo, GatewayProcess, LabPki, parse_response, start_echo
from support.pki import B_ID, A, B
from support.spire import Spire
from support.waiting import wait_for
from svidgate.gateway.config import load_config
from svidgate.gateway.tls import PemKeyPair, build_server_context
from svidgate.pki.bundle import BundleSet, load_bundle

from svidgate.config import ConfigError

TD = "spire.test"
GW_ID = f"spiffe://{TD}/gateway"
CLIENT_ID = f"spiffe://{TD}/ns/shop/sa/web"
UPSTREAM_ID = f"spiffe://{TD}/orders"
GW_GID = 4242
REQUEST = b"GET /orders HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"


def write_svid(svid: Any, directory: Path, name: str) -> tuple[Path, Path]:
    """A py-spiffe X509Svid as PEM files (key 0600) for an ssl context."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    cert.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in svid.cert_chain))
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(
            svid.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert, key


def tls_context(side: int, cert: Path, key: Path, cafile: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(side)
    ctx.check_hostname = False  # SVIDs name URIs, not hosts
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(cafile))
    return ctx


def gateway_doc(spire: Spire, echo_port: int, **tls: Any) -> dict[str, Any]:
    return {
        "tls": {"source": "workload_api", "workload_api": {"socket": spire.socket}, **tls},
        "trust_domains": {TD: {"source": "workload_api"}, B: {"source": "workload_api"}},
        "upstreams": {
            "orders": {
                "url": f"https://127.0.0.1:{echo_port}",
                # no cert, no bundle: the gateway's SVID and the spire.test bundle from SPIRE
                "tls": {"spiffe_id": UPSTREAM_ID},
            }
        },
        "routes": [
            {
                "name": "orders",
                "match": {"path_prefix": "/orders"},
                "upstream": "orders",
                "allow": [CLIENT_ID, B_ID],
            }
        ],
        "reload_interval": "0s",
        "drain_timeout": "2s",
        "workers": 2,  # each worker (forked) streams from the agent itself
        "limits": {"idle_timeout": "300s"},
    }


async def get(port: int, ctx: ssl.SSLContext, path: str = "/orders") -> tuple[int, bytes]:
    """One request on a new connection: (status, the gateway certificate's DER)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 20)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode()
        )
        data = await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()
    return parse_response(data).status, der


class Lab:
    """SPIRE with the gateway's, the client's and the upstream's entries, the echo upstream
    on its SPIRE SVID, the client's TLS context and the running gateway (``gw``)."""

    def __init__(self, spire: Spire, directory: Path, echo: Echo, client: ssl.SSLContext):
        self.spire, self.dir, self.echo, self.client = spire, directory, echo, client
        self.bundle = directory / "spire-bundle.pem"
        self.gw: GatewayProcess


@contextlib.asynccontextmanager
async def running_lab(
    spire: Spire, test_pki: LabPki, tmp_path: Path, *, gateway_ttl: int | None = None
) -> AsyncIterator[Lab]:
    """:func:`make_lab`, then the gateway (2 workers, gid GW_GID) on SPIRE; all stopped after."""
    lab, runner = await make_lab(spire, test_pki, tmp_path, gateway_ttl=gateway_ttl)
    lab.gw = GatewayProcess(test_pki, gateway_doc(lab.spire, lab.echo.port), group=GW_GID)
    try:
        await lab.gw.start(timeout=60)
        yield lab
    finally:
        lab.gw.stop()
        await runner.cleanup()


async def make_lab(
    spire: Spire, test_pki: LabPki, tmp_path: Path, *, gateway_ttl: int | None = None
) -> tuple[Lab, Any]:
    spire.set_federated_bundle(B, test_pki.bundle(B))
    spire.register(GW_ID, gid=GW_GID, x509_ttl=gateway_ttl, federates_with=(B,))
    spire.register(CLIENT_ID, gid=0)
    spire.register(UPSTREAM_ID, gid=0)
    bundle = tmp_path / "spire-bundle.pem"
    bundle.write_bytes(spire.bundle_pem())
    up_cert, up_key = write_svid(spire.fetch_x509(UPSTREAM_ID), tmp_path, "upstream")
    cl_cert, cl_key = write_svid(spire.fetch_x509(CLIENT_ID), tmp_path, "client")
    echo_ctx = tls_context(ssl.PROTOCOL_TLS_SERVER, up_cert, up_key, bundle)
    echo, runner = await start_echo(test_pki, context=echo_ctx)
    client = tls_context(ssl.PROTOCOL_TLS_CLIENT, cl_cert, cl_key, bundle)
    return Lab(spire, tmp_path, echo, client), runner


async def test_spire_client_reaches_a_route_through_a_gateway_on_a_spire_svid(
    spire: Callable[..., Spire], test_pki: LabPki, tmp_path: Path
) -> None:
    async with running_lab(spire(trust_domain=TD), test_pki, tmp_path) as lab:
        status, der = await get(lab.gw.port, lab.client)
        assert status == 200
        # the listener presents the SPIRE SVID of the gateway, and so does the upstream leg
        assert GW_ID.encode() in der
        assert lab.echo.seen[-1]["peer"] == GW_ID
        xfcc = dict(lab.echo.seen[-1]["headers"]).get("X-Forwarded-Client-Cert", "")
        assert f"URI={CLIENT_ID}" in xfcc
        # other.org is federated: its bundle reaches the gateway through the agent
        b_cert, b_key = test_pki.issue(B_ID, "web-b")
        federated = tls_context(ssl.PROTOCOL_TLS_CLIENT, b_cert, b_key, lab.bundle)
        assert (await get(lab.gw.port, federated))[0] == 200


async def keep_alive(port: int, ctx: ssl.SSLContext) -> tuple[asyncio.StreamReader, Any]:
    """A connection that has served one request and stays open (keep-alive)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    writer.write(REQUEST.replace(b"Connection: close", b"Connection: keep-alive"))
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
    assert parse_response(head).status == 200
    await asyncio.wait_for(
        reader.readexactly(int(parse_response(head).header("Content-Length") or 0)), 20
    )
    return reader, writer


async def test_a_bundle_update_from_the_agent_re_checks_open_connections(
    spire: Callable[..., Spire], test_pki: LabPki, tmp_path: Path
) -> None:
    async with running_lab(spire(trust_domain=TD), test_pki, tmp_path) as lab:
        gw = lab.gw
        b_cert, b_key = test_pki.issue(B_ID, "web-b")
        federated = tls_context(ssl.PROTOCOL_TLS_CLIENT, b_cert, b_key, lab.bundle)
        reader, writer = await keep_alive(gw.port, federated)
        # other.org's CA is replaced in SPIRE (here by an unrelated CA): the agent pushes the new
        # bundle, and the gateway closes the open connection whose chain no longer verifies
        lab.spire.set_federated_bundle(B, lab.bundle)
        assert await asyncio.wait_for(reader.read(), 90) == b""
        writer.close()
        with pytest.raises((ssl.SSLError, OSError, IndexError)):
            await get(gw.port, federated)  # refused at the handshake or right after it
        assert (await get(gw.port, lab.client))[0] == 200  # spire.test clients are unaffected
        # de-federated: the agent sends no other.org bundle at all; the update still applies
        # (other.org trusted no more) rather than being refused, so the SVID keeps rotating
        lab.spire.server("bundle", "delete", "-id", f"spiffe://{B}", "-mode", "dissociate")
        await wait_for(
            lambda: any("trusted no more" in m for m in gw.messages()), 90, "the de-federation"
        )
        assert not any("update refused" in m for m in gw.messages())
        assert (await get(gw.port, lab.client))[0] == 200


async def requests_until(
    port: int, ctx: ssl.SSLContext, done: Callable[[set[bytes]], bool], timeout: float
) -> tuple[int, list[str], set[bytes]]:
    """Steady load (4 clients, a new TLS connection per request) until ``done(certificates
    seen)``; returns (requests, failures, certificates)."""
    certs: set[bytes] = set()
    failures: list[str] = []
    count = 0
    deadline = time.monotonic() + timeout

    async def client() -> None:
        nonlocal count
        while not done(certs) and time.monotonic() < deadline and len(failures) < 20:
            try:
                status, der = await get(port, ctx)
            except (TimeoutError, OSError, ssl.SSLError) as exc:
                failures.append(repr(exc))
                continue
            count += 1
            certs.add(der)
            if status != 200:
                failures.append(f"status {status}")

    await asyncio.gather(*(client() for _ in range(4)))
    return count, failures, certs


async def test_gateway_svid_rotates_under_load_with_no_failed_request(
    spire: Callable[..., Spire], test_pki: LabPki, tmp_path: Path
) -> None:
    # SPIRE's agent renews an SVID once half its lifetime is gone: 20 s -> every ~10 s
    async with running_lab(spire(trust_domain=TD), test_pki, tmp_path, gateway_ttl=20) as lab:
        # a connection opened (and used) before the rotation stays usable after it
        reader, writer = await keep_alive(lab.gw.port, lab.client)
        count, failures, certs = await requests_until(
            lab.gw.port, lab.client, lambda seen: len(seen) >= 3, timeout=120
        )
        assert not failures, failures[:5]
        assert len(certs) >= 3, f"saw {len(certs)} gateway certificates in {count} requests"
        writer.write(REQUEST)
        assert parse_response(await asyncio.wait_for(reader.read(), 20)).status == 200
        writer.close()
        assert any("applied the Workload API update" in m for m in lab.gw.messages())


async def test_the_supervisor_never_opens_the_workload_api(
    spire: Callable[..., Spire], test_pki: LabPki, tmp_path: Path
) -> None:
    # gRPC does not survive fork: a supervisor that had opened the Workload API (a gRPC
    # channel) before forking could fork while gRPC's threads were still winding down, and a
    # worker hung at start-up (seen once in 3 runs of this file). It checks the config in a
    # short-lived child instead: it never runs a gRPC thread of its own.
    async with running_lab(spire(trust_domain=TD), test_pki, tmp_path) as lab:
        assert lab.gw.proc is not None
        tasks = Path(f"/proc/{lab.gw.proc.pid}/task")
        names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
        assert not [name for name in names if name.startswith("grpc")], names
        workers = [
            int(pid)
            for pid in Path(f"/proc/{lab.gw.proc.pid}/task/{lab.gw.proc.pid}/children")
            .read_text()
            .split()
        ]
        assert len(workers) == 2
        assert (await get(lab.gw.port, lab.client))[0] == 200


async def test_gateway_keeps_serving_while_the_agent_restarts(
    spire: Callable[..., Spire], test_pki: LabPki, tmp_path: Path
) -> None:
    async with running_lab(spire(trust_domain=TD), test_pki, tmp_path, gateway_ttl=30) as lab:
        _, before = await get(lab.gw.port, lab.client)
        lab.spire.stop_agent()
        started = time.monotonic()
        # no agent: every request still succeeds on the last SVID (its lifetime: 30 s)
        count, failures, _ = await requests_until(
            lab.gw.port, lab.client, lambda _: time.monotonic() - started > 4, timeout=30
        )
        assert count > 0 and not failures, failures[:5]
        lab.spire.start_agent()
        # the gateway reconnects by itself and takes the agent's next SVID
        count, failures, certs = await requests_until(
            lab.gw.port, lab.client, lambda seen: bool(seen - {before}), timeout=90
        )
        assert not failures, failures[:5]
        assert certs - {before}, "no new SVID after the agent came back"
        assert lab.gw.running


def start_up_error(tmp_path: Path, socket: str) -> str:
    """``svidgate gateway serve`` on the Workload API at ``socket`` must exit 2 with one line
    on stderr; returns that line."""
    doc = {
        "listen": "127.0.0.1:0",
        "tls": {"source": "workload_api", "workload_api": {"socket": socket, "timeout": "2s"}},
        "trust_domains": {TD: {"source": "workload_api"}},
    }
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "gateway", "serve", "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        group=GW_GID,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    return lines[0]


def test_start_up_fails_clearly_without_the_agent(tmp_path: Path) -> None:
    socket = tmp_path / "missing" / "agent.sock"
    line = start_up_error(tmp_path, f"unix://{socket}")
    assert "tls.workload_api: no Workload API socket at" in line and str(socket) in line


def test_start_up_fails_clearly_when_the_agent_has_no_svid_for_it(
    spire: Callable[..., Spire], tmp_path: Path
) -> None:
    line = start_up_error(tmp_path, spire(trust_domain=TD).socket)
    assert "tls.workload_api: no X.509 SVID from the Workload API" in line


def config_error(tmp_path: Path, tls: dict[str, Any], **more: Any) -> str:
    doc = {"listen": "127.0.0.1:0", "tls": tls, "trust_domains": {TD: {"source": "workload_api"}}}
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({**doc, **more}))
    with pytest.raises(ConfigError) as err:
        load_config(config)
    return str(err.value)


@pytest.mark.parametrize(
    ("tls", "more", "expected"),
    [
        ({"source": "workload_api", "cert": "a.crt"}, {}, "tls.cert: not used with tls.source"),
        ({"key": "a.key"}, {}, "tls.cert: required when tls.source is files"),
        (
            {"source": "workload_api", "workload_api": {"socket": "unix:agent.sock"}},
            {},
            "tls.workload_api.socket: expected unix:///ABSOLUTE/PATH",
        ),
        (
            {"source": "workload_api"},
            {"trust_domains": {TD: {"source": "workload_api", "bundle": "b.pem"}}},
            f"trust_domains.{TD}.bundle: not used with source: workload_api",
        ),
        (
            {"source": "workload_api"},
            {"trust_domains": {TD: {}}},
            f"trust_domains.{TD}.bundle: required (or source: workload_api)",
        ),
        (
            {"source": "workload_api"},
            {
                "upstreams": {
                    "x": {"url": "https://127.0.0.1:1", "tls": {"spiffe_id": "spiffe://o.org/x"}}
                }
            },
            "upstreams.x.tls.bundle: required: o.org is not in trust_domains",
        ),
    ],
)
def test_workload_api_config_names_the_field(
    tmp_path: Path, tls: dict[str, Any], more: dict[str, Any], expected: str
) -> None:
    assert expected in config_error(tmp_path, tls, **more)


def handshake_peer_der(server: ssl.SSLContext, client: ssl.SSLContext) -> bytes:
    """A TLS handshake in memory; the DER of the certificate the server presented."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    s = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.mark.parametrize("memfd", [True, False])
def test_an_svid_in_memory_serves_handshakes_and_leaves_no_key_file(
    pki: LabPki, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, memfd: bool
) -> None:
    """The Workload API's SVID is loaded without a key file: through a memfd, or (where there
    is none) a 0600 file in a private directory that is gone right after loading."""
    cert, key = pki.files("gateway")
    pair = PemKeyPair(cert.read_bytes(), key.read_bytes())
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    if not memfd:
        monkeypatch.delattr(os, "memfd_create")
    server = build_server_context(
        pair, None, BundleSet.from_bundles([load_bundle(pki.bundle(), A)])
    )
    client = pki.client_context(*pki.files("web"))
    client.check_hostname = False
    der = handshake_peer_der(server, client)
    assert der == x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    assert list(tmp_path.iterdir()) == []
