"""Issue 14, items 3 and 4: a JWT-SVID minted by a real SPIRE (``FetchJWTSVID``) is accepted on a
route that lists the SPIRE issuer and refused on one that does not; the gateway takes SPIRE's
JWT bundle from the agent's Workload API (``jwt_issuers.<name>.bundle.source: workload_api``).

SPIRE (server + agent, join token, ``unix`` workload attestation) comes from
tests/support/spire.py, binaries from .ci/spire. The signer beside it is a real signer process;
both mint for the trust domain example.org, so only the token's ``iss`` tells them apart.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from gateway_harness import WEB_ID, Echo, Harness, LabPki, gateway_config
from support.pki import A
from support.signer_process import AUDIENCE, SignerProcess
from support.waiting import wait_for


def spire_harness() -> Any:
    """support.spire.Spire, or a failure that says where it comes from."""
    try:
        from support.spire import Spire
    except ImportError as exc:  # pragma: no cover - only before the SPIRE harness is merged
        raise AssertionError(
            f"tests/support/spire.py (the real SPIRE harness, binaries from .ci/spire) is "
            f"missing: {exc}"
        ) from None
    return Spire


@pytest.fixture(scope="module")
def module_signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignerProcess]:
    proc = SignerProcess.file_keys(tmp_path_factory.mktemp("spire-jwt-signer"))
    proc.start_sync()
    yield proc
    if proc.running:
        proc.stop(10)


@pytest.fixture
async def spire() -> AsyncIterator[Any]:
    server = spire_harness()(trust_domain=A)
    await asyncio.to_thread(server.start)
    try:
        # this test process (and the in-process gateway) is the workload unix:gid:<gid>
        await asyncio.to_thread(server.register, WEB_ID, gid=os.getgid())
        yield server
    finally:
        await asyncio.to_thread(server.stop)


def route(name: str, issuers: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path_prefix": f"/{name}"},
        "upstream": "echo",
        "allow": [WEB_ID],
        "jwt": {"audience": AUDIENCE, "issuers": issuers},
    }


async def call(gw: Harness, path: str, token: str) -> tuple[int, Any]:
    resp = await gw.request("GET", path, [("Authorization", f"Bearer {token}")])
    assert resp is not None
    return resp.status, resp.json() if resp.status != 200 else None


async def test_spire_jwt_svid_is_accepted_only_where_spire_is_listed(
    test_pki: LabPki,
    echo: Echo,
    module_signer: SignerProcess,
    spire: Any,
    start_gateway: Callable[..., Any],
) -> None:
    doc = gateway_config(test_pki, echo.port)
    doc["signer"] = {"address": f"unix:{module_signer.socket}", "timeout": "2s"}
    doc["jwt_issuers"] = {
        "spire": {"trust_domain": A, "bundle": {"source": "workload_api", "socket": spire.socket}}
    }
    doc["routes"] += [
        route("spire-only", ["spire"]),
        route("signer-only", ["signer"]),
        route("both", ["signer", "spire"]),
    ]
    gw: Harness = await start_gateway(doc)
    issuer = gw.server.app.jwt_issuers.issuers["spire"]
    await wait_for(lambda: bool(issuer.keyset and issuer.keyset.keys), 30, "SPIRE's JWT bundle")
    signer = gw.server.app.signer
    assert signer is not None
    await wait_for(lambda: signer.ready(mode="remote"), 10, "the signer client")

    token = await asyncio.to_thread(spire.fetch_jwt, WEB_ID, AUDIENCE)
    assert (await call(gw, "/spire-only/x", token))[0] == 200
    assert (await call(gw, "/both/x", token))[0] == 200
    status, body = await call(gw, "/signer-only/x", token)
    assert (status, body["reason"]) == (401, "issuer_not_allowed")
    # the signer's token for the same subject and trust domain goes to the signer's keys
    mine = await module_signer.sign_async(WEB_ID, AUDIENCE)
    assert (await call(gw, "/both/x", mine))[0] == 200
    status, body = await call(gw, "/spire-only/x", mine)
    assert (status, body["reason"]) == (401, "issuer_not_allowed")
    # a SPIRE token for another audience
    other = await asyncio.to_thread(spire.fetch_jwt, WEB_ID, "payments")
    status, body = await call(gw, "/spire-only/x", other)
    assert (status, body["reason"]) == (401, "bad_audience")


async def test_spire_keys_stay_while_the_agent_restarts(
    test_pki: LabPki, echo: Echo, spire: Any, start_gateway: Callable[..., Any]
) -> None:
    """The last JWT bundle from the Workload API stays in force while the agent is away, and the
    stream comes back by itself when the agent does."""
    doc = gateway_config(test_pki, echo.port)
    doc["jwt_issuers"] = {
        "spire": {"trust_domain": A, "bundle": {"source": "workload_api", "socket": spire.socket}}
    }
    doc["routes"] += [route("spire-only", ["spire"])]
    gw: Harness = await start_gateway(doc)
    issuer = gw.server.app.jwt_issuers.issuers["spire"]
    await wait_for(lambda: bool(issuer.keyset and issuer.keyset.keys), 30, "SPIRE's JWT bundle")
    token = await asyncio.to_thread(spire.fetch_jwt, WEB_ID, AUDIENCE)
    held = issuer.keyset
    await asyncio.to_thread(spire.stop_agent)
    assert (await call(gw, "/spire-only/x", token))[0] == 200
    assert gw.server.app.readiness() == (True, "ok")
    await asyncio.to_thread(spire.start_agent)
    # the stream reconnects and delivers the bundle again (a new key set object)
    await wait_for(lambda: issuer.keyset is not held, 60, "the bundle after the agent restart")
    assert (await call(gw, "/spire-only/x", token))[0] == 200


async def test_a_spire_jwt_key_rotation_reaches_the_gateway(
    test_pki: LabPki, echo: Echo, spire: Any, start_gateway: Callable[..., Any]
) -> None:
    """SPIRE prepares and activates a new JWT authority: the Workload API stream brings its key,
    and tokens signed with it verify without a restart or a reload."""
    doc = gateway_config(test_pki, echo.port)
    doc["jwt_issuers"] = {
        "spire": {"trust_domain": A, "bundle": {"source": "workload_api", "socket": spire.socket}}
    }
    doc["routes"] += [route("spire-only", ["spire"])]
    doc["routes"][-1]["jwt"]["audience"] = "rotated"
    gw: Harness = await start_gateway(doc)
    issuer = gw.server.app.jwt_issuers.issuers["spire"]
    await wait_for(lambda: bool(issuer.keyset and issuer.keyset.keys), 30, "SPIRE's JWT bundle")
    before = set(issuer.keyset.keys)
    prepared = json.loads(
        await asyncio.to_thread(spire.server, "localauthority", "jwt", "prepare", "-output", "json")
    )
    authority = prepared["prepared_authority"]["authority_id"]
    await wait_for(lambda: authority in issuer.keyset.keys, 60, "the prepared JWT key")
    await asyncio.to_thread(
        spire.server, "localauthority", "jwt", "activate", "-authorityID", authority
    )
    token = await asyncio.to_thread(spire.fetch_jwt, WEB_ID, "rotated")
    kid = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))["kid"]
    assert kid == authority and kid not in before
    assert (await call(gw, "/spire-only/x", token))[0] == 200
