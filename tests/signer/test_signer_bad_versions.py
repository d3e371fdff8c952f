"""Issue 10, item 2 (red team): a key loop that survives bad data.

Before, one bad KV version (a field of the wrong type, a garbage PEM, an activation time without
a time zone) stopped all key loading, ``activate_at: 9999-12-31…`` overflowed and killed the key
store's task for good, an RS256 key was used under ``keys.algorithm: ES256``, and a key planted
by another Vault principal with ``activate_at = now`` signed within a poll, unlogged. Now every
bad version is skipped and logged (ERROR, its version number, never its contents), the loop
keeps polling, and a key first seen with less than ``prepare_ahead`` to go waits out
``prepare_ahead`` from when the replica first saw it.

Real `svidgate signer serve` processes and a real OpenBao dev server, written to with its root
token as another principal would.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from signer_harness import (
    CLIENT_ID,
    BaoServer,
    SignerProcess,
    base_config,
    deep_merge,
    signer_pb2,
    unix_stub,
    vault_keys,
    wait_for,
)
from svidgate.signer.config import VaultConfig
from svidgate.signer.keygen import generate_signing_key, local_signing_key, private_key_pem
from svidgate.signer.keyring import END_OF_TIME, effective_activation, later
from svidgate.signer.sources.vault_transit import VaultTransitKeySource
from svidgate.signer.vault import VaultClient

PREPARE_AHEAD = 3.0
# prepare_ahead 3s >= poll_interval 250ms + clock_skew 500ms + keys.vault.timeout 2s
TIMING = {
    "tokens": {"default_ttl": "1m", "max_ttl": "5m", "clock_skew": "500ms"},
    "rotation": {"period": "1h", "prepare_ahead": "3s", "poll_interval": "250ms"},
}
PEM_BEGIN = "-----BEGIN PRIVATE KEY-----"
SETTLE = 10.0  # a few polls, on a busy machine


def key_entry(alg: str = "ES256", activate: datetime | None = None) -> dict[str, str]:
    """A well-formed KV version of a fresh key (as a signer writes it)."""
    private = generate_signing_key(alg)
    now = datetime.now(UTC)
    key = local_signing_key(private, alg, now, activate or now)
    return {
        "kid": key.kid,
        "alg": alg,
        "private_key": private_key_pem(private).decode(),
        "created_at": now.isoformat(),
        "activate_at": key.activate_at.isoformat(),
    }


class Stack:
    """One signer process on a fresh KV path, and the root token's view of that path."""

    def __init__(self, bao: BaoServer, directory: Path, make: Callable[..., SignerProcess]):
        self.bao = bao
        token = directory / "vault-token"
        token.write_text(bao.signer_token())
        token.chmod(0o600)  # a credential file: owner-only
        keys = vault_keys(bao, "vault-kv", "ES256", token)
        keys["vault"]["timeout"] = "2s"
        self.path = keys["vault"]["kv_path"]
        self.socket = directory / "s.sock"
        config = directory / "signer.yaml"
        data = deep_merge(base_config(self.socket, directory), {"keys": keys, **TIMING})
        config.write_text(yaml.safe_dump(data))
        self.proc = make(config, directory / "signer.log")

    def write(self, data: dict[str, Any]) -> int:
        """Write a version as another principal (the root token); returns its number."""
        reply = self.bao.api("POST", f"secret/data/{self.path}", {"data": data})
        return int(reply["data"]["version"])

    def destroy(self, versions: list[int]) -> None:
        self.bao.api("POST", f"secret/destroy/{self.path}", {"versions": versions})

    def log(self) -> str:
        return self.proc.log_tail(1_000_000)

    def errors(self, pattern: str) -> list[str]:
        """The messages of the ERROR lines logged so far that match ``pattern``."""
        return [m for m in self.proc.messages("error") if re.search(pattern, m)]


async def jwks_kids(stub: Any) -> set[str]:
    reply = await stub.GetJWKS(signer_pb2.GetJWKSRequest())
    return {k["kid"] for k in json.loads(reply.jwks_json)["keys"]}


def sign() -> signer_pb2.SignRequest:
    return signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"])


