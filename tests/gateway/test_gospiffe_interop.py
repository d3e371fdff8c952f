"""Issue 14, item 4: go-spiffe v2 (the SPIFFE library of Go workloads) against svidgate.

A small Go program (tests/interop/gospiffe, built by .ci/gospiffe) (a) verifies a token minted
by a real signer process with ``jwtsvid.ParseAndValidate`` against the signer's discovery
endpoint — ``/bundle`` through ``spiffebundle.Parse`` and ``/keys`` through ``jwtbundle.Parse``
— and (b) calls the real gateway with ``tlsconfig.MTLSClientConfig``, an X.509-SVID and a
bundle loaded from files (``x509svid.Load``, ``x509bundle.Load``), authorizing the gateway's
SPIFFE ID.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import GATEWAY_ID, WEB_ID, Echo, Harness, LabPki, gateway_config
from support.gospiffe import gospiffe_binary, run_gospiffe
from support.pki import A
from support.ports import free_port
from support.signer_process import AUDIENCE, SignerProcess
from support.waiting import wait_for


@pytest.fixture(scope="module", autouse=True)
def built() -> Path:
    return gospiffe_binary()


@pytest.fixture(scope="module")
def discovery_signer(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[SignerProcess, str]]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = {"discovery": {"listen": f"127.0.0.1:{port}", "public_url": base}}
    proc = SignerProcess.file_keys(tmp_path_factory.mktemp("gospiffe-signer"), extra)
    proc.start_sync()
    yield proc, base
    if proc.running:
        proc.stop(10)


async def jwt_check(base: str, path: str, fmt: str, token_file: Path, audience: str) -> Any:
    return await run_gospiffe(
        "jwt",
        "-url",
        f"{base}{path}",
        "-format",
        fmt,
        "-td",
        A,
        "-audience",
        audience,
        "-token-file",
        str(token_file),
    )


@pytest.mark.parametrize(("path", "fmt"), [("/bundle", "spiffe"), ("/keys", "jwks")])
async def test_go_spiffe_verifies_a_signer_token(
    discovery_signer: tuple[SignerProcess, str], tmp_path: Path, path: str, fmt: str
) -> None:
    proc, base = discovery_signer
    token_file = tmp_path / "token.jwt"
    token_file.write_text(await proc.sign_async(WEB_ID, AUDIENCE))
    result = await jwt_check(base, path, fmt, token_file, AUDIENCE)
    assert result["ok"] and result["subject"] == WEB_ID and result["audience"] == [AUDIENCE]
    refused = await jwt_check(base, path, fmt, token_file, "another-audience")
    assert not refused["ok"] and "audience" in refused["error"]


async def mtls_call(gw: Harness, pki: LabPki, path: str, server_id: str, *extra: str) -> Any:
    cert, key = pki.files("web")
    return await run_gospiffe(
        "mtls",
        "-url",
        f"https://127.0.0.1:{gw.port}{path}",
        "-cert",
        str(cert),
        "-key",
        str(key),
        "-bundle",
        str(pki.bundle()),
        "-td",
        A,
        "-server-id",
        server_id,
        *extra,
    )


async def test_go_spiffe_mtls_client_reaches_a_route(
    test_pki: LabPki,
    echo: Echo,
    discovery_signer: tuple[SignerProcess, str],
    start_gateway: Callable[..., Any],
    tmp_path: Path,
) -> None:
    proc, _ = discovery_signer
    doc = gateway_config(test_pki, echo.port)
    doc["signer"] = {"address": f"unix:{proc.socket}", "timeout": "2s"}
    doc["routes"].append(
        {
            "name": "orders-jwt",
            "match": {"path_prefix": "/jwt"},
            "upstream": "echo",
            "allow": [WEB_ID],
            "jwt": {"audience": AUDIENCE},
        }
    )
    gw: Harness = await start_gateway(doc)
    signer = gw.server.app.signer
    assert signer is not None
    await wait_for(lambda: signer.ready(mode="remote"), 10, "the signer client")

    result = await mtls_call(gw, test_pki, "/orders/1", GATEWAY_ID)
    assert result["ok"] and result["status"] == 200 and result["client_id"] == WEB_ID
    assert echo.seen[-1]["target"] == "/orders/1"
    # go-spiffe authorizes the server: a gateway that is not the expected ID is refused
    wrong = await mtls_call(gw, test_pki, "/orders/1", f"spiffe://{A}/not-the-gateway")
    assert not wrong["ok"] and "unexpected ID" in wrong["error"]
    # with a JWT-SVID from the signer on a JWT route
    token_file = tmp_path / "token.jwt"
    token_file.write_text(await proc.sign_async(WEB_ID, AUDIENCE))
    result = await mtls_call(gw, test_pki, "/jwt/1", GATEWAY_ID, "-token-file", str(token_file))
    assert result["ok"] and result["status"] == 200
    result = await mtls_call(gw, test_pki, "/jwt/1", GATEWAY_ID)
    assert result["ok"] and result["status"] == 401
