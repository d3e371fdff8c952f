"""Issue 9, item 3 end to end: a revoked key stops working at a real gateway.

A real `svidgate signer serve` on vault-kv (a real OpenBao dev server), a real `svidgate gateway
serve` process with one `verify: remote` and one `verify: local` route. A token verifies on
both (and is cached); then its key is deleted the way an operator would (`bao kv destroy`), or
with `svidgate signer revoke --kid`, and within poll_interval + a few seconds both routes answer
401 `unknown_kid` for it: the signer drops the key, pushes the new key set over WatchKeys, and
the gateway drops the cached verifications of that kid.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from gateway_harness import (
    WEB_ID,
    Echo,
    GatewayProcess,
    LabPki,
    build_request,
    gateway_config,
    raw_exchange,
)
from support.bao import BaoServer, bao_binary
from support.signer_process import AUDIENCE, SignerProcess
from support.waiting import wait_for
from svidgate.signer.v1 import signer_pb2

POLL = 0.5  # the signer's rotation.poll_interval
DEADLINE = POLL + 5.0


class Stack:
    """A vault-kv signer on the session's OpenBao and a gateway process verifying through it."""

    def __init__(self, directory: Path, bao: BaoServer) -> None:
        self.dir = directory
        self.bao = bao
        self.socket = directory / "signer.sock"
        self.signer_config = directory / "signer.yaml"
        self.kv_path = f"svidgate/revocation-{uuid.uuid4().hex[:8]}"
        self.signer = SignerProcess(
            self.signer_config, directory / "signer.log", socket=self.socket
        )
        self.gateway: GatewayProcess | None = None

    def write_signer_config(self) -> None:
        token = self.dir / "vault-token"
        token.write_text(self.bao.signer_token("1h"))
        token.chmod(0o600)
        self.signer_config.write_text(
            yaml.safe_dump(
                {
                    "trust_domain": "example.org",
                    "issuer": "spiffe://example.org/signer",
                    "listen": {"unix": str(self.socket)},
                    "authorization": {"sign": ["spiffe://example.org/**"]},
                    "keys": {
                        "source": "vault-kv",
                        "algorithm": "ES256",
                        "vault": {
                            "address": self.bao.address,
                            "auth": {"method": "token", "token_file": str(token)},
                            "kv_path": self.kv_path,
                        },
                    },
                    "tokens": {"default_ttl": "5m", "max_ttl": "15m", "clock_skew": "30s"},
                    "rotation": {"period": "1h", "prepare_ahead": "40s", "poll_interval": "500ms"},
                }
            )
        )

    async def start_signer(self) -> None:
        self.write_signer_config()
        await self.signer.start()

    async def start_gateway(self, pki: LabPki, echo: Echo) -> None:
        doc: dict[str, Any] = gateway_config(pki, echo.port)
        doc["signer"] = {"address": f"unix:{self.socket}", "timeout": "1s"}
        for verify in ("remote", "local"):
            doc["routes"].append(
                {
                    "name": f"jwt-{verify}",
                    "match": {"path_prefix": f"/jwt/{verify}"},
                    "upstream": "echo",
                    "allow": [WEB_ID],
                    "jwt": {"required": True, "audience": AUDIENCE, "verify": verify},
                }
            )
        self.gateway = GatewayProcess(pki, doc, "gateway-revocation")
        await self.gateway.start()

    async def sign(self) -> signer_pb2.SignResponse:
        return await self.signer.sign_reply_async(WEB_ID)

    async def get(self, pki: LabPki, path: str, token: str) -> tuple[int, str]:
        assert self.gateway is not None
        ctx = pki.client_context(*pki.files("web"))
        request = build_request("GET", path, [("Authorization", f"Bearer {token}")])
        resp = await raw_exchange(self.gateway.port, ctx, request)
        assert resp is not None
        reason = str(resp.json().get("reason", "")) if resp.status != 200 else ""
        return resp.status, reason

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.signer.running:
            self.signer.stop()


@pytest.fixture
async def stack(
    bao: BaoServer, short_dir: Path, test_pki: LabPki, echo: Echo
) -> AsyncIterator[Stack]:
    s = Stack(short_dir, bao)
    try:
        await s.start_signer()
        await s.start_gateway(test_pki, echo)
        yield s
    finally:
        s.stop()


async def both_routes(stack: Stack, pki: LabPki, token: str) -> list[tuple[int, str]]:
    return [await stack.get(pki, f"/jwt/{verify}/x", token) for verify in ("remote", "local")]


async def until_both(
    stack: Stack, pki: LabPki, token: str, wanted: list[tuple[int, str]], what: str
) -> None:
    """Retry both routes until they answer ``wanted`` (a deadline, no fixed sleep)."""
    got: list[tuple[int, str]] = []

    async def answered() -> bool:
        got[:] = await both_routes(stack, pki, token)
        return got == wanted

    try:
        await wait_for(answered, DEADLINE, what, interval=0.05)
    except AssertionError:
        raise AssertionError(f"{what}: both routes still answer {got}") from None


REVOKED = [(401, "unknown_kid"), (401, "unknown_kid")]
OK = [(200, ""), (200, "")]


async def test_a_key_destroyed_in_vault_or_revoked_fails_at_the_gateway(
    stack: Stack, test_pki: LabPki
) -> None:
    signed = await stack.sign()
    for _ in range(2):  # verified, then served from the gateway's caches
        assert await both_routes(stack, test_pki, signed.token) == OK

    # the operator destroys the key's KV version (version 1: the bootstrap key)
    env = {**os.environ, "BAO_ADDR": stack.bao.address, "BAO_TOKEN": stack.bao.root_token}
    done = subprocess.run(
        [bao_binary(), "kv", "destroy", "-mount=secret", "-versions=1", stack.kv_path],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    await until_both(stack, test_pki, signed.token, REVOKED, "after bao kv destroy")

    # a fresh key signs at once; both routes accept its tokens once the gateway has it
    fresh = await stack.sign()
    assert fresh.kid != signed.kid
    await until_both(stack, test_pki, fresh.token, OK, "the fresh key")
    assert await both_routes(stack, test_pki, fresh.token) == OK  # cached again

    # the same through the signer itself
    # --kid=KID: a kid (base64url) may begin with "-", which argparse takes for an option in
    # the two-word form `--kid KID`
    command = ["signer", "revoke", "--config", str(stack.signer_config), f"--kid={fresh.kid}"]
    done = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", *command],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"revoked {fresh.kid} (active ")
    await until_both(stack, test_pki, fresh.token, REVOKED, "after svidgate signer revoke")
    assert await both_routes(stack, test_pki, signed.token) == REVOKED
    newest = await stack.sign()
    await until_both(stack, test_pki, newest.token, OK, "the key after the revoked one")