async def test_bad_versions_are_skipped_logged_and_polling_survives(
    bao: BaoServer, short_dir: Path, signer_process: Callable[..., SignerProcess]
) -> None:
    stack = Stack(bao, short_dir, signer_process)
    await stack.proc.start()
    async with unix_stub(stack.socket) as stub:
        first = await stub.Sign(sign())  # the bootstrap key, version 1
        naive = datetime.now(UTC).replace(tzinfo=None).isoformat()
        rsa = key_entry("RS256")
        bad = {
            "wrong types": {"kid": 7, "alg": ["ES256"], "private_key": {}, "activate_at": 1},
            "garbage PEM": {
                **key_entry(),
                "private_key": f"{PEM_BEGIN}\nZ2FyYmFnZQ==\n-----END PRIVATE KEY-----\n",
            },
            "naive time": {**key_entry(), "activate_at": naive},
            # just short of the end of time: + retain fits, + period overflowed, in the loop's
            # try and again in its wake-up computation outside it: the task died for good
            "far future": key_entry(activate=datetime(9999, 12, 31, 23, 30, tzinfo=UTC)),
            "RS256 under ES256": rsa,
        }
        versions = {what: stack.write(data) for what, data in bad.items()}
        problems = {
            "wrong types": "is missing or not a string",
            "garbage PEM": "not a readable PEM private key",
            "naive time": "activate_at has no time zone",
            "far future": "activate_at 9999-12-31T23:30:00\\+00:00 is more than rotation.period",
            "RS256 under ES256": "alg RS256 is not keys.algorithm ES256",
        }
        for what, version in versions.items():
            pattern = rf"version {version}\b.*{problems[what]}"
            await wait_for(lambda p=pattern: stack.errors(p), SETTLE, f"ERROR for {what}")

        # the good key keeps signing and verifying; no bad key is published
        again = await stub.Sign(sign())
        assert again.kid == first.kid
        await stub.Verify(signer_pb2.VerifyRequest(token=first.token, audience=["orders"]))
        assert await jwks_kids(stub) == {first.kid}

        # polling goes on while the bad versions are there: a good version is picked up
        good = key_entry(activate=datetime.now(UTC) + timedelta(seconds=PREPARE_AHEAD))
        stack.write(good)
        await wait_for(lambda: jwks_has(stub, good["kid"]), SETTLE, "the good version")
        # … and after they are destroyed (the far-future one used to kill the loop)
        stack.destroy(list(versions.values()))
        later = key_entry(activate=datetime.now(UTC) + timedelta(seconds=2 * PREPARE_AHEAD))
        stack.write(later)
        await wait_for(lambda: jwks_has(stub, later["kid"]), SETTLE, "a version after destroy")
        # the good foreign key, announced prepare_ahead ahead, takes over on schedule
        await wait_for(lambda: signs_with(stub, good["kid"]), SETTLE, "the good key to sign")

    for what, version in versions.items():  # once per version, not once per poll
        assert len(stack.errors(rf"version {version}\b")) == 1, what
    log = stack.log()
    assert "PRIVATE KEY" not in log and "Z2FyYmFnZQ" not in log  # no key material
    assert "Traceback" not in log
    assert stack.proc.stop() == 0


async def jwks_has(stub: Any, kid: str) -> bool:
    return kid in await jwks_kids(stub)


async def signs_with(stub: Any, kid: str) -> bool:
    return bool((await stub.Sign(sign())).kid == kid)


async def test_planted_key_waits_out_prepare_ahead(
    bao: BaoServer, short_dir: Path, signer_process: Callable[..., SignerProcess]
) -> None:
    """A key another principal writes with ``activate_at = now`` is published at once but does
    not sign before prepare_ahead has passed since this replica first saw it (which is after
    the write), and the delay is logged."""
    stack = Stack(bao, short_dir, signer_process)
    await stack.proc.start()
    async with unix_stub(stack.socket) as stub:
        first = await stub.Sign(sign())
        written = time.time()  # before the write: the replica sees the key after this
        planted = key_entry()  # activate_at = now
        version = stack.write(planted)
        await wait_for(lambda: jwks_has(stub, planted["kid"]), SETTLE, "the planted key published")
        earliest = written + PREPARE_AHEAD
        deadline = earliest + SETTLE
        while True:
            reply = await stub.Sign(sign())
            answered = time.time()  # the token was signed before this
            if reply.kid == planted["kid"]:
                assert answered >= earliest, f"signed {earliest - answered:.2f} s too early"
                break
            assert reply.kid == first.kid
            assert answered < deadline, "the planted key never signed"
            await asyncio.sleep(0.05)
    assert any(
        f"key {planted['kid']} appeared in the key source" in m for m in stack.proc.messages()
    )
    warnings = stack.proc.messages("warning")
    assert any(
        re.match(
            rf"key {planted['kid']} \(.* version {version}\) activates at .*less than "
            r"rotation.prepare_ahead after this replica first saw it",
            m,
        )
        for m in warnings
    ), warnings
    assert stack.proc.stop() == 0


