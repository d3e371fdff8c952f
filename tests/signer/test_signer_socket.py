"""Socket and service hygiene (issue 10, item 6), against real ``svidgate signer serve``
processes.

The red team swapped a symlink in between ``bind`` and ``chmod`` (a victim file went from 0600 to
the socket's mode), and found that a world-writable socket directory and ``unix_mode: 0666``
were accepted silently although every Unix caller may sign and rotate, and that any
certificate of the trust domain could use reflection and health over TCP.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from signer_harness import Pki, SignerProcess, base_config, deep_merge, rpc_error
from support.ports import free_port
from support.waiting import wait_until

Spawn = Callable[..., SignerProcess]


def write_yaml(directory: Path, data: dict[str, Any]) -> Path:
    path = directory / f"signer-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def svidgate(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "svidgate.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def serve_refused(config: Path) -> str:
    """``signer serve`` must exit 2 with exactly one stderr line; that line."""
    result = svidgate("signer", "serve", "--config", str(config))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- the socket file ---------------------------------------------------------------------------

ATTACKER = r"""
import os, stat, sys, time
path, victim, deadline = sys.argv[1], sys.argv[2], time.monotonic() + float(sys.argv[3])
link = path + ".swap"
while time.monotonic() < deadline:
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.symlink(victim, link)
            os.rename(link, path)   # the socket's name now points at the victim
            print("swapped", flush=True)
            break
    except FileNotFoundError:
        pass
"""


def test_a_symlink_swapped_in_after_bind_never_changes_the_victim(
    short_dir: Path, signer_process: Spawn
) -> None:
    """An attacker that can write to the socket directory replaces the socket with a symlink to
    a victim file the moment the socket appears: the signer's chmod must not follow it."""
    sock = short_dir / "run" / "s.sock"
    sock.parent.mkdir()
    victim = short_dir / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    data = deep_merge(base_config(sock, short_dir / "keys"), {"listen": {"unix_mode": "0660"}})
    proc = signer_process(write_yaml(short_dir, data), socket=sock)
    attacker = subprocess.Popen(
        [sys.executable, "-c", ATTACKER, str(sock), str(victim), "20"], stdout=subprocess.PIPE
    )
    try:
        time.sleep(0.2)  # the attacker is watching
        log_before = proc.log.read_text() if proc.log.exists() else ""
        assert log_before == ""
        with proc.log.open("ab") as out:
            proc.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "svidgate.cli",
                    "signer",
                    "serve",
                    "--config",
                    str(proc.config),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == b"swapped"
        wait_until(lambda: "signer listening" in proc.log_tail(), 20, "the signer to start")
    finally:
        attacker.kill()
        attacker.wait()
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert victim.read_text() == "secret"
    assert proc.stop() == 0
    # the signer removes only its own socket: the attacker's link stays, the victim too
    assert sock.is_symlink() and victim.exists()


def test_a_planted_symlink_is_refused_and_the_victim_untouched(short_dir: Path) -> None:
    sock = short_dir / "s.sock"
    victim = short_dir / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    sock.symlink_to(victim)
    data = deep_merge(base_config(sock, short_dir / "keys"), {"listen": {"unix_mode": "0660"}})
    line = serve_refused(write_yaml(short_dir, data))
    assert line == f"svidgate: error: listen.unix: {sock} exists and is not a socket"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600 and sock.is_symlink()


# -- the socket directory ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o2777])
def test_a_socket_directory_others_can_write_is_refused(short_dir: Path, mode: int) -> None:
    directory = short_dir / "shared"
    directory.mkdir()
    directory.chmod(mode)
    sock = directory / "s.sock"
    line = serve_refused(write_yaml(short_dir, base_config(sock, short_dir / "keys")))
    assert line.startswith(f"svidgate: error: listen.unix: {directory} is writable by other users")
    assert f"(mode {mode:04o})" in line and "listen.unix_shared_dir" in line
    assert list(directory.iterdir()) == []  # nothing was bound there


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the directory away")
def test_a_socket_directory_owned_by_another_user_is_refused(short_dir: Path) -> None:
    directory = short_dir / "theirs"
    directory.mkdir(mode=0o755)
    os.chown(directory, 4242, 4242)
    sock = directory / "s.sock"
    line = serve_refused(write_yaml(short_dir, base_config(sock, short_dir / "keys")))
    assert line.startswith(f"svidgate: error: listen.unix: {directory} belongs to uid 4242")


