"""Issue 14, item 2: the signer's keys over HTTP(S) for third-party verifiers — OpenID Connect
discovery, the JWKS and the same keys as a SPIFFE bundle — served by a real `svidgate signer
serve` process (file keys) and read with a real HTTP client; py-spiffe verifies a token the
signer minted against ``/bundle``."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from spiffe import JwtBundle, JwtSvid, TrustDomain
from support.pki import SIGNER_ID, TD, WEB_ID, Pki
from support.ports import free_port
from support.signer_process import AUDIENCE, SignerProcess
from support.waiting import wait_for
from svidgate.signer.v1 import signer_pb2

PUBLIC_URL = "https://signer.example.org"
SETTLE = 10.0  # poll_interval (500ms) plus a generous margin on a loaded machine


def start_signer(directory: Path, discovery: dict[str, Any]) -> tuple[SignerProcess, int]:
    port = free_port()
    extra = {"discovery": {"listen": f"127.0.0.1:{port}", "public_url": PUBLIC_URL, **discovery}}
    proc = SignerProcess.file_keys(directory, extra)
    proc.start_sync()
    return proc, port


@pytest.fixture
def signer(tmp_path: Path) -> Iterator[tuple[SignerProcess, str]]:
    proc, port = start_signer(tmp_path / "s", {})
    try:
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


async def get_json(base: str, path: str, **kwargs: Any) -> tuple[int, CIMultiDict[str], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(base + path, **kwargs) as response,
    ):
        body = await response.read()
        return response.status, CIMultiDict(response.headers), json.loads(body) if body else None


async def kids(base: str, path: str = "/keys") -> set[str]:
    _, _, doc = await get_json(base, path)
    return {key["kid"] for key in doc["keys"]}


async def test_documents_describe_the_published_keys(
    signer: tuple[SignerProcess, str],
) -> None:
    proc, base = signer
    status, headers, config = await get_json(base, "/.well-known/openid-configuration")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert config == {
        "issuer": SIGNER_ID,
        "jwks_uri": f"{PUBLIC_URL}/keys",
        "id_token_signing_alg_values_supported": ["ES256"],
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
    }
    # /keys is exactly what GetJWKS publishes (one source of truth)
    published = proc.call("GetJWKS", signer_pb2.GetJWKSRequest())
    status, headers, jwks = await get_json(base, "/keys")
    assert status == 200 and jwks == json.loads(published.jwks_json)
    assert jwks["keys"] and all(k["use"] == "sig" and k["alg"] == "ES256" for k in jwks["keys"])
    status, headers, bundle = await get_json(base, "/bundle")
    assert status == 200
    assert bundle["spiffe_sequence"] == published.sequence
    assert bundle["spiffe_refresh_hint"] == 1  # rotation.poll_interval 500ms, at least 1s
    assert [k["kid"] for k in bundle["keys"]] == [k["kid"] for k in jwks["keys"]]
    assert all(k["use"] == "jwt-svid" for k in bundle["keys"])
    # cache validators: max-age never longer than the poll interval (500ms -> 0)
    assert headers["Cache-Control"] == "public, max-age=0"
    status, again, _ = await get_json(base, "/bundle", headers={"If-None-Match": headers["ETag"]})
    assert status == 304 and again["ETag"] == headers["ETag"]


async def test_only_get_and_head_on_known_paths(signer: tuple[SignerProcess, str]) -> None:
    _, base = signer
    status, _, body = await get_json(base, "/nothing-here")
    assert (status, body) == (404, {"error": "not_found"})
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/keys", data=b"x" * 100) as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET, HEAD"
            assert await response.json() == {"error": "method_not_allowed"}
        async with session.head(base + "/keys") as response:
            assert response.status == 200 and await response.read() == b""
            assert int(response.headers["Content-Length"]) > 0


async def test_rotation_and_revocation_show_within_one_poll(
    signer: tuple[SignerProcess, str],
) -> None:
    proc, base = signer
    first = await kids(base)
    _, _, before = await get_json(base, "/bundle")
    rotated = await proc.rotate_async()
    new_kid = rotated.prepared_kid or rotated.active_kid
    assert new_kid and new_kid not in first
    for path in ("/keys", "/bundle"):
        await wait_for(has_kid(base, path, new_kid, True), SETTLE, f"{new_kid} in {path}")
    revoked = sorted(first)[0]
    await asyncio.to_thread(proc.call, "Revoke", signer_pb2.RevokeRequest(kid=revoked))
    for path in ("/keys", "/bundle"):
        await wait_for(has_kid(base, path, revoked, False), SETTLE, f"{revoked} gone from {path}")
    _, _, after = await get_json(base, "/bundle")
    assert after["spiffe_sequence"] > before["spiffe_sequence"]


def has_kid(base: str, path: str, kid: str, wanted: bool) -> Any:
    async def check() -> bool:
        return (kid in await kids(base, path)) == wanted

    return check


async def test_py_spiffe_verifies_a_token_against_the_bundle(
    signer: tuple[SignerProcess, str],
) -> None:
    proc, base = signer
    token = await proc.sign_async(WEB_ID, AUDIENCE)
    async with aiohttp.ClientSession() as session, session.get(base + "/bundle") as response:
        raw = await response.read()
    bundle = JwtBundle.parse(TrustDomain(TD), raw)
    svid = JwtSvid.parse_and_validate(token, bundle, [AUDIENCE])
    assert str(svid.spiffe_id) == WEB_ID
    # and a token the bundle does not hold a key for is refused
    other = JwtBundle.parse(TrustDomain(TD), b'{"keys": []}')
    with pytest.raises(Exception, match=r"(?i)key"):
        JwtSvid.parse_and_validate(token, other, [AUDIENCE])


async def test_https_and_the_connection_cap(tmp_path: Path, pki: Pki) -> None:
    cert, key = pki.files("signer")
    proc, port = start_signer(
        tmp_path / "s", {"tls": {"cert": str(cert), "key": str(key)}, "max_connections": 2}
    )
    try:
        ctx = pki.client_context(None, None)
        status, _, config = await get_json(
            f"https://127.0.0.1:{port}", "/.well-known/openid-configuration", ssl=ctx
        )
        assert status == 200 and config["issuer"] == SIGNER_ID
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(2)]
        try:
            extra = socket.create_connection(("127.0.0.1", port), timeout=10)
            with extra:
                # the third connection is closed by the signer before any byte is exchanged
                assert await asyncio.to_thread(extra.recv, 1) == b""
        finally:
            for conn in held:
                conn.close()

        async def served() -> bool:
            try:
                got, _, _ = await get_json(f"https://127.0.0.1:{port}", "/keys", ssl=ctx)
            except aiohttp.ClientError:
                return False
            return got == 200

        await wait_for(served, SETTLE, "the listener serves again once connections closed")
    finally:
        proc.stop()
