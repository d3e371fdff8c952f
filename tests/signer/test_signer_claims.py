"""Issue 9, item 2 (red team): the signer vouches only for the claims it was told to vouch for.

Before: any caller allowed to `Sign` put any extra claim in `claims_json` (`{"role": "admin"}`)
and the gateway forwarded it as a verified claim header. Now extra claims are refused unless
`authorization.claims` grants them — to the caller over mTLS TCP, to the token's subject over the
Unix socket — and registered claims are refused for everyone, whatever the config says. Each
attack runs against a real `svidgate signer serve` process over both transports; the optional
`authorization.audiences` runs against the in-process grpc.aio server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from signer_harness import (
    CLIENT_ID,
    MINTER_ID,
    TD,
    Pki,
    SignerProcess,
    base_config,
    deep_merge,
    reason_of,
    rpc_error,
    running_signer,
    signer_pb2,
    tls_stub,
    unix_stub,
    write_config,
)
from support.ports import free_port
from svidgate.signer.config import parse_config

from svidgate.config import ConfigError

ROLE = '{"role": "admin"}'
REGISTERED = [
    '{"sub": "spiffe://example.org/admin"}',
    '{"cnf": {"x5t#S256": "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}}',
    '{"exp": 4102444800}',
    '{"iss": "spiffe://example.org/other"}',
    '{"aud": "payments"}',
    '{"jti": "x"}',
    '{"nbf": 0}',
    '{"iat": 0}',
]


def claims_config(pki: Pki, short_dir: Path, port: int) -> dict[str, Any]:
    crt, key = pki.files("signer")
    return deep_merge(
        base_config(short_dir / "s.sock", short_dir / "keys"),
        {
            "listen": {"tcp": f"127.0.0.1:{port}"},
            "tls": {"cert": str(crt), "key": str(key), "bundle": str(pki.dir / "bundle.pem")},
            # the minter (and, over the socket, tokens for the minter) may set `role`
            "authorization": {"claims": {"role": [MINTER_ID], "team": [f"spiffe://{TD}/ns/**"]}},
        },
    )


async def claims_of(stub: Any, token: str) -> dict[str, Any]:
    verified = await stub.Verify(signer_pb2.VerifyRequest(token=token, audience=["orders"]))
    return dict(json.loads(verified.claims_json))


async def refused(call: Any, code: grpc.StatusCode, reason: str) -> str:
    err = await rpc_error(call)
    assert err.code() == code, err.details()
    assert err.details().startswith(f"{reason}: "), err.details()
    assert await reason_of(err) == reason
    return str(err.details())


@pytest.fixture
async def signer_port(pki: Pki, short_dir: Path) -> Any:
    """A signer process with this module's claims policy, also on mTLS TCP: its port."""
    port = free_port()
    config = short_dir / "signer.yaml"
    config.write_text(yaml.safe_dump(claims_config(pki, short_dir, port)))
    proc = SignerProcess(config, short_dir / "signer.log")
    await proc.start(short_dir / "s.sock")
    try:
        yield port
    finally:
        assert proc.stop() == 0


async def test_tcp_extra_claims_need_authorization_claims(
    pki: Pki, short_dir: Path, signer_port: int
) -> None:
    port = signer_port
    async with tls_stub(pki, "client", port) as client, tls_stub(pki, "gateway", port) as gw:
        # an ordinary caller (allowed to Sign for itself) tries to make itself admin
        request = signer_pb2.SignRequest(audience=["orders"], claims_json=ROLE)
        details = await refused(
            client.Sign(request), grpc.StatusCode.PERMISSION_DENIED, "claim_not_allowed"
        )
        assert details.startswith("claim_not_allowed: role ")
        # a claim granted to its pattern goes through; role in the same request does not
        ok = await client.Sign(
            signer_pb2.SignRequest(audience=["orders"], claims_json='{"team": "a"}')
        )
        assert (await claims_of(gw, ok.token))["team"] == "a"
        both = signer_pb2.SignRequest(audience=["orders"], claims_json='{"team": "a", "role": "x"}')
        await refused(client.Sign(both), grpc.StatusCode.PERMISSION_DENIED, "claim_not_allowed")
    async with tls_stub(pki, "minter", port) as minter, tls_stub(pki, "gateway", port) as gw:
        signed = await minter.Sign(signer_pb2.SignRequest(audience=["orders"], claims_json=ROLE))
        claims = await claims_of(gw, signed.token)
        assert claims["role"] == "admin" and claims["sub"] == MINTER_ID
        # over TCP the caller vouches: the minter minting for another subject may set role
        other = signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"], claims_json=ROLE)
        claims = await claims_of(gw, (await minter.Sign(other)).token)
        assert claims["role"] == "admin" and claims["sub"] == CLIENT_ID
        # registered claims: refused even for the caller that may set `role`
        for text in REGISTERED:
            request = signer_pb2.SignRequest(audience=["orders"], claims_json=text)
            details = await refused(
                minter.Sign(request), grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"
            )
            assert "registered claims" in details