async def test_file_source_skips_bad_entries(
    short_dir: Path, signer_process: Callable[..., SignerProcess]
) -> None:
    """The same rules for the file source: state.json entries are skipped one by one."""
    keys_dir = short_dir / "keys"
    keys_dir.mkdir(mode=0o700)
    entries: list[Any] = []
    long_ago = datetime.now(UTC) - timedelta(minutes=5)
    for alg, activate in (("ES256", long_ago), ("RS256", long_ago), ("ES256", long_ago)):
        entry = key_entry(alg, activate)
        (keys_dir / f"{entry['kid']}.pem").write_text(entry.pop("private_key"))
        (keys_dir / f"{entry['kid']}.pem").chmod(0o600)
        entries.append(entry)
    good, _rs256, naive = entries
    naive["activate_at"] = long_ago.replace(tzinfo=None).isoformat()
    garbage = key_entry()
    (keys_dir / f"{garbage['kid']}.pem").write_text("not a key\n")
    entries += [
        {k: v for k, v in garbage.items() if k != "private_key"},
        "junk",
        {"kid": "../x", "alg": "ES256"},
    ]
    (keys_dir / "state.json").write_text(json.dumps({"generation": 1, "keys": entries}))

    sock = short_dir / "s.sock"
    config = short_dir / "signer.yaml"
    config.write_text(yaml.safe_dump(deep_merge(base_config(sock, keys_dir), TIMING)))
    proc = signer_process(config, short_dir / "signer.log")
    await proc.start()  # before, the whole load failed: no key, never ready
    async with unix_stub(sock) as stub:
        assert (await stub.Sign(sign())).kid == good["kid"]
        assert await jwks_kids(stub) == {good["kid"]}
    errors = proc.messages("error")
    for index, problem in (
        (1, "alg RS256 is not keys.algorithm ES256"),
        (2, "activate_at has no time zone"),
        (3, "not a readable PEM private key"),
        (4, "not a key entry"),
        (5, "kid is not a key thumbprint"),
    ):
        pattern = rf"state.json entry {index}: skipped.*{problem}"
        assert any(re.search(pattern, m) for m in errors), (index, errors)
    assert proc.stop() == 0


def test_transit_skips_an_unusable_version(caplog: Any) -> None:
    """Transit versions come from Vault itself; one it lists with an unusable public key is
    skipped (ERROR, its number) and the others load (the listing as Vault returns it)."""
    client = VaultClient(VaultConfig.model_validate({"address": "http://127.0.0.1:1"}))
    source = VaultTransitKeySource(client, "ES256", timedelta(seconds=3))
    private = generate_signing_key("ES256")
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    listing = {
        "type": "ecdsa-p256",
        "keys": {
            "1": {"public_key": public.decode(), "creation_time": "2026-01-01T00:00:00Z"},
            "2": {"public_key": "garbage", "creation_time": "2026-01-02T00:00:00Z"},
            "3": {"creation_time": "2026-01-03T00:00:00Z"},
        },
    }
    with caplog.at_level("ERROR", logger="svidgate.signer.keys"):
        listed = source._listed(listing)
    client.close()
    assert [version for version, _ in listed] == [1]
    messages = [r.getMessage() for r in caplog.records]
    assert any("version 2: skipped" in m and "unreadable public key" in m for m in messages)
    assert any("version 3: skipped" in m and "public_key is missing" in m for m in messages)


T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = timedelta(seconds=1)


@pytest.mark.parametrize(
    ("activate", "first_seen", "effective"),
    [
        (100, None, 100),  # taken as it is (first read, own key, replaces a lost active key)
        (100, 0, 100),  # announced prepare_ahead (100 s) ahead
        (100, 25, 100),  # within the propagation allowance (30 s)
        (100, 31, 131),  # announced too late: prepare_ahead from first seen
        (10, 10, 110),  # active when first seen (planted with activate_at = now)
        (-50, 10, 110),  # in the past when first seen
    ],
)
def test_effective_activation(activate: int, first_seen: int | None, effective: int) -> None:
    seen = None if first_seen is None else T0 + first_seen * S
    got = effective_activation(T0 + activate * S, seen, 100 * S, 30 * S)
    assert got == T0 + effective * S


def test_time_arithmetic_saturates() -> None:
    end = datetime(9999, 12, 31, 23, 30, tzinfo=UTC)
    assert later(end, timedelta(hours=1)) == END_OF_TIME
    assert later(T0, S) == T0 + S
    assert effective_activation(end, end, timedelta(days=1), S) == END_OF_TIME
