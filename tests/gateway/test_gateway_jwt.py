"""Step 5 end to end: the gateway verifies JWTs through a REAL signer process
(`svidgate signer serve`, file key source, Unix socket), one per module."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import (
    WEB_ID,
    WRITER_ID,
    Echo,
    Harness,
    LabPki,
    gateway_config,
)
from support.signer_process import SignerProcess
from support.waiting import wait_for
from svidgate.pki.svid import load_certificates, x5t_s256

AUDIENCE = "orders"


class Signer:
    """A real file-key signer process (support.signer_process, its FILE_KEYS_SIGNER config) and
    async minting over its Unix socket."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.process = SignerProcess.file_keys(directory)
        assert self.process.socket is not None
        self.socket: Path = self.process.socket

    async def start(self) -> None:
        await self.process.start()

    async def stop(self) -> None:
        if self.process.running:
            await asyncio.to_thread(self.process.stop, 10)

    async def sign(
        self, subject: str, audience: str = AUDIENCE, *, thumbprint: str = "", ttl: int = 0
    ) -> str:
        return await self.process.sign_async(subject, audience, thumbprint=thumbprint, ttl=ttl)

    async def rotate(self) -> Any:
        return await self.process.rotate_async()


@pytest.fixture(scope="module")
def module_signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Signer]:
    """One signer process for the module: starting one costs about a second."""
    s = Signer(tmp_path_factory.mktemp("signer"))
    s.process.start_sync()
    yield s
    if s.process.running:
        s.process.stop(10)


@pytest.fixture
def signer(module_signer: Signer) -> Signer:
    """The module's signer, running (started again if a test stopped it and failed before it
    could start it again)."""
    if not module_signer.process.running:
        module_signer.process.start_sync()
    return module_signer


def _jwt_config(pki: LabPki, echo: Echo, signer: Signer) -> dict[str, Any]:
    doc = gateway_config(pki, echo.port)
    doc["signer"] = {"address": f"unix:{signer.socket}", "timeout": "500ms"}
    doc["identity_headers"]["claims"] = {"sub": "X-Svidgate-Subject", "aud": "X-Svidgate-Aud"}
    allow = [WEB_ID, WRITER_ID]
    for name, bind, verify in [
        ("subject", "subject", "remote"),
        ("cert", "certificate", "remote"),
        ("local", "subject", "local"),
        ("localcert", "certificate", "local"),
        ("forward", "subject", "remote"),
    ]:
        doc["routes"].append(
            {
                "name": f"jwt-{name}",
                "match": {"path_prefix": f"/jwt/{name}"},
                "upstream": "echo",
                "allow": allow,
                "jwt": {"required": True, "audience": AUDIENCE, "bind": bind, "verify": verify},
            }
        )
    doc["routes"][-1]["jwt"]["forward"] = True
    return doc


@pytest.fixture
async def jgw(
    test_pki: LabPki, echo: Echo, signer: Signer, start_gateway: Callable[..., Any]
) -> Harness:
    gw: Harness = await start_gateway(_jwt_config(test_pki, echo, signer))
    signer_client = gw.server.app.signer
    assert signer_client is not None
    await wait_for(  # local mode needs the first key set (pushed over WatchKeys)
        lambda: signer_client.ready(mode="local") and signer_client.ready(mode="remote"),
        10,
        "the gateway's signer client to be ready in both modes",
    )
    return gw


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("Authorization", f"Bearer {token}")]


def _thumbprint(pki: LabPki, name: str) -> str:
    return x5t_s256(load_certificates(pki.dir / f"{name}.crt")[0])


async def test_valid_token_reaches_upstream_with_claim_headers(
    jgw: Harness, echo: Echo, signer: Signer
) -> None:
    token = await signer.sign(WEB_ID)
    resp = await jgw.request(
        "GET", "/jwt/subject/1", [*_bearer(token), ("x_svidgate_subject", "spiffe://evil/x")]
    )
    assert resp is not None and resp.status == 200
    headers = echo.seen[0]["headers"]
    assert [v for k, v in headers if k.lower() == "x-svidgate-subject"] == [WEB_ID]
    assert [v for k, v in headers if k.lower() == "x-svidgate-aud"] == [AUDIENCE]
    assert all(k.lower() != "x_svidgate_subject" for k, _ in headers)


async def test_missing_token_401(
    jgw: Harness, echo: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="svidgate.audit")
    resp = await jgw.request("GET", "/jwt/subject/1")
    assert resp is not None and resp.status == 401
    assert (resp.header("WWW-Authenticate") or "").startswith("Bearer")
    assert resp.json()["reason"] == "missing_token"
    assert echo.seen == []
    audits = [json.loads(r.getMessage()) for r in caplog.records if r.name == "svidgate.audit"]
    token_denial = next(a for a in audits if a["event"] == "token")
    assert token_denial["spiffe_id"] == WEB_ID and token_denial["route"] == "jwt-subject"