async def test_unix_socket_checks_the_token_subject(short_dir: Path, signer_port: int) -> None:
    async with unix_stub(short_dir / "s.sock") as stub:
        attack = signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"], claims_json=ROLE)
        details = await refused(
            stub.Sign(attack), grpc.StatusCode.PERMISSION_DENIED, "claim_not_allowed"
        )
        assert details.startswith(f"claim_not_allowed: role ({CLIENT_ID} may not set it")
        # tokens for the minter may carry role (the subject is the principal here)
        granted = signer_pb2.SignRequest(subject=MINTER_ID, audience=["orders"], claims_json=ROLE)
        assert (await claims_of(stub, (await stub.Sign(granted)).token))["role"] == "admin"
        for subject in (CLIENT_ID, MINTER_ID):
            for text in REGISTERED:
                request = signer_pb2.SignRequest(
                    subject=subject, audience=["orders"], claims_json=text
                )
                await refused(
                    stub.Sign(request), grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"
                )


async def test_no_extra_claims_without_configuration(short_dir: Path) -> None:
    """The default: nobody may set any extra claim, over either transport."""
    sock = short_dir / "s.sock"
    cfg = write_config(short_dir, base_config(sock, short_dir / "keys"))
    async with running_signer(cfg), unix_stub(sock) as stub:
        for subject in (CLIENT_ID, MINTER_ID):
            request = signer_pb2.SignRequest(
                subject=subject, audience=["orders"], claims_json='{"scope": "read"}'
            )
            await refused(
                stub.Sign(request), grpc.StatusCode.PERMISSION_DENIED, "claim_not_allowed"
            )
        plain = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"]))
        assert "scope" not in await claims_of(stub, plain.token)
        empty = signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"], claims_json="{}")
        assert (await stub.Sign(empty)).token
    assert cfg.authorization.claims == {}


@pytest.mark.parametrize("claim", ["iss", "sub", "aud", "exp", "nbf", "iat", "jti", "cnf"])
def test_registered_claims_cannot_be_granted(tmp_path: Path, claim: str) -> None:
    data = deep_merge(
        base_config(tmp_path / "s.sock", tmp_path / "keys"),
        {"authorization": {"claims": {claim: [MINTER_ID]}}},
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=tmp_path)
    assert f"authorization.claims.{claim}: {claim} is a registered claim" in str(caught.value)


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        ({"claims": {"role": ["example.org/x"]}}, "authorization.claims.role.0: invalid SPIFFE ID"),
        ({"claims": {"": [MINTER_ID]}}, "a claim name must not be empty"),
        ({"audiences": {"nope": ["orders"]}}, "authorization.audiences.nope: invalid SPIFFE ID"),
        ({"audiences": {MINTER_ID: [""]}}, f"authorization.audiences.{MINTER_ID}.0:"),
    ],
)
def test_policy_config_errors_name_the_field(
    tmp_path: Path, authorization: dict[str, Any], message: str
) -> None:
    data = deep_merge(
        base_config(tmp_path / "s.sock", tmp_path / "keys"), {"authorization": authorization}
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(data, base_dir=tmp_path)
    assert message in str(caught.value)


async def test_audiences_restrict_who_mints_for_what(pki: Pki, short_dir: Path) -> None:
    data = deep_merge(
        claims_config(pki, short_dir, 0),
        {"authorization": {"audiences": {"spiffe://example.org/ns/**": ["orders", "cart"]}}},
    )
    cfg = write_config(short_dir, data)
    async with running_signer(cfg) as server, unix_stub(short_dir / "s.sock") as stub:
        assert server.tcp_port
        async with tls_stub(pki, "client", server.tcp_port) as client:
            assert (await client.Sign(signer_pb2.SignRequest(audience=["orders", "cart"]))).token
            details = await refused(
                client.Sign(signer_pb2.SignRequest(audience=["orders", "payments"])),
                grpc.StatusCode.PERMISSION_DENIED,
                "audience_not_allowed",
            )
            assert details.startswith("audience_not_allowed: payments ")
        # once audiences is set, a principal that matches no pattern mints for nothing
        async with tls_stub(pki, "minter", server.tcp_port) as minter:
            await refused(
                minter.Sign(signer_pb2.SignRequest(audience=["orders"])),
                grpc.StatusCode.PERMISSION_DENIED,
                "audience_not_allowed",
            )
        # over the socket the token's subject is the principal
        ok = signer_pb2.SignRequest(subject=CLIENT_ID, audience=["cart"])
        assert (await stub.Sign(ok)).token
        await refused(
            stub.Sign(signer_pb2.SignRequest(subject=MINTER_ID, audience=["cart"])),
            grpc.StatusCode.PERMISSION_DENIED,
            "audience_not_allowed",
        )
