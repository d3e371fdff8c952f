"""The Vault client's rules (docs/operations.md, "The Vault client's rules"), each against real
processes: the real OpenBao fixture for behaviour, `svidgate signer check|serve` as child
processes, and — for transport faults only, which a real Vault cannot be made to produce —
:class:`FakeVault`, a raw HTTP server written here that records every request and can relay to
OpenBao, drip-feed its answer, redirect, answer slowly or refuse.

Rules: plaintext only to loopback unless allowed; no redirect followed (the token never reaches
another origin); no proxy from the environment (only ``keys.vault.proxy``); no token from the
environment or ``~/.vault-token``, and with AppRole no request before the login; owner-only
credential files; an overall deadline per call that cuts a drip-feeding server, turns the
KeySource health NOT_SERVING and never holds up SIGTERM; a Transit signing flood cannot delay
Rotate; the token is renewed and, at its max TTL, replaced by a fresh login without help.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import os
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
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
from svidgate.pki.bundle import marshal_pem
from svidgate.pki.ca import CertificateAuthority
from svidgate.signer.config import VaultConfig, parse_config
from svidgate.signer.errors import KeySourceError, SourceUnavailableError
from svidgate.signer.sources.vault_kv import VaultKvKeySource
from svidgate.signer.vault import VaultClient, renewal_is_full, token_remaining

from svidgate.config import ConfigError

KEY_SOURCE = "svidgate.signer.v1.Signer.KeySource"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
DRIP_GAP = 1.5  # seconds between two bytes of a drip-fed answer (under a 2 s read timeout)


# -- a recording HTTP server for transport faults ---------------------------------------------


@dataclass
class Seen:
    """One request as it arrived: method, target, headers (lower-case names)."""

    method: str
    target: str
    headers: dict[str, str]
    arrived: float = field(default_factory=time.monotonic)
    cut_at: float | None = None  # drip mode: when the client closed the connection

    @property
    def token(self) -> str | None:
        return self.headers.get("x-vault-token")


class FakeVault:
    """A raw HTTP/1.1 server on 127.0.0.1 (a thread per connection) that records every request.
    ``mode``: ``relay`` (to ``upstream``, a real OpenBao; targets containing a key of ``slow``
    wait that many seconds first), ``drip`` (a 200 answer one byte every DRIP_GAP seconds),
    ``redirect`` (307 to ``redirect_to`` + the same target) or ``refuse`` (502)."""

    def __init__(self, upstream: str | None = None, tls: ssl.SSLContext | None = None) -> None:
        self.upstream = upstream
        self.tls = tls
        self.mode = "relay" if upstream else "refuse"
        self.redirect_to = ""
        self.slow: dict[str, float] = {}
        self.requests: list[Seen] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self.address = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._server.close()
        with self._lock:
            for conn in self._open:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def seen(self) -> list[Seen]:
        with self._lock:
            return list(self.requests)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._open.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if self.tls is not None:
            try:
                conn = self.tls.wrap_socket(conn, server_side=True)
            except OSError:
                return
        with conn, conn.makefile("rb") as reader:
            while (request := self._read(reader)) is not None:
                seen, body = request
                with self._lock:
                    self.requests.append(seen)
                if not self._answer(conn, seen, body):
                    return

    @staticmethod
    def _read(reader: Any) -> tuple[Seen, bytes] | None:
        try:
            line = reader.readline().decode("latin-1")
            if not line.strip():
                return None
            method, target, _ = line.split(" ", 2)
            headers: dict[str, str] = {}
            while (header := reader.readline().decode("latin-1").strip()) != "":
                name, _, value = header.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = reader.read(int(headers.get("content-length", "0")))
        except (OSError, ValueError):
            return None
        return Seen(method, target, headers), body

    def _answer(self, conn: socket.socket, seen: Seen, body: bytes) -> bool:
        """Answer one request; False when the connection is done."""
        mode = self.mode
        try:
            if seen.method == "CONNECT" or mode == "refuse":
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                return seen.method != "CONNECT"
            if mode == "drip":
                self._drip(conn, seen)
                return False
            if mode == "redirect":
                location = f"{self.redirect_to}{seen.target}"
                conn.sendall(
                    f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\n"
                    "Content-Length: 0\r\n\r\n".encode()
                )
                return True
            for part, delay in self.slow.items():
                if part in seen.target:
                    time.sleep(delay)
            status, reason, data = self._relay(seen, body)
            conn.sendall(
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
        except OSError:
            return False
        return True

    def _relay(self, seen: Seen, body: bytes) -> tuple[int, str, bytes]:
        assert self.upstream is not None
        host, port = self.upstream.removeprefix("http://").split(":")
        upstream = http.client.HTTPConnection(host, int(port), timeout=10)
        skip = {"host", "connection", "content-length", "keep-alive"}
        headers = {k: v for k, v in seen.headers.items() if k not in skip}
        try:
            upstream.request(seen.method, seen.target, body=body or None, headers=headers)
            response = upstream.getresponse()
            return response.status, response.reason, response.read()
        finally:
            upstream.close()

    @staticmethod
    def _drip(conn: socket.socket, seen: Seen) -> None:
        payload = b'{"data": {"padding": "' + b"x" * 300 + b'"}}'
        answer = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        for byte in answer:
            try:
                conn.sendall(bytes([byte]))
                readable, _, _ = select.select([conn], [], [], DRIP_GAP)
                closed = bool(readable) and conn.recv(1) == b""
            except OSError:  # TLS: the peer's shutdown shows as an error
                closed = True
            if closed:
                seen.cut_at = time.monotonic()
                return


@pytest.fixture
def fake_vaults() -> Iterator[Callable[..., FakeVault]]:
    made: list[FakeVault] = []

    def make(upstream: str | None = None, tls: ssl.SSLContext | None = None) -> FakeVault:
        made.append(FakeVault(upstream, tls))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


# -- helpers ----------------------------------------------------------------------------------


def owner_only(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any Vault or proxy variable, plus ``extra``."""
    drop = {"VAULT_TOKEN", "VAULT_ADDR", "NO_PROXY", "no_proxy"}
    env = {k: v for k, v in os.environ.items() if k not in drop and "PROXY" not in k.upper()}
    return {**env, **extra}