async def test_policy_before_jwt_403_not_401(jgw: Harness, echo: Echo) -> None:
    resp = await jgw.request("GET", "/jwt/subject/1", client="ops")  # no token, not allowed
    assert resp is not None and resp.status == 403
    assert echo.seen == []


async def test_wrong_audience_401(jgw: Harness, echo: Echo, signer: Signer) -> None:
    token = await signer.sign(WEB_ID, audience="payments")
    resp = await jgw.request("GET", "/jwt/subject/1", _bearer(token))
    assert resp is not None and resp.status == 401
    assert echo.seen == []


async def test_other_subject_401(jgw: Harness, echo: Echo, signer: Signer) -> None:
    token = await signer.sign(WRITER_ID)  # a valid token, but for another workload
    resp = await jgw.request("GET", "/jwt/subject/1", _bearer(token))  # presented by web
    assert resp is not None and resp.status == 401
    assert echo.seen == []


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", "Bearer {t}"), ("Authorization", "Bearer {t}")],
        [("Authorization", "Bearer {t}, Bearer {t}")],
        [("Authorization", "Basic dXNlcjpwYXNz")],
        [("Authorization", "Bearer")],
        [("Authorization", "Bearer {t} extra")],
    ],
)
async def test_malformed_or_multiple_tokens_401(
    jgw: Harness, echo: Echo, signer: Signer, headers: list[tuple[str, str]]
) -> None:
    token = await signer.sign(WEB_ID)
    filled = [(k, v.format(t=token)) for k, v in headers]
    resp = await jgw.request("GET", "/jwt/subject/1", filled)
    assert resp is not None and resp.status == 401
    assert resp.header("WWW-Authenticate") is not None
    assert echo.seen == []


async def test_token_in_query_string_401(jgw: Harness, echo: Echo, signer: Signer) -> None:
    token = await signer.sign(WEB_ID)
    resp = await jgw.request("GET", f"/jwt/subject/1?access_token={token}", _bearer(token))
    assert resp is not None and resp.status == 401
    assert echo.seen == []


async def test_certificate_binding(jgw: Harness, echo: Echo, signer: Signer) -> None:
    pki = jgw.pki
    bound = await signer.sign(WEB_ID, thumbprint=_thumbprint(pki, "web"))
    ok = await jgw.request("GET", "/jwt/cert/1", _bearer(bound))
    assert ok is not None and ok.status == 200
    # The same token presented on another client's connection: wrong binding.
    stolen = await jgw.request("GET", "/jwt/cert/1", _bearer(bound), client="writer")
    assert stolen is not None and stolen.status == 401
    # A token bound to another certificate.
    other = await signer.sign(WEB_ID, thumbprint=_thumbprint(pki, "writer"))
    wrong = await jgw.request("GET", "/jwt/cert/1", _bearer(other))
    assert wrong is not None and wrong.status == 401
    # An unbound token on a route that requires binding.
    unbound = await signer.sign(WEB_ID)
    missing = await jgw.request("GET", "/jwt/cert/1", _bearer(unbound))
    assert missing is not None and missing.status == 401
    assert echo.targets == ["/jwt/cert/1"]


async def test_local_verification(jgw: Harness, echo: Echo, signer: Signer) -> None:
    good = await signer.sign(WEB_ID)
    bad_aud = await signer.sign(WEB_ID, audience="payments")
    other = await signer.sign(WRITER_ID)
    statuses = []
    for token in (good, bad_aud, other):
        resp = await jgw.request("GET", "/jwt/local/1", _bearer(token))
        statuses.append(resp.status if resp else None)
    assert statuses == [200, 401, 401]
    bound = await signer.sign(WEB_ID, thumbprint=_thumbprint(jgw.pki, "web"))
    resp = await jgw.request("GET", "/jwt/localcert/1", _bearer(bound), client="writer")
    assert resp is not None and resp.status == 401
    assert echo.targets == ["/jwt/local/1"]


