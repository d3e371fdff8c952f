"""Issue 14, item 3: JWT-SVIDs from other issuers (``jwt_issuers``) and ``routes[].jwt.issuers``.

Real gateway on loopback with real mTLS, a real signer process (file keys) for the sidecar
issuer, bundle files on disk, and a real HTTPS JWKS server (aiohttp with the test PKI) for the
URL source. The token's ``iss`` / ``sub`` trust domain selects one issuer's key set; a kid that
only another issuer publishes never verifies.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from gateway_harness import B_ID, WEB_ID, Echo, Harness, LabPki, gateway_config
from support.jwt_keys import Signer as KeyPair
from support.pki import SIGNER_ID, A, B
from support.ports import free_port
from support.signer_process import SignerProcess
from support.waiting import wait_for
from svidgate.gateway.config import parse_config
from svidgate.gateway.jwt_issuers import IssuerKeys, UrlIssuerKeys

from svidgate.config import ConfigError

AUDIENCE = "orders"
THIRD = "third.org"  # a trust domain known only through its JWT bundle
THIRD_ID = f"spiffe://{THIRD}/billing"


def mint(key: KeyPair, sub: str, *, iss: str | None = None) -> str:
    now = int(time.time())
    return key.token(iss=iss, sub=sub, aud=AUDIENCE, iat=now - 5, exp=now + 300)


def spiffe_bundle(*keys: KeyPair) -> dict[str, Any]:
    """A SPIFFE bundle: JWT authorities with ``use: jwt-svid`` and no ``alg`` (as SPIRE writes
    them), plus an X.509 authority the JWT verifier must skip."""
    members = [
        {k: v for k, v in key.jwk.items() if k != "alg"} | {"use": "jwt-svid"} for key in keys
    ]
    x509 = {"kty": "EC", "crv": "P-256", "use": "x509-svid", "x5c": ["AAAA"]}
    x509 |= {k: keys[0].jwk[k] for k in ("x", "y")} if keys else {}
    return {"keys": [*members, x509], "spiffe_sequence": 1}


def jwt_route(name: str, issuers: list[str] | None, *, bind: str = "none") -> dict[str, Any]:
    jwt: dict[str, Any] = {"required": True, "audience": AUDIENCE, "bind": bind}
    if issuers is not None:
        jwt["issuers"] = issuers
    return {
        "name": name,
        "match": {"path_prefix": f"/{name}"},
        "upstream": "echo",
        "allow": [f"spiffe://{A}/**", f"spiffe://{B}/**"],
        "jwt": jwt,
    }


@pytest.fixture(scope="module")
def module_signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SignerProcess]:
    proc = SignerProcess.file_keys(tmp_path_factory.mktemp("issuers-signer"))
    proc.start_sync()
    yield proc
    if proc.running:
        proc.stop(10)


class Lab:
    """Two file issuers sharing the kid string ``shared``: ``partner`` (other.org) and
    ``third`` (third.org), beside the sidecar signer."""

    def __init__(self, pki: LabPki) -> None:
        self.pki = pki
        self.partner = KeyPair("shared")
        self.third = KeyPair("shared")
        self.partner_file = pki.dir / "partner-jwt-bundle.json"
        self.third_file = pki.dir / "third-jwks.json"
        self.partner_file.write_text(json.dumps(spiffe_bundle(self.partner)))
        self.third_file.write_text(json.dumps({"keys": [self.third.jwk]}))

    def config(self, echo: Echo, signer: SignerProcess) -> dict[str, Any]:
        doc = gateway_config(self.pki, echo.port)
        doc["signer"] = {"address": f"unix:{signer.socket}", "timeout": "2s"}
        doc["jwt_issuers"] = {
            "partner": {"trust_domain": B, "bundle": {"file": self.partner_file.name}},
            "third": {"trust_domain": THIRD, "bundle": {"file": self.third_file.name}},
        }
        doc["routes"] += [
            jwt_route("signer-only", None),
            jwt_route("partner-only", ["partner"]),
            jwt_route("both", ["signer", "partner"]),
            jwt_route("tenants", ["partner", "third"]),
            jwt_route("partner-bound", ["partner"], bind="subject"),
        ]
        return doc


@pytest.fixture
async def lab(
    test_pki: LabPki,
    echo: Echo,
    module_signer: SignerProcess,
    start_gateway: Callable[..., Any],
) -> AsyncIterator[tuple[Lab, Harness]]:
    lab = Lab(test_pki)
    gw: Harness = await start_gateway(lab.config(echo, module_signer))
    signer = gw.server.app.signer
    assert signer is not None
    await wait_for(lambda: signer.ready(mode="remote"), 10, "the signer client")
    yield lab, gw


async def call(gw: Harness, path: str, token: str, client: str = "web") -> tuple[int, Any]:
    resp = await gw.request("GET", path, [("Authorization", f"Bearer {token}")], client=client)
    assert resp is not None
    return resp.status, resp.json() if resp.status != 200 else None


async def test_file_issuer_accepted_only_where_listed(
    lab: tuple[Lab, Harness], module_signer: SignerProcess
) -> None:
    labs, gw = lab
    token = mint(labs.partner, B_ID)
    assert (await call(gw, "/partner-only/x", token))[0] == 200
    assert (await call(gw, "/both/x", token))[0] == 200
    status, body = await call(gw, "/signer-only/x", token)
    assert (status, body["reason"]) == (401, "issuer_not_allowed")
    # bind: subject still applies to other issuers' tokens
    assert (await call(gw, "/partner-bound/x", token, client="b-web"))[0] == 200
    status, body = await call(gw, "/partner-bound/x", token, client="web")
    assert (status, body["reason"]) == (401, "bad_subject")
    # and the signer's tokens: accepted where the signer is listed, refused elsewhere
    mine = await module_signer.sign_async(WEB_ID, AUDIENCE)
    assert (await call(gw, "/signer-only/x", mine))[0] == 200
    assert (await call(gw, "/both/x", mine))[0] == 200
    status, body = await call(gw, "/partner-only/x", mine)
    assert (status, body["reason"]) == (401, "issuer_not_allowed")


async def test_a_kid_of_another_tenant_never_verifies(lab: tuple[Lab, Harness]) -> None:
    labs, gw = lab
    # both tenants publish kid "shared"; each token verifies only with its own tenant's key
    assert (await call(gw, "/tenants/x", mint(labs.partner, B_ID)))[0] == 200
    assert (await call(gw, "/tenants/x", mint(labs.third, THIRD_ID)))[0] == 200
    # third's key, claiming to be partner's subject: checked against partner's keys only
    status, body = await call(gw, "/tenants/x", mint(labs.third, B_ID))
    assert (status, body["reason"]) == (401, "bad_signature")
    status, body = await call(gw, "/partner-only/x", mint(labs.third, THIRD_ID))
    assert (status, body["reason"]) == (401, "issuer_not_allowed")
    # a trust domain no issuer serves, on a route without the signer
    stranger = KeyPair("shared")
    status, body = await call(gw, "/tenants/x", mint(stranger, "spiffe://nowhere.org/x"))
    assert (status, body["reason"]) == (401, "issuer_not_allowed")


async def test_bundle_file_reloads_and_a_broken_one_keeps_the_keys(
    lab: tuple[Lab, Harness],
) -> None:
    labs, gw = lab
    old = labs.partner
    new = KeyPair("rotated")
    holder = gw.server.app.jwt_issuers.issuers["partner"]
    labs.partner_file.write_text("{not json")
    assert gw.server.reload()
    await wait_for(lambda: holder.keyset is not None and "shared" in holder.keyset.keys, 10)
    assert (await call(gw, "/partner-only/x", mint(old, B_ID)))[0] == 200
    labs.partner_file.write_text(json.dumps(spiffe_bundle(new)))
    assert gw.server.reload()
    await wait_for(lambda: _has(holder, "rotated"), 10, "the rotated bundle")
    assert (await call(gw, "/partner-only/x", mint(new, B_ID)))[0] == 200
    status, body = await call(gw, "/partner-only/x", mint(old, B_ID))
    assert (status, body["reason"]) == (401, "unknown_kid")


def _has(holder: IssuerKeys, kid: str) -> bool:
    return holder.keyset is not None and kid in holder.keyset.keys


# -- URL source: a real HTTPS JWKS server --------------------------------------------------------


class JwksServer:
    """An HTTPS server (the test PKI's ``signer`` certificate) serving ``keys`` at /keys and
    counting requests."""

    def __init__(self, pki: LabPki) -> None:
        self.pki = pki
        self.port = free_port()
        self.keys: list[KeyPair] = []
        self.padding = 0  # bytes of filler in the document (an oversized answer)
        self.requests = 0
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        import ssl

        async def handler(request: web.Request) -> web.Response:
            self.requests += 1
            doc: dict[str, Any] = {"keys": [k.jwk for k in self.keys]}
            if self.padding:
                doc["filler"] = "x" * self.padding
            return web.json_response(doc)

        app = web.Application()
        app.router.add_get("/keys", handler)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(*self.pki.files("signer"))
        await web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=ctx).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def jwks_server(test_pki: LabPki) -> AsyncIterator[JwksServer]:
    server = JwksServer(test_pki)
    await server.start()
    yield server
    await server.stop()


def url_config(pki: LabPki, echo: Echo, port: int, ca: str = "bundle.pem") -> dict[str, Any]:
    doc = gateway_config(pki, echo.port)
    bundle = {"url": f"https://127.0.0.1:{port}/keys", "ca": ca, "refresh": "1h"}
    bundle["refetch_min_interval"] = "1h"
    doc["jwt_issuers"] = {"remote": {"trust_domain": THIRD, "bundle": bundle}}
    doc["routes"] += [jwt_route("remote", ["remote"])]
    return doc


async def test_url_issuer_refetches_an_unknown_kid_at_most_once_per_interval(
    test_pki: LabPki, echo: Echo, jwks_server: JwksServer, start_gateway: Callable[..., Any]
) -> None:
    first, second, third = KeyPair("k1"), KeyPair("k2"), KeyPair("k3")
    jwks_server.keys = [first]
    gw: Harness = await start_gateway(url_config(test_pki, echo, jwks_server.port))
    remote = gw.server.app.jwt_issuers.issuers["remote"]
    assert isinstance(remote, UrlIssuerKeys)
    await wait_for(lambda: _has(remote, "k1"), 10, "the first fetch")
    assert jwks_server.requests == 1
    assert (await call(gw, "/remote/x", mint(first, THIRD_ID)))[0] == 200
    # the issuer rotates: an unknown kid triggers one refetch, which finds k2 (and drops k1)
    jwks_server.keys = [second]
    assert (await call(gw, "/remote/x", mint(second, THIRD_ID)))[0] == 200
    assert jwks_server.requests == 2
    status, body = await call(gw, "/remote/x", mint(first, THIRD_ID))
    assert (status, body["reason"]) == (401, "unknown_kid")
    # another unknown kid within refetch_min_interval: no request reaches the server
    jwks_server.keys = [second, third]
    status, body = await call(gw, "/remote/x", mint(third, THIRD_ID))
    assert (status, body["reason"]) == (401, "unknown_kid")
    assert jwks_server.requests == 2
    # the refresh picks it up
    assert await remote.refresh()
    assert (await call(gw, "/remote/x", mint(third, THIRD_ID)))[0] == 200
    # an oversized answer (over 256 KiB) is refused and the keys stay
    jwks_server.keys, jwks_server.padding = [], 300 * 1024
    assert not await remote.refresh()
    assert (await call(gw, "/remote/x", mint(third, THIRD_ID)))[0] == 200


async def test_url_issuer_pins_its_ca_and_fails_closed_without_keys(
    test_pki: LabPki, echo: Echo, jwks_server: JwksServer, start_gateway: Callable[..., Any]
) -> None:
    key = KeyPair("k1")
    jwks_server.keys = [key]
    doc = url_config(test_pki, echo, jwks_server.port, ca="bundle-other.org.pem")
    gw: Harness = await start_gateway(doc)
    remote = gw.server.app.jwt_issuers.issuers["remote"]
    assert isinstance(remote, UrlIssuerKeys)
    await wait_for(lambda: remote.fetches >= 1, 10, "a first fetch attempt")
    assert not await remote.refresh()  # the server's certificate is not from the pinned CA
    assert jwks_server.requests == 0  # refused during the handshake, before any request
    status, body = await call(gw, "/remote/x", mint(key, THIRD_ID))
    assert status == 503 and body["error"] == "issuer_unavailable"
    ready = gw.server.app.readiness()
    assert ready == (False, "jwt_issuer_not_ready:remote")


async def test_url_issuer_reads_a_svidgate_signers_discovery_keys(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any], tmp_path: Path
) -> None:
    """Another svidgate signer as an issuer: its /keys over HTTPS (``use: sig`` with an
    ``issuer`` member) through the URL source, selected by ``iss``."""
    port = free_port()
    cert, key = test_pki.files("signer")
    discovery = {"listen": f"127.0.0.1:{port}", "public_url": f"https://127.0.0.1:{port}"}
    discovery["tls"] = {"cert": str(cert), "key": str(key)}  # type: ignore[assignment]
    other = SignerProcess.file_keys(tmp_path / "other-signer", {"discovery": discovery})
    other.start_sync()
    try:
        doc = gateway_config(test_pki, echo.port)
        bundle = {"url": f"https://127.0.0.1:{port}/keys", "ca": "bundle.pem"}
        doc["jwt_issuers"] = {"sibling": {"trust_domain": A, "issuer": SIGNER_ID, "bundle": bundle}}
        doc["routes"] += [jwt_route("sibling", ["sibling"], bind="subject")]
        gw: Harness = await start_gateway(doc)
        sibling = gw.server.app.jwt_issuers.issuers["sibling"]
        await wait_for(lambda: sibling.keyset is not None, 10, "the sibling's keys")
        token = await other.sign_async(WEB_ID, AUDIENCE)
        assert (await call(gw, "/sibling/x", token))[0] == 200
        forged = mint(KeyPair(next(iter(sibling.keyset.keys))), WEB_ID, iss=SIGNER_ID)
        status, body = await call(gw, "/sibling/x", forged)
        assert (status, body["reason"]) == (401, "bad_signature")
    finally:
        other.stop()


# -- configuration rules --------------------------------------------------------------------------


def _parse(pki: LabPki, issuers: dict[str, Any], routes: list[dict[str, Any]]) -> Any:
    doc = gateway_config(pki, 1)
    doc["jwt_issuers"] = issuers
    doc["routes"] += routes
    return parse_config(doc, base_dir=pki.dir)


@pytest.mark.parametrize(
    ("issuers", "routes", "message"),
    [
        ({}, [jwt_route("r", ["nobody"])], "unknown issuer 'nobody'"),
        ({}, [jwt_route("r", [])], "list at least one issuer"),
        (
            {"signer": {"trust_domain": B, "bundle": {"file": "x.json"}}},
            [],
            "jwt_issuers.signer",
        ),
        ({"p": {"trust_domain": B, "bundle": {"url": "http://x/keys", "ca": "c"}}}, [], "https"),
        ({"p": {"trust_domain": B, "bundle": {"url": "https://x/keys"}}}, [], "needs ca"),
        ({"p": {"trust_domain": B, "bundle": {}}}, [], "exactly one of"),
        (
            {"p": {"trust_domain": B, "bundle": {"file": "a", "source": "workload_api"}}},
            [],
            "exactly one of",
        ),
        (
            {
                "p": {"trust_domain": B, "bundle": {"file": "a.json"}},
                "q": {"trust_domain": B, "bundle": {"file": "b.json"}},
            },
            [jwt_route("r", ["p", "q"])],
            "share trust domain other.org",
        ),
        ({}, [jwt_route("r", None)], "'signer' is not set"),
    ],
)
def test_config_rules(
    test_pki: LabPki, issuers: dict[str, Any], routes: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _parse(test_pki, issuers, routes)


def test_config_accepts_every_source(test_pki: LabPki) -> None:
    cfg = _parse(
        test_pki,
        {
            "p": {"trust_domain": B, "bundle": {"file": "a.json"}, "issuer": "https://p"},
            "q": {"trust_domain": B, "bundle": {"source": "workload_api"}},
            "u": {"trust_domain": THIRD, "bundle": {"url": "https://u/keys", "ca": "bundle.pem"}},
        },
        [jwt_route("r", ["p", "q", "u"])],
    )
    assert cfg.routes[-1].jwt.issuers == ("p", "q", "u")
    assert cfg.jwt_issuers["p"].bundle.file == test_pki.dir / "a.json"
    assert not cfg.needs_signer


def test_check_lists_issuers_and_route_issuers(test_pki: LabPki) -> None:
    doc = gateway_config(test_pki, 9000)
    doc["jwt_issuers"] = {
        "spire": {"trust_domain": A, "bundle": {"source": "workload_api"}},
        "partner": {
            "trust_domain": B,
            "issuer": "https://partner.example",
            "bundle": {"url": "https://partner.example/keys", "ca": "bundle.pem"},
        },
    }
    doc["routes"] += [jwt_route("mixed", ["spire", "partner"])]
    path = test_pki.dir / "issuers.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "gateway", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"jwt issuer:    spire: {A} from workload_api $SPIFFE_ENDPOINT_SOCKET" in lines
    assert (
        f"jwt issuer:    partner: {B} from https://partner.example/keys, "
        "iss https://partner.example"
    ) in lines
    assert "      jwt audience=orders bind=none verify=remote issuers=spire,partner" in lines


def test_a_broken_bundle_file_stops_start_up_with_one_line(test_pki: LabPki) -> None:
    (test_pki.dir / "broken.json").write_text('{"keys": [{"kty": "EC", "kid": "k", "d": "x"}]}')
    doc = gateway_config(test_pki, 9000)
    doc["listen"] = doc["admin_listen"] = "127.0.0.1:0"
    doc["jwt_issuers"] = {"partner": {"trust_domain": B, "bundle": {"file": "broken.json"}}}
    path = test_pki.dir / "broken.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "gateway", "serve", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"svidgate: error: jwt_issuers.partner.bundle.file: {test_pki.dir / 'broken.json'}: "
        "keys[0]: contains private key material"
    ]