def signer_yaml(directory: Path, keys: dict[str, Any], **extra: Any) -> Path:
    sock = directory / "s.sock"
    data = deep_merge(base_config(sock, directory), {"keys": keys, **extra})
    path = directory / f"signer-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def signer_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "signer", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def health(sock: Path, service: str) -> int:
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=2)
    return int(reply.status)


def vault_cfg(address: str, token_file: Path, **extra: Any) -> VaultConfig:
    data = {"address": address, "auth": {"method": "token", "token_file": str(token_file)}}
    return VaultConfig.model_validate({**data, **extra})


# -- plaintext ------------------------------------------------------------------------------


def test_plaintext_to_a_host_that_is_not_loopback_is_a_config_error(short_dir: Path) -> None:
    token = owner_only(short_dir / "vault-token", "unused")
    keys = {
        "source": "vault-kv",
        "vault": {
            "address": "http://192.0.2.1:8200",  # TEST-NET-1: nothing is contacted
            "auth": {"method": "token", "token_file": str(token)},
        },
    }
    config = signer_yaml(short_dir, keys)
    for command in ("check", "serve"):
        done = signer_cli(command, "--config", str(config))
        assert done.returncode == 2, done.stderr
        assert "keys.vault.address: http://192.0.2.1:8200 would send the Vault token in clear" in (
            done.stderr
        )
        assert len(done.stderr.strip().splitlines()) == 1
    keys["vault"]["allow_plaintext"] = True
    assert signer_cli("check", "--config", str(signer_yaml(short_dir, keys))).returncode == 0


@pytest.mark.parametrize(
    "address",
    [
        "http://127.0.0.1:8200",
        "http://127.3.4.5:8200",
        "http://localhost:8200",
        "http://[::1]:8200",
        "https://192.0.2.1:8200",
    ],
)
def test_https_or_loopback_needs_no_permission(address: str) -> None:
    data = {
        "trust_domain": "example.org",
        "issuer": "spiffe://example.org/signer",
        "listen": {"unix": "s.sock"},
        "keys": {"source": "vault-kv", "vault": {"address": address, "auth": {"token_file": "t"}}},
    }
    cfg = parse_config(data, base_dir=Path("/nonexistent"))
    assert cfg.keys.vault is not None and cfg.keys.vault.address == address


