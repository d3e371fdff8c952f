"""`svidgate signer serve|sign|rotate` as real processes: sign prints only the JWT, errors are
one line with exit code 2, a --ttl beyond max_ttl is capped with one warning line on stderr,
SIGTERM shuts down cleanly with exit code 0."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from signer_harness import (
    CLIENT_ID,
    SIGNER_ID,
    TD,
    Pki,
    SignerProcess,
    base_config,
    deep_merge,
    running_signer,
    signer_pb2,
    unix_stub,
)
from support.ports import free_port
from svidgate.signer.config import load_config


def svidgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svidgate.cli", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_serve_sign_rotate_and_shutdown(short_dir: Path) -> None:
    config = short_dir / "signer.yaml"
    sock = short_dir / "run" / "signer.sock"
    data = base_config(Path("run/signer.sock"), Path("keys"))  # relative to the config file
    config.write_text(yaml.safe_dump(data))
    proc = SignerProcess(config, short_dir / "signer.log")
    await proc.start(sock)
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o755  # created for the socket
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    try:
        done = svidgate(
            "signer", "sign", "--config", str(config), "--subject", CLIENT_ID,
            "--audience", "orders", "--ttl", "90s",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        token = done.stdout.strip()
        assert done.stdout == token + "\n" and token.count(".") == 2
        async with unix_stub(sock) as stub:
            verified = await stub.Verify(signer_pb2.VerifyRequest(token=token, audience=["orders"]))
        assert verified.subject == CLIENT_ID
        claims = json.loads(verified.claims_json)
        assert claims["exp"] - claims["iat"] == 90 and claims["exp"] == verified.expires_at

        # beyond tokens.max_ttl (15m): capped, one warning line with the TTL it got, exit 0
        done = svidgate(
            "signer", "sign", "--config", str(config), "--subject", CLIENT_ID,
            "--audience", "orders", "--ttl", "2h",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stderr == (
            "svidgate: warning: --ttl 2h capped at tokens.max_ttl (15m): the token's TTL is 15m\n"
        )
        token = done.stdout.strip()
        assert done.stdout == token + "\n"
        async with unix_stub(sock) as stub:
            verified = await stub.Verify(signer_pb2.VerifyRequest(token=token, audience=["orders"]))
        claims = json.loads(verified.claims_json)
        assert claims["exp"] - claims["iat"] == 15 * 60

        done = svidgate("signer", "rotate", "--config", str(config))
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith("prepared ")

        done = svidgate(
            "signer", "sign", "--config", str(config), "--subject", "spiffe://evil.org/x",
            "--audience", "orders",
        )  # fmt: skip
        assert done.returncode == 2
        assert done.stdout == ""
        assert done.stderr.strip().splitlines() == [
            "svidgate: error: Sign failed: permission_denied: "
            "subject spiffe://evil.org/x is not in authorization.sign"
        ]
        # an open WatchKeys stream ends cleanly at shutdown instead of holding it up
        async with unix_stub(sock) as stub:
            stream = stub.WatchKeys(signer_pb2.WatchKeysRequest())
            await stream.read()
            started = time.monotonic()
            assert await asyncio.to_thread(proc.stop) == 0
            assert time.monotonic() - started < 4  # the grace period is 5 s
            assert await stream.read() == grpc.aio.EOF
            assert await stream.code() == grpc.StatusCode.OK
    finally:
        assert proc.stop() == 0
    assert not sock.exists()
    done = svidgate(
        "signer", "sign", "--config", str(config), "--subject", CLIENT_ID, "--audience", "o"
    )
    assert done.returncode == 2
    assert done.stderr == f"svidgate: error: the signer is not running (no socket at {sock})\n"


def test_config_errors_are_one_line(short_dir: Path) -> None:
    config = short_dir / "signer.yaml"
    data = deep_merge(
        base_config(short_dir / "s.sock", short_dir / "keys"),
        {"rotation": {"prepare_ahead": "5s", "poll_interval": "10s"}},
    )
    config.write_text(yaml.safe_dump(data))
    done = svidgate("signer", "serve", "--config", str(config))
    assert done.returncode == 2
    assert done.stderr == (
        f"svidgate: error: {config}: rotation.prepare_ahead: must be >= rotation.poll_interval "
        "(10s) so every replica sees a key before it signs (got 5s)\n"
    )
    done = svidgate("signer", "serve", "--config", str(short_dir / "missing.yaml"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "cannot read" in done.stderr
    done = svidgate(
        "signer", "sign", "--config", str(config), "--subject", CLIENT_ID, "--audience", "a",
        "--ttl", "soon",
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1


async def test_cli_falls_back_to_mtls_tcp(pki: Pki, short_dir: Path) -> None:
    """Without a Unix socket the CLI dials TCP with the config's own SVID as client cert."""
    crt, key = pki.files("signer")
    data = deep_merge(
        base_config(short_dir / "unused.sock", short_dir / "keys"),
        {
            "listen": {"unix": None, "tcp": f"127.0.0.1:{free_port()}"},
            "tls": {"cert": str(crt), "key": str(key), "bundle": str(pki.dir / "bundle.pem")},
            "authorization": {"sign": [f"spiffe://{TD}/ns/**", SIGNER_ID]},
        },
    )
    config = short_dir / "signer.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config)
    async with running_signer(cfg):
        # the signer's own identity may mint only for itself, and may not rotate
        done = await asyncio.to_thread(
            svidgate, "signer", "sign", "--config", str(config), "--subject", SIGNER_ID,
            "--audience", "ops",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert done.stdout.count(".") == 2
        done = await asyncio.to_thread(
            svidgate, "signer", "sign", "--config", str(config), "--subject", CLIENT_ID,
            "--audience", "ops",
        )  # fmt: skip
        assert done.returncode == 2
        assert "permission_denied" in done.stderr
        done = await asyncio.to_thread(svidgate, "signer", "rotate", "--config", str(config))
        assert done.returncode == 2
        assert "Rotate failed: permission_denied" in done.stderr


def _check(config: Path, data: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    config.write_text(yaml.safe_dump(data))
    return svidgate("signer", "check", "--config", str(config))


def test_check_prints_key_source_and_rotation_plan(tmp_path: Path) -> None:
    config = tmp_path / "signer.yaml"
    data = base_config(Path("run/signer.sock"), Path("keys"))  # keys/ does not exist
    data["listen"]["tcp"] = "[::1]:7443"
    data["tls"] = {"cert": "absent.crt", "key": "absent.key", "bundle": "absent.pem"}
    data["rotation"]["retain_retired"] = "1h"
    done = _check(config, data)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        f"config:    {config} OK",
        f"issuer:    spiffe://{TD}/signer (trust domain {TD})",
        f"listen:    unix {tmp_path}/run/signer.sock (mode 0600); tcp [::1]:7443 (mTLS)",
        f"keys:      file {tmp_path}/keys, algorithm ES256",
        "rotation:  period 24h, prepare_ahead 10m, poll_interval 10s",
        "retention: retain_retired 1h (at least max_ttl 15m + clock_skew 30s + poll_interval "
        "10s = 15m40s)",
        "tokens:    default_ttl 5m, max_ttl 15m, clock_skew 30s",
    ]


def test_check_contacts_no_vault(tmp_path: Path) -> None:
    """keys.vault.address points at a listener that must never see a connection, then at a
    closed port: check still exits 0 and reads neither the token file nor any key."""
    config = tmp_path / "signer.yaml"
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    data = base_config(Path("run/signer.sock"), Path("keys"))
    data["keys"] = {
        "source": "vault-transit",
        "algorithm": "EdDSA",
        "vault": {
            "address": f"http://127.0.0.1:{port}",
            "namespace": "team-a",
            "auth": {"method": "token", "token_file": "no-such-token"},
        },
    }
    try:
        done = _check(config, data)
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    assert done.returncode == 0, done.stderr
    assert (
        f"keys:      vault-transit at http://127.0.0.1:{port}, namespace team-a, transit "
        "transit/svidgate-jwt (auth token), algorithm EdDSA"
    ) in done.stdout.splitlines()
    data["keys"]["source"] = "vault-kv"  # the port is closed now
    done = _check(config, data)
    assert done.returncode == 0, done.stderr
    assert f"vault-kv at http://127.0.0.1:{port}, namespace team-a, kv secret/" in done.stdout


def test_check_bad_field_is_one_line_exit_2(tmp_path: Path) -> None:
    config = tmp_path / "signer.yaml"
    data = base_config(Path("run/signer.sock"), Path("keys"))
    data["listen"]["tcp"] = "::1:7443"
    data["tokens"]["max_ttl"] = "forever"
    done = _check(config, data)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"svidgate: error: {config}: ")
    assert "listen.tcp: " in lines[0]
    assert "tokens.max_ttl: 'forever' is not a duration" in lines[0]


def test_check_refuses_an_unsafe_rotation(tmp_path: Path) -> None:
    config = tmp_path / "signer.yaml"
    data = deep_merge(
        base_config(Path("run/signer.sock"), Path("keys")),
        {"rotation": {"retain_retired": "10m"}},
    )
    done = _check(config, data)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"svidgate: error: {config}: rotation.retain_retired: must be >= tokens.max_ttl + "
        "tokens.clock_skew + rotation.poll_interval (15m + 30s + 10s = 15m40s), got 10m\n"
    )
