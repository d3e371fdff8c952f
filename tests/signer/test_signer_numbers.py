"""Errors and numbers (issue 10, item 5), against a real ``svidgate signer serve`` process.

The red team got INTERNAL with a traceback per call from a huge ``ttl_seconds`` (about 1 MB/s of
log from one caller), a RecursionError from deeply nested claims, INTERNAL from ``exp: NaN`` and
a ten-year token through ``iat: NaN``. Every bad number here is driven through the real server:
Sign answers INVALID_ARGUMENT (or caps the TTL), Verify answers UNAUTHENTICATED ``malformed``,
and the process's log never holds a traceback.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from signer_harness import (
    CLIENT_ID,
    ISSUER,
    SignerProcess,
    base_config,
    deep_merge,
    reason_of,
    rpc_error,
    signer_pb2,
    unix_stub,
)
from svidgate.pki.jose import b64url_encode
from svidgate.signer.jwt import sign_local
from svidgate.signer.service import status_for

Spawn = Callable[..., SignerProcess]
INT64_MAX = 2**63 - 1
TEN_YEARS = 10 * 365 * 86400


def start_config(directory: Path) -> Path:
    data = deep_merge(
        base_config(directory / "s.sock", directory / "keys"),
        {"authorization": {"claims": {"x": [CLIENT_ID]}}},
    )
    path = directory / f"signer-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def assert_clean_log(proc: SignerProcess) -> None:
    log = proc.log_tail(1_000_000)
    assert "Traceback" not in log, log[-3000:]
    assert "unexpected error" not in log, log[-3000:]


async def test_sign_numbers_are_clamped_or_refused(short_dir: Path, signer_process: Spawn) -> None:
    proc = signer_process(start_config(short_dir))
    await proc.start()
    async with unix_stub(short_dir / "s.sock") as stub:

        def sign(**fields: Any) -> Any:
            return stub.Sign(
                signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"], **fields), timeout=5
            )

        # a TTL past what timedelta holds (~8.6e13 s) is capped at max_ttl, never an overflow
        for ttl in (86_400_000_000_000, 10**17, INT64_MAX):
            signed = await sign(ttl_seconds=ttl)
            claims = json.loads(
                (
                    await stub.Verify(
                        signer_pb2.VerifyRequest(token=signed.token, audience=["orders"])
                    )
                ).claims_json
            )
            assert claims["exp"] - claims["iat"] == 900, ttl
        for ttl in (-1, -(2**63)):
            err = await rpc_error(sign(ttl_seconds=ttl))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.details() == "invalid_argument: ttl_seconds must not be negative"
        refused = [
            '{"x": NaN}',
            '{"x": Infinity}',
            '{"x": [-Infinity]}',
            '{"x": 1e400}',
            '{"x": -1e400}',
            '{"x": 9007199254740992}',  # 2**53: no longer exact in a double
            '{"x": {"y": -9007199254740993}}',
            '{"x": ' + "9" * 400 + "}",
            '{"x": ' + "[" * 2000 + "]" * 2000 + "}",  # past the recursion limit, under 4 KiB
            '{"x": ' + "[" * 70 + "]" * 70 + "}",  # past the strict parser's 64 levels
        ]
        for claims_json in refused:
            err = await rpc_error(sign(claims_json=claims_json))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, claims_json[:40]
            assert await reason_of(err) == "invalid_argument"
        # 100,000 levels (200 KB) never reach a parser: gRPC's 64 KiB receive limit, or the
        # 4 KiB claims limit for what fits in a message
        err = await rpc_error(sign(claims_json='{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        err = await rpc_error(sign(claims_json='{"x": ' + "[" * 30_000 + "]" * 30_000 + "}"))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "limits.claims_bytes" in err.details()
        # the largest exact integers and ordinary floats are fine, and come back unchanged
        edge = {"x": [9007199254740991, -9007199254740991, 0.5, 1e300]}
        signed = await sign(claims_json=json.dumps(edge))
        verified = await stub.Verify(
            signer_pb2.VerifyRequest(token=signed.token, audience=["orders"])
        )
        assert json.loads(verified.claims_json)["x"] == edge["x"]
    assert_clean_log(proc)


def active_key(keys_dir: Path, kid: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key((keys_dir / f"{kid}.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def forge(key: ec.EllipticCurvePrivateKey, kid: str, payload: str) -> str:
    """A token with a genuine signature of the signer's own key over ``payload`` as given."""
    header = b64url_encode(json.dumps({"alg": "ES256", "kid": kid, "typ": "JWT"}).encode())
    data = f"{header}.{b64url_encode(payload.encode())}".encode()
    return f"{data.decode()}.{b64url_encode(sign_local('ES256', key, data))}"


def payload(**raw: str) -> str:
    """Valid claims for CLIENT_ID / orders, with members replaced by raw JSON text."""
    now = int(time.time())
    members = {
        "iss": json.dumps(ISSUER),
        "sub": json.dumps(CLIENT_ID),
        "aud": '"orders"',
        "iat": str(now),
        "exp": str(now + 60),
        "jti": '"j"',
    }
    members.update(raw)
    return "{" + ",".join(f'"{name}":{value}' for name, value in members.items()) + "}"


async def test_verify_refuses_numbers_that_are_no_dates(
    short_dir: Path, signer_process: Spawn
) -> None:
    proc = signer_process(start_config(short_dir))
    await proc.start()
    async with unix_stub(short_dir / "s.sock") as stub:
        signed = await stub.Sign(signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"]))
        key = active_key(short_dir / "keys", signed.kid)
        later = str(int(time.time()) + TEN_YEARS)

        async def reason(text: str) -> str:
            err = await rpc_error(
                stub.Verify(
                    signer_pb2.VerifyRequest(
                        token=forge(key, signed.kid, text), audience=["orders"]
                    )
                )
            )
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED, text[:80]
            return await reason_of(err)

        # the control: the same forgery with sane numbers verifies
        ok = await stub.Verify(
            signer_pb2.VerifyRequest(token=forge(key, signed.kid, payload()), audience=["orders"])
        )
        assert ok.subject == CLIENT_ID
        malformed = [
            payload(iat="NaN", exp=later),  # NaN compares false: it once skipped max_ttl
            payload(exp="NaN"),
            payload(exp="Infinity"),
            payload(iat="-Infinity"),
            payload(nbf="NaN"),
            payload(exp="1e400"),
            payload(exp="9" * 400),
            payload(iat=str(int(time.time())), exp=later),  # a ten-year lifetime: past max_ttl
            payload(x="[" * 2000 + "]" * 2000),
        ]
        for text in malformed:
            assert await reason(text) == "malformed", text[:80]
        assert await reason(payload(x="[" * 5000 + "]" * 5000)) == "too_large"
    assert_clean_log(proc)


def test_python_errors_on_caller_values_map_to_invalid_argument() -> None:
    """The one status table's safety net: whatever Python raises on a value that slipped past
    the explicit checks is the request's fault (no INTERNAL, no traceback)."""
    for exc in (OverflowError("date value out of range"), RecursionError(), ValueError("x")):
        assert status_for(exc) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "invalid_argument",
            f"invalid_argument: {exc}",
        )
    assert status_for(KeyError("k")) is None  # still INTERNAL, with its traceback