@pytest.mark.parametrize(
    ("vault", "message"),
    [
        (
            {"address": "http://127.0.0.1:8200", "proxy": "http://192.0.2.7:3128"},
            "keys.vault.proxy: the Vault token would cross the proxy in clear",
        ),
        ({"address": "ftp://vault:21"}, "keys.vault.address: 'ftp://vault:21': expected an"),
        ({"address": "https://vault", "proxy": "vault:3128"}, "keys.vault.proxy: 'vault:3128'"),
        ({"address": "https://vault", "timeout": "0s"}, "keys.vault.timeout: must be > 0"),
        (
            {"address": "https://vault", "auth": {"method": "token"}},
            "keys.vault.auth.token_file: is required for method token (no token is taken",
        ),
    ],
)
def test_vault_rules_name_the_field(vault: dict[str, Any], message: str) -> None:
    data = {
        "trust_domain": "example.org",
        "issuer": "spiffe://example.org/signer",
        "listen": {"unix": "s.sock"},
        "keys": {"source": "vault-kv", "vault": {"auth": {"token_file": "t"}, **vault}},
    }
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config(data, base_dir=Path("/nonexistent"))


# -- redirects and proxies ------------------------------------------------------------------


async def test_a_redirect_is_an_error_and_the_token_stays_home(
    bao: BaoServer, short_dir: Path, fake_vaults: Callable[..., FakeVault]
) -> None:
    elsewhere = fake_vaults(bao.address)  # another origin, which would even answer
    vault = fake_vaults()
    vault.mode, vault.redirect_to = "redirect", elsewhere.address
    token = bao.signer_token()
    client = VaultClient(vault_cfg(vault.address, owner_only(short_dir / "t", token)))
    source = VaultKvKeySource(client, "ES256")
    try:
        with pytest.raises(KeySourceError, match=r"redirect \(HTTP 307\); redirects are never"):
            await source.load()
    finally:
        await source.close()
    assert elsewhere.seen() == []  # nothing, let alone the token, reached the other origin
    assert [s.token for s in vault.seen()] == [token]  # one request, to the configured origin


async def test_environment_proxies_are_ignored(
    bao: BaoServer,
    short_dir: Path,
    fake_vaults: Callable[..., FakeVault],
    signer_process: Callable[..., SignerProcess],
) -> None:
    proxy = fake_vaults()  # refuses and records whatever reaches it
    token = owner_only(short_dir / "vault-token", bao.signer_token())
    config = signer_yaml(short_dir, vault_keys(bao, "vault-kv", "ES256", token))
    names = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")
    env = clean_env(**dict.fromkeys(names, proxy.address))
    signer = signer_process(config, env=env)
    await signer.start()  # it reached OpenBao directly: it signs
    async with unix_stub(short_dir / "s.sock") as stub:
        await stub.Rotate(signer_pb2.RotateRequest())
    assert proxy.seen() == []


async def test_the_configured_proxy_tunnels_and_never_sees_the_token(
    short_dir: Path, fake_vaults: Callable[..., FakeVault]
) -> None:
    proxy = fake_vaults()
    cfg = vault_cfg(
        "https://127.0.0.1:9", owner_only(short_dir / "t", "tok-123"), proxy=proxy.address
    )
    client = VaultClient(cfg)
    try:
        with pytest.raises(SourceUnavailableError):
            await client.kv_metadata()
    finally:
        client.close()
    seen = proxy.seen()
    assert [(s.method, s.target) for s in seen] == [("CONNECT", "127.0.0.1:9")]
    assert all("tok-123" not in str(s.headers) for s in seen)


# -- where the token comes from ---------------------------------------------------------------


async def test_approle_never_uses_a_token_from_the_environment(
    bao: BaoServer,
    short_dir: Path,
    fake_vaults: Callable[..., FakeVault],
    signer_process: Callable[..., SignerProcess],
) -> None:
    role_id, secret_id = bao.approle("signer-no-leak")
    owner_only(short_dir / "secret-id", secret_id)
    home = short_dir / "home"
    home.mkdir()
    leaks = {f"leak-env-{uuid.uuid4().hex}", f"leak-home-{uuid.uuid4().hex}"}
    env_leak, home_leak = sorted(leaks)
    owner_only(home / ".vault-token", home_leak)
    vault = fake_vaults(bao.address)
    auth = {"method": "approle", "role_id": role_id, "secret_id_file": "secret-id"}
    keys = vault_keys(bao, "vault-kv", "ES256", short_dir / "unused", **auth)
    keys["vault"]["address"] = vault.address
    config = signer_yaml(short_dir, keys)
    signer = signer_process(config, env=clean_env(VAULT_TOKEN=env_leak, HOME=str(home)))
    await signer.start()  # bootstrapped a key in Vault and signs
    seen = vault.seen()
    assert seen[0].method in ("POST", "PUT") and seen[0].target == "/v1/auth/approle/login"
    assert seen[0].token is None
    assert not any(s.token in leaks for s in seen)
    assert all(s.token for s in seen[1:])  # everything after the login carries its token