@pytest.mark.parametrize(("mode", "shared"), [(0o1777, False), (0o777, True)])
def test_sticky_or_declared_shared_directories_are_accepted(
    short_dir: Path, signer_process: Spawn, mode: int, shared: bool
) -> None:
    """Sticky (like /tmp): only the owner may remove or rename the socket. Declared shared
    (listen.unix_shared_dir, for a Kubernetes emptyDir): the operator accepts the risk."""
    directory = short_dir / "shared"
    directory.mkdir()
    directory.chmod(mode)
    sock = directory / "s.sock"
    data = deep_merge(
        base_config(sock, short_dir / "keys"), {"listen": {"unix_shared_dir": shared}}
    )
    proc = signer_process(write_yaml(short_dir, data))
    proc.start_sync()
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir()] == ["s.sock"]  # no staging directory left
    assert proc.stop() == 0
    assert not sock.exists()


# -- unix_mode -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["0666", "0606", "0604", "0601", "0400", "0200"])
def test_unix_modes_for_other_users_are_config_errors(short_dir: Path, mode: str) -> None:
    data = deep_merge(
        base_config(short_dir / "s.sock", short_dir / "keys"), {"listen": {"unix_mode": mode}}
    )
    config = write_yaml(short_dir, data)
    for command in ("check", "serve"):
        result = svidgate("signer", command, "--config", str(config))
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1
        assert "listen.unix_mode: must give the owner read/write and nothing to other" in (
            result.stderr
        ), result.stderr
        assert f"(got {int(mode, 8):04o})" in result.stderr


@pytest.mark.parametrize("mode", ["0600", "0660", "0620", "0700"])
def test_owner_and_group_modes_are_accepted(short_dir: Path, mode: str) -> None:
    data = deep_merge(
        base_config(short_dir / "s.sock", short_dir / "keys"), {"listen": {"unix_mode": mode}}
    )
    result = svidgate("signer", "check", "--config", str(write_yaml(short_dir, data)))
    assert result.returncode == 0, result.stderr
    assert f"(mode {int(mode, 8):04o})" in result.stdout


# -- reflection and health over TCP -------------------------------------------------------------


async def reflected_services(channel: grpc.aio.Channel) -> set[str]:
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    return {service.name for service in reply.list_services_response.service}


async def test_reflection_and_health_over_tcp_need_an_authorized_caller(
    pki: Pki, short_dir: Path, signer_process: Spawn
) -> None:
    port = free_port()
    crt, key = pki.files("signer")
    data = deep_merge(
        base_config(short_dir / "s.sock", short_dir / "keys"),
        {
            "listen": {"tcp": f"127.0.0.1:{port}"},
            "tls": {"cert": str(crt), "key": str(key), "bundle": str(pki.bundle())},
        },
    )
    proc = signer_process(write_yaml(short_dir, data))
    await proc.start()
    options = [("grpc.ssl_target_name_override", "localhost")]
    check = health_pb2.HealthCheckRequest(service="svidgate.signer.v1.Signer")

    def channel(name: str) -> grpc.aio.Channel:
        creds = pki.client_credentials(name)
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds, options=options)

    async with channel("stranger") as stranger:
        err = await rpc_error(reflected_services(stranger))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == (
            "permission_denied: spiffe://example.org/stranger may not call ServerReflection"
        )
        err = await rpc_error(health_pb2_grpc.HealthStub(stranger).Check(check))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    # verify (the gateway), sign (a workload) and rotate (an admin) callers are admitted
    for name in ("gateway", "client", "admin"):
        async with channel(name) as known:
            assert "svidgate.signer.v1.Signer" in await reflected_services(known), name
            reply = await health_pb2_grpc.HealthStub(known).Check(check)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # Unix callers: unchanged
    async with grpc.aio.insecure_channel(f"unix:{short_dir / 's.sock'}") as local:
        assert "grpc.health.v1.Health" in await reflected_services(local)
