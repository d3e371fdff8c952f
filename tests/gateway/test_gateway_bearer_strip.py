"""Issue 9 item 7, red team: a bearer token on a route without `jwt` is never forwarded
unverified. A token minted by a REAL signer and bound to another client's certificate is sent
by a client on a route without `jwt`; the recording upstream must not see it. Other schemes
(Basic) still pass; `forward_authorization: true` passes the token on; on JWT routes the
`jwt.forward` rule is unchanged."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import (
    WEB_ID,
    WRITER_ID,
    A,
    Echo,
    Harness,
    LabPki,
    gateway_config,
    write_config,
)
from multidict import CIMultiDict
from support.waiting import wait_for
from svidgate.gateway.config import parse_config
from svidgate.pki.svid import load_certificates, x5t_s256
from test_gateway_jwt import AUDIENCE, Signer

from svidgate.config import ConfigError

BASIC = "Basic dXNlcjpwYXNz"


@pytest.fixture
async def signer(tmp_path: Path) -> AsyncIterator[Signer]:
    s = Signer(tmp_path / "signer")
    await s.start()
    yield s
    await s.stop()


def _config(pki: LabPki, echo: Echo, signer: Signer, *, legacy: bool = False) -> dict[str, Any]:
    doc = gateway_config(pki, echo.port)
    doc["signer"] = {"address": f"unix:{signer.socket}", "timeout": "1s"}
    allow = [f"spiffe://{A}/**"]
    if legacy:  # a route that opts in to passing the client's token on unverified
        doc["routes"].append(
            {
                "name": "legacy",
                "match": {"path_prefix": "/legacy"},
                "upstream": "echo",
                "allow": allow,
                "forward_authorization": True,
            }
        )
    doc["routes"] += [
        {
            "name": "jwt-strip",
            "match": {"path_prefix": "/jwt/strip"},
            "upstream": "echo",
            "allow": allow,
            "jwt": {"audience": AUDIENCE, "bind": "subject"},
        },
        {
            "name": "jwt-forward",
            "match": {"path_prefix": "/jwt/forward"},
            "upstream": "echo",
            "allow": allow,
            "jwt": {"audience": AUDIENCE, "bind": "subject", "forward": True},
        },
    ]
    return doc


@pytest.fixture
async def bgw(
    test_pki: LabPki, echo: Echo, signer: Signer, start_gateway: Callable[..., Any]
) -> Harness:
    gw: Harness = await start_gateway(_config(test_pki, echo, signer))
    return gw


def _authorization(echo: Echo, target: str) -> list[str]:
    (seen,) = [r for r in echo.seen if r["target"] == target]
    return [v for k, v in seen["headers"] if k.lower() == "authorization"]


def _thumbprint(pki: LabPki, name: str) -> str:
    return x5t_s256(load_certificates(pki.dir / f"{name}.crt")[0])


async def test_token_bound_to_another_certificate_never_reaches_a_route_without_jwt(
    bgw: Harness, echo: Echo, signer: Signer
) -> None:
    stolen = await signer.sign(WRITER_ID, thumbprint=_thumbprint(bgw.pki, "writer"))
    resp = await bgw.request("GET", "/public/1", [("Authorization", f"Bearer {stolen}")])
    assert resp is not None and resp.status == 200
    assert _authorization(echo, "/public/1") == [], "an unverified bearer token was forwarded"


async def test_every_spelling_of_bearer_is_stripped(bgw: Harness, echo: Echo) -> None:
    spellings = ["bearer x.y.z", "BEARER x.y.z", "Bearer", "Bearer,x.y.z", "Bearer\tx.y.z"]
    for i, value in enumerate(spellings):
        resp = await bgw.request("GET", f"/public/{i}", [("Authorization", value)])
        assert resp is not None and resp.status == 200, value
        assert _authorization(echo, f"/public/{i}") == [], value


async def test_other_schemes_pass_and_only_the_bearer_value_goes(
    bgw: Harness, echo: Echo, signer: Signer
) -> None:
    token = await signer.sign(WEB_ID)
    basic = await bgw.request("GET", "/public/basic", [("Authorization", BASIC)])
    both = await bgw.request(
        "GET", "/public/both", [("Authorization", f"Bearer {token}"), ("Authorization", BASIC)]
    )
    assert basic is not None and basic.status == 200
    assert both is not None and both.status == 200
    assert _authorization(echo, "/public/basic") == [BASIC]
    assert _authorization(echo, "/public/both") == [BASIC]


async def test_forward_authorization_passes_the_token_unverified(
    test_pki: LabPki, echo: Echo, signer: Signer, start_gateway: Callable[..., Any]
) -> None:
    gw: Harness = await start_gateway(_config(test_pki, echo, signer, legacy=True))
    stolen = await signer.sign(WRITER_ID, thumbprint=_thumbprint(gw.pki, "writer"))
    resp = await gw.request("GET", "/legacy/1", [("Authorization", f"Bearer {stolen}")])
    assert resp is not None and resp.status == 200
    assert _authorization(echo, "/legacy/1") == [f"Bearer {stolen}"]


async def test_jwt_routes_keep_the_jwt_forward_rule(
    bgw: Harness, echo: Echo, signer: Signer
) -> None:
    client = bgw.server.app.signer
    assert client is not None
    await wait_for(lambda: client.ready(mode="remote"), 5, "the key subscription")
    token = await signer.sign(WEB_ID)
    stripped = await bgw.request("GET", "/jwt/strip/1", [("Authorization", f"Bearer {token}")])
    forwarded = await bgw.request("GET", "/jwt/forward/1", [("Authorization", f"Bearer {token}")])
    assert stripped is not None and stripped.status == 200
    assert forwarded is not None and forwarded.status == 200
    assert _authorization(echo, "/jwt/strip/1") == []
    assert _authorization(echo, "/jwt/forward/1") == [f"Bearer {token}"]
    # and a token bound to another certificate is refused there, as before
    stolen = await signer.sign(WEB_ID, thumbprint=_thumbprint(bgw.pki, "writer"))
    refused = await bgw.request("GET", "/jwt/forward/2", [("Authorization", f"Bearer {stolen}")])
    assert refused is not None and refused.status == 401
    assert echo.targets == ["/jwt/strip/1", "/jwt/forward/1"]


# -- the pure parts ---------------------------------------------------------------------------


def test_strip_bearer_keeps_other_headers_and_schemes() -> None:
    from svidgate.gateway.headers import is_bearer, strip_bearer  # new: keeps the attacks red

    headers: CIMultiDict[str] = CIMultiDict(
        [("Authorization", "Bearer a"), ("X-Other", "1"), ("authorization", BASIC)]
    )
    assert strip_bearer(headers) == 1
    assert headers.getall("Authorization") == [BASIC]
    assert headers["X-Other"] == "1"
    untouched: CIMultiDict[str] = CIMultiDict([("Authorization", BASIC)])
    assert strip_bearer(untouched) == 0 and untouched.getall("Authorization") == [BASIC]
    assert is_bearer("  bearer x") and not is_bearer("Basic YmVhcmVy") and not is_bearer("")


def test_forward_authorization_is_refused_on_a_jwt_route(tmp_path: Path) -> None:
    doc = {
        "listen": "127.0.0.1:0",
        "tls": {"cert": "g.crt", "key": "g.key"},
        "trust_domains": {A: {"bundle": "b.pem"}},
        "signer": {"address": "unix:s.sock"},
        "upstreams": {"u": {"url": "http://127.0.0.1:1"}},
        "routes": [
            {
                "name": "r",
                "match": {"path_prefix": "/"},
                "upstream": "u",
                "jwt": {"audience": "x"},
                "forward_authorization": True,
            }
        ],
    }
    with pytest.raises(ConfigError, match=r"routes\.0\.forward_authorization: only for routes"):
        parse_config(doc, base_dir=tmp_path)
    doc["routes"][0]["jwt"]["required"] = False  # type: ignore[index]
    assert parse_config(doc, base_dir=tmp_path).routes[0].forward_authorization


def test_check_and_explain_show_the_opt_in(test_pki: LabPki) -> None:
    doc = gateway_config(test_pki, 9)
    doc["routes"][3]["forward_authorization"] = True  # public
    path = write_config(test_pki, doc)
    cli = [sys.executable, "-m", "svidgate.cli", "gateway"]
    check = subprocess.run(
        [*cli, "check", "--offline", "--config", str(path)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    lines = check.stdout.splitlines()
    at = lines.index("  public: * /public -> echo (https://127.0.0.1:9)")
    assert "      authorization: Bearer tokens forwarded unverified" in lines[at:]
    explain = subprocess.run(
        [*cli, "explain", "--config", str(path), "--spiffe-id", WEB_ID, "--path", "/public/1"],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert explain.returncode == 0, explain.stdout + explain.stderr
    assert "then:     Authorization: Bearer forwarded unverified" in explain.stdout
