"""The red-team lab around a gateway and its signer (tests/gateway/test_signer_identity.py and
the memory test): the lab's genuine signer (a file-key `svidgate signer serve`, optionally also
on mTLS TCP, started through support.signer_process like every signer process), JWT routes for a
gateway config, an impostor grpc.aio signer that answers every RPC with "valid", and an L4
switch that decides, per TCP connection, which backend answers the signer's address. Gateway
processes are gateway_harness.GatewayProcess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from gateway_harness import BUNDLE_A, GATEWAY_ID, LabPki
from jwt.algorithms import ECAlgorithm
from support.pki import SIGNER_ID, TD
from support.ports import free_port
from support.signer_process import AUDIENCE, SignerProcess
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc

ISSUER = SIGNER_ID
# the extra claims the memory test puts in its tokens (authorization.claims allows them)
LAB_CLAIMS = ("roles", "n")


def lab_signer(pki: LabPki, *, tcp: bool = False) -> SignerProcess:
    """The lab's genuine signer (unstarted): file keys in ``pki.dir``/signer, the Unix socket
    there and, with ``tcp``, mTLS on a free port with the session PKI's ``signer`` SVID (DNS SAN
    ``localhost``); only the gateway may verify."""
    extra: dict[str, Any] = {
        "authorization": {
            "verify": [GATEWAY_ID],
            "claims": {claim: [f"spiffe://{TD}/**"] for claim in LAB_CLAIMS},
        },
        "tokens": {"default_ttl": "10m"},
        # the memory test's largest tokens (~7 KB) carry more than the default 4 KiB of claims
        "limits": {"claims_bytes": 6144},
    }
    if tcp:
        cert, key = pki.files("signer")
        extra["listen"] = {"tcp": f"127.0.0.1:{free_port()}"}
        extra["tls"] = {"cert": str(cert), "key": str(key), "bundle": str(pki.bundle())}
    return SignerProcess.file_keys(pki.dir / "signer", extra)


def jwt_routes(doc: dict[str, Any], allow: list[str]) -> None:
    """Add /jwt/remote and /jwt/local (bind: subject) to a harness gateway config."""
    for verify in ("remote", "local"):
        doc["routes"].append(
            {
                "name": f"jwt-{verify}",
                "match": {"path_prefix": f"/jwt/{verify}"},
                "upstream": "echo",
                "allow": allow,
                "jwt": {"audience": AUDIENCE, "bind": "subject", "verify": verify},
            }
        )


# ---------------------------------------------------------------------------------------------
# the red team


class Attacker:
    """The impostor's signing key: tokens it mints verify against the JWKS it publishes."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = ECAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        self.jwk = {**jwk, "kid": "impostor", "alg": "ES256", "use": "sig"}

    def token(self, subject: str) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": AUDIENCE, "iat": now, "exp": now + 600}
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "impostor"})


class ImpostorSigner(signer_pb2_grpc.SignerServicer):
    """Says every token is valid (for its ``sub``) and publishes the attacker's key."""

    def __init__(self, attacker: Attacker) -> None:
        self.attacker = attacker
        self.calls: list[str] = []

    def _jwks(self) -> Any:
        doc = {"keys": [self.attacker.jwk], "issuer": ISSUER}
        return signer_pb2.JWKS(
            jwks_json=json.dumps(doc), sequence=1, max_ttl_seconds=900, clock_skew_seconds=30
        )

    async def Verify(self, request: Any, context: Any) -> Any:
        self.calls.append("Verify")
        try:
            subject = jwt.decode(request.token, options={"verify_signature": False})["sub"]
        except Exception:
            subject = request.expected_subject or "spiffe://example.org/ns/shop/sa/web"
        now = int(time.time())
        claims = {"iss": ISSUER, "sub": subject, "aud": list(request.audience), "exp": now + 600}
        return signer_pb2.VerifyResponse(
            claims_json=json.dumps(claims), kid="impostor", subject=subject, expires_at=now + 600
        )

    async def GetJWKS(self, request: Any, context: Any) -> Any:
        self.calls.append("GetJWKS")
        return self._jwks()

    async def WatchKeys(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.calls.append("WatchKeys")
        yield self._jwks()
        await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def impostor_server(pki: LabPki, attacker: Attacker) -> AsyncIterator[tuple[int, Any]]:
    """A grpc.aio server with the upstream's SVID (its ID is not the signer's; DNS SAN
    ``localhost``, same trust domain) that requires a client certificate of that domain."""
    servicer = ImpostorSigner(attacker)
    server = grpc.aio.server()
    signer_pb2_grpc.add_SignerServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    creds = grpc.ssl_server_credentials(
        [((pki.dir / "upstream.key").read_bytes(), (pki.dir / "upstream.crt").read_bytes())],
        root_certificates=(pki.dir / BUNDLE_A).read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield port, servicer
    finally:
        await server.stop(grace=None)


class L4Switch:
    """A TCP relay at the signer's address that picks the backend per connection with
    ``choose(index)`` (index counts connections from 0); ``drop()`` cuts every open one.
    ``delay`` seconds pass before each connection is relayed (a slow network or backend)."""

    def __init__(self, choose: Callable[[int], int], delay: float = 0.0) -> None:
        self.choose = choose
        self.delay = delay
        self.backends: list[int] = []  # the backend port each connection went to
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.drop()
        if self._server is not None:
            self._server.close()

    def drop(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = self.choose(len(self.backends))
        self.backends.append(port)
        await asyncio.sleep(self.delay)
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_w}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_w), pump(up_r, writer))
        self._writers -= {writer, up_w}
