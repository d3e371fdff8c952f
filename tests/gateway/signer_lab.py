"""Real processes around a gateway and its signer for red-team and memory tests: a genuine
`svidgate signer serve` (Unix socket and mTLS TCP, file keys), `svidgate gateway serve`, an
impostor grpc.aio signer that answers every RPC with "valid", and an L4 switch that decides,
per TCP connection, which backend answers the signer's address."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from gateway_harness import GATEWAY_ID, LabPki, build_request, parse_response
from jwt.algorithms import ECAlgorithm
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc

SVIDGATE = [sys.executable, "-m", "svidgate.cli"]
SIGNER_ID = "spiffe://example.org/signer"
ISSUER = SIGNER_ID
AUDIENCE = "orders"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what or 'a condition'}"
        await asyncio.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class SignerProc:
    """`svidgate signer serve` with file keys on a Unix socket and, if ``tcp``, on mTLS TCP
    with the SVID ``signer.crt`` (a DNS SAN ``localhost``) of the lab's trust domain."""

    def __init__(self, pki: LabPki, *, tcp: bool = False) -> None:
        self.dir = pki.dir / "signer"
        self.dir.mkdir(exist_ok=True)
        self.socket = self.dir / "run" / "signer.sock"
        self.port = free_port() if tcp else 0
        listen: dict[str, Any] = {"unix": "run/signer.sock"}
        doc: dict[str, Any] = {
            "trust_domain": "example.org",
            "issuer": ISSUER,
            "listen": listen,
            "authorization": {
                "verify": [GATEWAY_ID],
                "sign": ["spiffe://example.org/**"],
                # the extra claims the cache-memory test mints (the signer refuses others)
                "claims": {"roles": ["spiffe://example.org/**"], "n": ["spiffe://example.org/**"]},
            },
            "keys": {"source": "file", "algorithm": "ES256", "dir": "keys"},
            # clock_skew: prepare_ahead 1s >= poll_interval 500ms + clock_skew 500ms
            "tokens": {"default_ttl": "10m", "max_ttl": "15m", "clock_skew": "500ms"},
            "rotation": {"period": "24h", "prepare_ahead": "1s", "poll_interval": "500ms"},
        }
        if tcp:
            pki.issue(SIGNER_ID, "signer", dns=["localhost"], ips=["127.0.0.1"])
            listen["tcp"] = f"127.0.0.1:{self.port}"
            doc["tls"] = {
                "cert": str(pki.dir / "signer.crt"),
                "key": str(pki.dir / "signer.key"),
                "bundle": str(pki.dir / "bundle.pem"),
            }
        self.config = self.dir / "signer.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.log = self.dir / "signer.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        (self.dir / "run").mkdir(exist_ok=True)
        self.socket.unlink(missing_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*SVIDGATE, "signer", "serve", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            if self.socket.exists():
                with contextlib.suppress(grpc.RpcError):
                    await self.sign("spiffe://example.org/ns/shop/sa/web")
                    return
            await asyncio.sleep(0.1)
        raise AssertionError("signer did not start: " + self.log.read_text()[-3000:])

    def stop(self) -> None:
        _stop(self.proc)

    @contextlib.asynccontextmanager
    async def stub(self) -> AsyncIterator[Any]:
        async with grpc.aio.insecure_channel(f"unix:{self.socket}") as channel:
            yield signer_pb2_grpc.SignerStub(channel)  # type: ignore[no-untyped-call]

    async def sign(self, subject: str, *, claims: dict[str, Any] | None = None) -> str:
        async with self.stub() as stub:
            reply = await stub.Sign(
                signer_pb2.SignRequest(
                    subject=subject,
                    audience=[AUDIENCE],
                    claims_json=json.dumps(claims) if claims else "",
                ),
                timeout=10,
            )
        return str(reply.token)

    async def rotate(self) -> None:
        async with self.stub() as stub:
            await stub.Rotate(signer_pb2.RotateRequest(), timeout=10)


class GatewayProc:
    """`svidgate gateway serve` as a child process; stderr (JSON lines) goes to ``log``."""

    def __init__(self, pki: LabPki, doc: dict[str, Any], name: str = "gateway") -> None:
        self.pki = pki
        self.port, self.admin = free_port(), free_port()
        doc = {**doc, "listen": f"127.0.0.1:{self.port}", "admin_listen": f"127.0.0.1:{self.admin}"}
        self.config = pki.dir / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        self.log = pki.dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [*SVIDGATE, "gateway", "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        for _ in range(300):
            if await self.admin_get("/healthz") == 200:
                return
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            await asyncio.sleep(0.1)
        raise AssertionError("gateway did not start: " + self.log.read_text()[-3000:])

    def stop(self) -> None:
        _stop(self.proc)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def messages(self) -> list[str]:
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(str(json.loads(line).get("msg", "")))
        return out

    async def admin_get(self, path: str) -> int | None:
        try:
            async with (
                aiohttp.ClientSession() as session,
                session.get(f"http://127.0.0.1:{self.admin}{path}") as resp,
            ):
                return resp.status
        except aiohttp.ClientError:
            return None

    async def get(self, path: str, token: str, client: str = "web") -> tuple[int, str | None]:
        """One request over a fresh mTLS connection: (status, Retry-After)."""
        files = self.pki.dir / f"{client}.crt", self.pki.dir / f"{client}.key"
        ctx = self.pki.client_context(*files)
        data = build_request("GET", path, [("Authorization", f"Bearer {token}")])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=ctx, server_hostname="localhost"
        )
        try:
            writer.write(data)
            received = await asyncio.wait_for(reader.read(), 20)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        resp = parse_response(received)
        return resp.status, resp.header("Retry-After")


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
        root_certificates=(pki.dir / "bundle.pem").read_bytes(),
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
    ``choose(index)`` (index counts connections from 0); ``drop()`` cuts every open one."""

    def __init__(self, choose: Callable[[int], int]) -> None:
        self.choose = choose
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