@pytest.mark.parametrize(
    ("auth_key", "mode", "wording"),
    [("token_file", 0o644, "readable"), ("secret_id_file", 0o640, "readable")],
)
def test_credential_files_readable_by_others_are_refused(
    short_dir: Path, auth_key: str, mode: int, wording: str
) -> None:
    secret = short_dir / "credential"
    secret.write_text("s.abc\n")
    secret.chmod(mode)
    auth = {"method": "token", "token_file": str(secret)}
    if auth_key == "secret_id_file":
        auth = {"method": "approle", "role_id": "r", "secret_id_file": str(secret)}
    keys = {"source": "vault-kv", "vault": {"address": "http://127.0.0.1:1", "auth": auth}}
    config = signer_yaml(short_dir, keys)
    expected = (
        f"keys.vault.auth.{auth_key}: {secret} is mode {mode:04o}; must not be {wording} by "
        "group or others (chmod 600)"
    )
    for command in ("check", "serve"):
        done = signer_cli(command, "--config", str(config))
        assert (done.returncode, done.stderr.count("\n")) == (2, 1), done.stderr
        assert expected in done.stderr
    secret.chmod(0o600)
    assert signer_cli("check", "--config", str(config)).returncode == 0


def test_a_projected_service_account_token_may_be_world_readable(short_dir: Path) -> None:
    jwt = short_dir / "sa-token"
    jwt.write_text("eyJ.x.y\n")
    jwt.chmod(0o644)  # how Kubernetes projects it by default
    auth = {"method": "kubernetes", "role": "signer", "jwt_file": str(jwt)}
    keys = {"source": "vault-kv", "vault": {"address": "http://127.0.0.1:1", "auth": auth}}
    assert signer_cli("check", "--config", str(signer_yaml(short_dir, keys))).returncode == 0


async def test_a_token_file_opened_up_after_start_is_refused_at_login(
    bao: BaoServer, short_dir: Path
) -> None:
    token = owner_only(short_dir / "vault-token", bao.signer_token())
    client = VaultClient(vault_cfg(bao.address, token))
    try:
        await client.token_info()
        token.chmod(0o604)
        with pytest.raises(KeySourceError, match=r"is mode 0604; must not be readable by group"):
            await client.login()
    finally:
        client.close()


# -- deadlines, health and shutdown -----------------------------------------------------------


async def test_a_drip_feeding_vault_is_cut_at_the_deadline_and_never_holds_up_sigterm(
    bao: BaoServer,
    short_dir: Path,
    fake_vaults: Callable[..., FakeVault],
    signer_process: Callable[..., SignerProcess],
) -> None:
    vault = fake_vaults(bao.address)
    token = owner_only(short_dir / "vault-token", bao.signer_token())
    keys = vault_keys(bao, "vault-kv", "ES256", token)
    keys["vault"].update(address=vault.address, timeout="2s")
    # prepare_ahead >= poll_interval + clock_skew + keys.vault.timeout (the start-up safety rule)
    timing = {
        "rotation": {"period": "1h", "prepare_ahead": "3s", "poll_interval": "500ms"},
        "tokens": {"default_ttl": "5m", "max_ttl": "15m", "clock_skew": "500ms"},
    }
    sock = short_dir / "s.sock"
    signer = signer_process(signer_yaml(short_dir, keys, **timing), env=clean_env())
    await signer.start()
    await wait_for(lambda: health(sock, KEY_SOURCE) == SERVING, 5, "KeySource SERVING")

    vault.mode = "drip"  # every answer from now on: one byte every 1.5 s
    started = time.monotonic()

    def drips() -> list[Seen]:
        return [s for s in vault.seen() if s.arrived >= started]

    await wait_for(lambda: any(s.cut_at for s in drips()), 8, "a drip-fed call to be cut")
    first = next(s for s in drips() if s.cut_at)
    assert first.cut_at is not None and first.cut_at - first.arrived <= 2.0 + 1.0
    await wait_for(lambda: health(sock, KEY_SOURCE) == NOT_SERVING, 3, "KeySource NOT_SERVING")
    assert "overran its deadline (2s): connection cut" in signer.log_tail(20000)

    # SIGTERM while a call hangs in the drip
    await wait_for(lambda: any(not s.cut_at for s in drips()[1:]), 5, "a call hanging")
    stopping = time.monotonic()
    code = await asyncio.to_thread(signer.stop, 20)
    assert code == 0 and time.monotonic() - stopping < 4.0, signer.log_tail()