async def test_signer_stopped_503_then_recovers(jgw: Harness, echo: Echo, signer: Signer) -> None:
    token = await signer.sign(WEB_ID)
    await signer.stop()
    resp = await jgw.request("GET", "/jwt/subject/1", _bearer(token))
    assert resp is not None and resp.status == 503
    assert resp.header("Retry-After") is not None
    assert echo.seen == []
    readiness = jgw.server.app.readiness
    await wait_for(lambda: not readiness()[0], 2, "readiness to follow the signer")
    ready, reason = readiness()
    assert not ready and reason.startswith("signer_not_ready")
    await signer.start()
    statuses: list[int | None] = []

    async def verified() -> bool:
        resp = await jgw.request("GET", "/jwt/subject/1", _bearer(token))
        statuses.append(resp.status if resp else None)
        assert statuses[-1] in (200, 503), statuses  # 503 until the signer answers again
        return statuses[-1] == 200

    # bounded: the client reconnects with a backoff of <= 2 s
    await wait_for(verified, 15, "a 200 once the signer is back", interval=0.1)
    assert statuses[-1] == 200
    assert echo.targets == ["/jwt/subject/1"]
    # the key subscription reconnects with a bounded backoff
    await wait_for(lambda: readiness() == (True, "ok"), 6, "readiness after the restart")
    assert jgw.server.app.readiness() == (True, "ok")


def _kid(token: str) -> str:
    header = token.partition(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"])


async def test_key_rotation_while_serving_zero_failures(
    jgw: Harness, echo: Echo, signer: Signer
) -> None:
    results: list[tuple[str, int | None]] = []
    tokens = [await signer.sign(WEB_ID)]
    new_kid: list[str] = []  # the prepared key's kid, once Rotate has answered
    with_new_key: dict[str, int] = {"/jwt/subject/1": 0, "/jwt/local/1": 0}
    stop = asyncio.Event()

    async def client(path: str) -> None:
        while not stop.is_set():
            token = tokens[-1]
            resp = await jgw.request("GET", path, _bearer(token))
            results.append((path, resp.status if resp else None))
            if new_kid and _kid(token) == new_kid[0]:
                with_new_key[path] += 1

    async def minter() -> None:
        while not stop.is_set():
            tokens.append(await signer.sign(WEB_ID))
            await asyncio.sleep(0.2)

    tasks = [
        asyncio.create_task(client("/jwt/subject/1")),
        asyncio.create_task(client("/jwt/local/1")),
        asyncio.create_task(minter()),
    ]
    first_kid = tokens[0].split(".")[0]
    rotated = await signer.rotate()
    assert rotated.prepared_kid
    new_kid.append(rotated.prepared_kid)
    # prepare_ahead is 1 s: the prepared key becomes active, the minter's tokens carry it and
    # both routes (remote and local verification) serve requests with them
    await wait_for(
        lambda: min(with_new_key.values()) >= 3, 15, "requests with tokens of the new key"
    )
    stop.set()
    await asyncio.gather(*tasks)
    assert tokens[-1].split(".")[0] != first_kid, "tokens are now signed with the new key"
    assert len(results) > 10
    assert {status for _, status in results} == {200}
    assert {path for path, _ in results} == {"/jwt/subject/1", "/jwt/local/1"}


def _authorization_seen(echo: Echo, index: int) -> list[str]:
    return [v for k, v in echo.seen[index]["headers"] if k.lower() == "authorization"]


async def test_verified_token_is_stripped_unless_the_route_forwards_it(
    jgw: Harness, echo: Echo, signer: Signer
) -> None:
    token = await signer.sign(WEB_ID)
    stripped = await jgw.request("GET", "/jwt/subject/1", _bearer(token))
    forwarded = await jgw.request("GET", "/jwt/forward/1", _bearer(token))
    assert stripped is not None and stripped.status == 200
    assert forwarded is not None and forwarded.status == 200
    assert echo.targets == ["/jwt/subject/1", "/jwt/forward/1"]
    assert _authorization_seen(echo, 0) == []
    assert _authorization_seen(echo, 1) == [f"Bearer {token}"]


async def test_certificate_bound_token_is_checked_on_subject_routes_too(
    jgw: Harness, echo: Echo, signer: Signer
) -> None:
    bound = await signer.sign(WEB_ID, thumbprint=_thumbprint(jgw.pki, "web"))
    ok = await jgw.request("GET", "/jwt/subject/1", _bearer(bound))
    assert ok is not None and ok.status == 200
    # sub is the writer's own ID, but the token is bound to web's certificate: the subject rule
    # alone would pass it; the binding refuses it, in both verification modes.
    misbound = await signer.sign(WRITER_ID, thumbprint=_thumbprint(jgw.pki, "web"))
    for path in ("/jwt/subject/2", "/jwt/local/2"):
        resp = await jgw.request("GET", path, _bearer(misbound), client="writer")
        assert resp is not None and resp.status == 401
    assert echo.targets == ["/jwt/subject/1"]
