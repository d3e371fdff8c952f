"""The signer's TCP listener on an SVID and bundle from a real SPIRE agent (tls.source:
workload_api): a client with a SPIRE SVID mints a token over mTLS, and the signer's own SVID
rotates without a restart. The signer runs in this process (gid 0), the only workload with an
entry here; the client's SVID is minted by the SPIRE server (``spire-server x509 mint``)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import yaml
from signer_harness import (
    CLIENT_ID,
    SIGNER_ID,
    TD,
    base_config,
    running_signer,
    signer_pb2,
    wait_for,
    write_config,
)
from support.spire import Spire
from svidgate.signer.v1 import signer_pb2_grpc


async def served_certificate(port: int, cert: Path, key: Path, bundle: Path) -> bytes:
    """The DER of the certificate the signer presents to a new TLS connection."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.set_alpn_protocols(["h2"])
    _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx), 20)
    der: bytes = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    writer.close()
    return der


async def test_signer_serves_mtls_on_a_spire_svid_that_rotates(
    spire: Callable[..., Spire], short_dir: Path, tmp_path: Path
) -> None:
    lab = spire(trust_domain=TD)
    lab.register(SIGNER_ID, gid=0, x509_ttl=20, dns=("localhost",))
    lab.fetch_x509(SIGNER_ID)  # the agent has it
    cert, key = lab.mint_x509(CLIENT_ID, tmp_path / "client")
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(lab.bundle_pem())
    doc = base_config(short_dir / "s.sock", short_dir / "keys")
    doc["listen"]["tcp"] = "127.0.0.1:0"
    doc["tls"] = {"source": "workload_api", "workload_api": {"socket": lab.socket}}
    async with running_signer(write_config(short_dir, doc)) as server:
        assert server.tcp_port
        first = await served_certificate(server.tcp_port, cert, key, bundle)
        assert SIGNER_ID.encode() in first
        creds = grpc.ssl_channel_credentials(
            root_certificates=bundle.read_bytes(),
            private_key=key.read_bytes(),
            certificate_chain=cert.read_bytes(),
        )
        async with grpc.aio.secure_channel(f"localhost:{server.tcp_port}", creds) as channel:
            stub = signer_pb2_grpc.SignerStub(channel)  # type: ignore[no-untyped-call]
            signed = await stub.Sign(signer_pb2.SignRequest(audience=["orders"]), timeout=20)
            assert signed.token.count(".") == 2

            async def rotated() -> bool:
                served = await served_certificate(server.tcp_port or 0, cert, key, bundle)
                return served != first

            # a 20 s SVID is renewed after ~10 s; the new one serves new handshakes
            await wait_for(rotated, 60, "the signer to serve its next SPIRE SVID", interval=1.0)
            again = await stub.Sign(signer_pb2.SignRequest(audience=["orders"]), timeout=20)
            assert again.token


def test_signer_start_up_fails_clearly_without_the_agent(short_dir: Path) -> None:
    socket = short_dir / "missing" / "agent.sock"
    doc = base_config(short_dir / "s.sock", short_dir / "keys")
    doc["listen"]["tcp"] = "127.0.0.1:0"
    doc["tls"] = {
        "source": "workload_api",
        "workload_api": {"socket": f"unix://{socket}", "timeout": "1s"},
    }
    config = short_dir / "signer.yaml"
    config.write_text(yaml.safe_dump(doc))
    done = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "signer", "serve", "--config", str(config)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "tls.workload_api: no Workload API socket at" in lines[0] and str(socket) in lines[0]