async def test_over_tls_calls_work_and_a_drip_is_cut_as_well(
    bao: BaoServer, short_dir: Path, fake_vaults: Callable[..., FakeVault]
) -> None:
    ca = CertificateAuthority.create("vault.test")
    cert, key = ca.issue("spiffe://vault.test/openbao", ips=["127.0.0.1"]).write(short_dir / "v")
    ca_file = short_dir / "vault-ca.pem"
    ca_file.write_bytes(marshal_pem(ca.bundle()))
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    vault = fake_vaults(bao.address, tls)
    token = owner_only(short_dir / "t", bao.signer_token())
    cfg = vault_cfg(vault.address, token, ca_cert=str(ca_file), timeout="2s")
    client = VaultClient(cfg)
    try:
        assert (await client.token_info())["policies"] == ["svidgate-signer"]
        vault.mode = "drip"
        began = time.monotonic()
        with pytest.raises(SourceUnavailableError, match="did not answer token lookup within 2s"):
            await client.token_info()
        assert time.monotonic() - began < 2.0 + 1.0
        await wait_for(lambda: vault.seen()[-1].cut_at is not None, 2, "the TLS socket cut")
    finally:
        client.close()


async def test_a_transit_signing_flood_does_not_delay_rotate(
    bao: BaoServer,
    short_dir: Path,
    fake_vaults: Callable[..., FakeVault],
    signer_process: Callable[..., SignerProcess],
) -> None:
    vault = fake_vaults(bao.address)
    token = owner_only(short_dir / "vault-token", bao.signer_token())
    keys = vault_keys(bao, "vault-transit", "ES256", token)
    keys["vault"].update(address=vault.address, timeout="2s")
    sock = short_dir / "s.sock"
    signer = signer_process(signer_yaml(short_dir, keys), env=clean_env())
    await signer.start()
    vault.slow["/transit/sign/"] = 1.5  # every signature takes Vault 1.5 s from now on

    async with unix_stub(sock) as stub:
        request = signer_pb2.SignRequest(subject=CLIENT_ID, audience=["a"])
        flooding = True

        async def flood() -> None:
            while flooding:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await stub.Sign(request, timeout=5)

        tasks = [asyncio.create_task(flood()) for _ in range(32)]  # more than any thread pool
        try:
            await wait_for(
                lambda: sum("/transit/sign/" in s.target for s in vault.seen()) >= 4, 5, "flood"
            )
            began = time.monotonic()
            rotated = await stub.Rotate(signer_pb2.RotateRequest(), timeout=10)
            took = time.monotonic() - began
        finally:
            flooding = False
            await asyncio.gather(*tasks)
    assert rotated.prepared_kid and took < 1.0, f"Rotate took {took:.2f}s under the flood"


# -- token renewal ----------------------------------------------------------------------------


def test_less_than_a_second_left_is_not_no_expiry() -> None:
    """The bug behind the test below: ``ttl: 0`` was read as "never expires"."""
    assert token_remaining({"ttl": 0, "expire_time": "2026-12-02T07:24:51.13Z"}) == 0.0
    assert token_remaining({"ttl": 0, "expire_time": None}) is None  # a root token
    assert token_remaining({"ttl": 7, "expire_time": "2026-12-02T07:24:51Z"}) == 7.0
    info = {"creation_ttl": 2}
    assert renewal_is_full(2, info) and not renewal_is_full(1, info)
    assert not renewal_is_full(0, {"creation_ttl": 0})  # a failed renewal


async def test_the_token_is_replaced_at_its_max_ttl_without_help(
    bao: BaoServer, short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """TTL 2 s, max TTL 5 s: renewals stop extending near 5 s, so the client logs in again by
    itself — with nobody calling it (no 403 to notice)."""
    role_id, secret_id = bao.approle("signer-relogin", token_ttl="2s", token_max_ttl="5s")
    secret = owner_only(short_dir / "secret-id", secret_id)
    auth = {"method": "approle", "role_id": role_id, "secret_id_file": str(secret)}
    client = VaultClient(VaultConfig.model_validate({"address": bao.address, "auth": auth}))
    caplog.set_level(logging.INFO, logger="svidgate.signer.vault")
    task = asyncio.create_task(client.renew_forever(retry_after=0.2))
    try:
        await wait_for(lambda: client.logins >= 2, 8, "a second login", interval=0.1)
        assert client.renewals >= 2
        assert "vault token cannot be renewed further: logging in again" in caplog.text
        info = await client.token_info()
        assert info["policies"] == ["svidgate-signer"] and info["ttl"] >= 1
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        client.close()
