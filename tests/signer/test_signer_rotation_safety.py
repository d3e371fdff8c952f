"""Issue 10, item 4 (red team): rotation safety under real conditions.

Before, eleven `Rotate` calls in a row wrote eleven KV versions; KV keeps 10 by default, so the
active key's version was pruned and a fresh replica failed both Verify (`unknown_kid`) and Sign,
with nothing logged. Now a Rotate while a prepared key is pending is refused
(FAILED_PRECONDITION `rotation_pending`), a write that would prune a published key's version is
refused (`kv_max_versions`, with the command that fixes it), the signer warns when the secret
keeps fewer versions than the ring may need, and the start-up safety rule accounts for Vault
latency and clock skew: prepare_ahead >= poll_interval + clock_skew + keys.vault.timeout.

Real `svidgate signer serve` processes, the real CLI and a real OpenBao dev server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from signer_harness import (
    CLIENT_ID,
    BaoServer,
    SignerProcess,
    base_config,
    deep_merge,
    reason_of,
    rpc_error,
    signer_pb2,
    unix_stub,
    vault_keys,
    wait_for,
)
from svidgate.pki.durations import parse_duration
from svidgate.signer.keyring import Timing
from svidgate.signer.rotation import versions_needed

# prepare_ahead 3s >= poll_interval 250ms + clock_skew 500ms + keys.vault.timeout 2s
TIMING = {
    "tokens": {"default_ttl": "1m", "max_ttl": "5m", "clock_skew": "500ms"},
    "rotation": {"period": "1h", "prepare_ahead": "3s", "poll_interval": "250ms"},
}
SETTLE = 10.0
# The pending-rotation test keeps its prepared key pending through ten refused Rotates, one CLI
# process and a second replica's start-up: on a loaded machine that takes well over 3 s, so its
# key is prepared 30 s ahead (the safety rule holds all the more).
PENDING = 30.0
LONG_PREPARE = deep_merge(TIMING, {"rotation": {"prepare_ahead": f"{PENDING:g}s"}})


def svidgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svidgate.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


def kv_config(
    bao: BaoServer,
    directory: Path,
    name: str,
    keys: dict[str, Any],
    timing: dict[str, Any] = TIMING,
) -> Path:
    """signer.yaml for one replica (its own socket ``name.sock``) on the KV path of ``keys``."""
    config = directory / f"{name}.yaml"
    data = deep_merge(base_config(directory / f"{name}.sock", directory), {"keys": keys, **timing})
    config.write_text(yaml.safe_dump(data))
    return config


def fresh_keys(bao: BaoServer, directory: Path) -> dict[str, Any]:
    token = directory / "vault-token"
    token.write_text(bao.signer_token())
    token.chmod(0o600)  # a credential file: owner-only
    keys = vault_keys(bao, "vault-kv", "ES256", token)
    keys["vault"]["timeout"] = "2s"
    return keys


def sign() -> signer_pb2.SignRequest:
    return signer_pb2.SignRequest(subject=CLIENT_ID, audience=["orders"])


def verify(token: str) -> signer_pb2.VerifyRequest:
    return signer_pb2.VerifyRequest(token=token, audience=["orders"])


async def test_rotate_is_refused_while_a_key_is_pending(
    bao: BaoServer, short_dir: Path, signer_process: Callable[..., SignerProcess]
) -> None:
    keys = fresh_keys(bao, short_dir)
    path = keys["vault"]["kv_path"]
    config = kv_config(bao, short_dir, "a", keys, LONG_PREPARE)
    first = signer_process(config, short_dir / "a.log")
    await first.start()
    async with unix_stub(short_dir / "a.sock") as stub:
        token = await stub.Sign(sign())  # the active (bootstrap) key
        rotated = await stub.Rotate(signer_pb2.RotateRequest())
        for _ in range(9):
            err = await rpc_error(stub.Rotate(signer_pb2.RotateRequest()))
            assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert await reason_of(err) == "rotation_pending"
            assert err.details().startswith(
                f"rotation_pending: key {rotated.prepared_kid} is prepared and activates at "
            )
        # the eleventh through the CLI: one line, exit 2
        done = svidgate("signer", "rotate", "--config", str(config))
        assert done.returncode == 2
        assert re.fullmatch(
            rf"svidgate: error: Rotate failed: rotation_pending: key {rotated.prepared_kid} "
            r"is prepared and activates at \S+; rotate again once it is active\n",
            done.stderr,
        ), done.stderr
    meta = bao.api("GET", f"secret/metadata/{path}")["data"]
    assert meta["current_version"] == 2 and meta["oldest_version"] in (0, 1)

    # a fresh replica started afterwards verifies the active key's tokens and signs
    second = signer_process(kv_config(bao, short_dir, "b", keys, LONG_PREPARE), short_dir / "b.log")
    await second.start()
    async with unix_stub(short_dir / "b.sock") as fresh:
        verified = await fresh.Verify(verify(token.token))
        assert verified.kid == token.kid
        signed = await fresh.Sign(sign())
        # the fresh replica refuses a Rotate too: the key was still pending when it signed above
        err = await rpc_error(fresh.Rotate(signer_pb2.RotateRequest()))
        assert await reason_of(err) == "rotation_pending", err.details()
        assert signed.kid == token.kid
        # once the prepared key is active, the next rotation goes through
        await wait_for(
            lambda: signs_with(fresh, rotated.prepared_kid),
            PENDING + SETTLE,
            "the prepared key to sign",
        )
        again = await fresh.Rotate(signer_pb2.RotateRequest())
        assert again.active_kid == rotated.prepared_kid
    assert first.stop() == 0 and second.stop() == 0


async def signs_with(stub: Any, kid: str) -> bool:
    return bool((await stub.Sign(sign())).kid == kid)


async def test_a_write_that_would_prune_a_published_key_is_refused(
    bao: BaoServer, short_dir: Path, signer_process: Callable[..., SignerProcess]
) -> None:
    keys = fresh_keys(bao, short_dir)
    path = keys["vault"]["kv_path"]
    bao.api("POST", f"secret/metadata/{path}", {"max_versions": 2})  # an operator's setting
    proc = signer_process(kv_config(bao, short_dir, "a", keys), short_dir / "a.log")
    await proc.start()
    async with unix_stub(short_dir / "a.sock") as stub:
        old = await stub.Sign(sign())  # version 1
        rotated = await stub.Rotate(signer_pb2.RotateRequest())  # version 2 keeps version 1
        await wait_for(lambda: signs_with(stub, rotated.prepared_kid), SETTLE, "activation")
        # version 1 now holds a retired key that still verifies: version 3 would prune it
        err = await rpc_error(stub.Rotate(signer_pb2.RotateRequest()))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert await reason_of(err) == "kv_max_versions"
        assert err.details() == (
            f"kv_max_versions: vault-kv:secret/{path} keeps 2 versions (max_versions): "
            f"writing version 3 would prune version 1, which holds key {old.kid} (still "
            f"published); set at least 3 with: bao kv metadata put -mount=secret "
            f"-max-versions=3 {path}"
        )
        await stub.Verify(verify(old.token))
        jwks = json.loads((await stub.GetJWKS(signer_pb2.GetJWKSRequest())).jwks_json)
        assert {k["kid"] for k in jwks["keys"]} == {old.kid, rotated.prepared_kid}
    assert bao.api("GET", f"secret/metadata/{path}")["data"]["current_version"] == 2
    warnings = proc.messages("warning")
    assert any(
        re.match(
            rf"key source vault-kv:secret/{path} keeps 2 versions \(max_versions\), fewer "
            r"than the \d+ the key ring may need",
            m,
        )
        for m in warnings
    ), warnings
    errors = proc.messages("error")
    refused = f"prepare rotation refused: vault-kv:secret/{path} keeps 2 "
    assert any(m.startswith(refused) for m in errors), errors
    assert proc.stop() == 0


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        (
            "file",
            {},
            "rotation.poll_interval + tokens.clock_skew (1s + 30s = 31s)",
        ),
        (
            "vault-kv",
            {
                "address": "http://127.0.0.1:1",
                "timeout": "5s",
                "auth": {"method": "token", "token_file": "vault-token"},
            },
            "rotation.poll_interval + tokens.clock_skew + keys.vault.timeout (1s + 30s + 5s = 36s)",
        ),
    ],
)
def test_safety_rule_counts_clock_skew_and_vault_latency(
    short_dir: Path, source: str, extra: dict[str, Any], message: str
) -> None:
    config = short_dir / "signer.yaml"
    keys: dict[str, Any] = {"source": source}
    if extra:
        keys["vault"] = extra
    data = deep_merge(
        base_config(short_dir / "s.sock", short_dir / "keys"),
        {"keys": keys, "rotation": {"prepare_ahead": "30s", "poll_interval": "1s"}},
    )
    config.write_text(yaml.safe_dump(data))
    expected = (
        f"svidgate: error: {config}: rotation.prepare_ahead: must be >= {message} so every "
        "replica sees a key before it signs, despite clock skew and Vault latency (got 30s)\n"
    )
    for command in ("check", "serve"):
        done = svidgate("signer", command, "--config", str(config))
        assert (done.returncode, done.stderr, done.stdout) == (2, expected, ""), command
    assert not (short_dir / "s.sock").exists()
    # the minimum passes
    data["rotation"]["prepare_ahead"] = message.rsplit("= ", 1)[1].rstrip(")")
    config.write_text(yaml.safe_dump(data))
    done = svidgate("signer", "check", "--config", str(config))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("config", ["deploy/compose/signer.yaml"])
def test_shipped_configs_pass_the_safety_rule(config: str) -> None:
    """The shipped configs keep the rule (k8s and the dev stack: tests/test_deploy.py and
    tests/test_up.py load theirs)."""
    root = Path(__file__).resolve().parents[2]
    done = svidgate("signer", "check", "--config", str(root / config))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("prepare_ahead", "retain", "needed"),
    [
        ("10m", "15m40s", 6),  # the defaults: KV's 10 versions are enough
        ("3s", "5m750ms", 105),  # this file's timing: a Rotate every 3 s for 5 minutes
        ("1m", "1m", 6),
    ],
)
def test_versions_needed(prepare_ahead: str, retain: str, needed: int) -> None:
    timing = Timing(
        period=parse_duration("24h"),
        prepare_ahead=parse_duration(prepare_ahead),
        retain=parse_duration(retain),
        clock_skew=parse_duration("30s"),
        max_ttl=parse_duration("15m"),
    )
    assert versions_needed(timing) == needed
