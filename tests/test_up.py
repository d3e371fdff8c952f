"""`svidgate up` end to end: start it as a subprocess, run the curl commands it prints (with
curl, and again with Python's ssl), expect 200 / 200 / 403, then SIGINT (SIGTERM with OpenBao)
and check that every child is gone. Plus the state directory's reuse / re-issue rules and a
child that dies early."""

from __future__ import annotations

import contextlib
import http.client
import os
import queue
import re
import shlex
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from support.ports import accepts_connections as port_open
from support.waiting import wait_until

from svidgate.devstack import IDENTITIES, SVID_TTL, Layout, prepare_pki, signer_policy_hcl

READY_LINE = "Ctrl-C stops everything."
EXPECTED = [200, 200, 403]


class UpProcess:
    """`svidgate up` in its own session, its stdout read line by line on a thread."""

    def __init__(self, state: Path, *args: str) -> None:
        self.state = state
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "svidgate.cli", "up", "--state-dir", str(state), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_ready(self, timeout: float = 90) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if line is None:
                break
            self.output.append(line)
            if line == READY_LINE:
                return self.output
        self.kill()
        stderr = self.proc.stderr.read() if self.proc.stderr else ""
        raise AssertionError(f"svidgate up did not get ready:\n{self.output}\n{stderr}")

    def interrupt(self, sig: int = signal.SIGINT, timeout: float = 40) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with_suppress_kill(self.proc.pid)
            self.proc.wait(10)


def with_suppress_kill(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def curl_commands(output: list[str]) -> list[str]:
    return [line for line in output if line.startswith("curl ")]


def ports_of(output: list[str]) -> list[int]:
    text = "\n".join(output)
    return [int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)]


def run_with_curl(command: str) -> int:
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    match = re.match(r"HTTP/[\d.]+ (\d{3})", done.stdout)
    assert match, done.stdout[:500]
    return int(match.group(1))


def run_with_python(command: str) -> int:
    """Replay a printed curl command with Python's ssl (evaluating a ``$(…)`` header)."""
    argv = shlex.split(command)
    assert argv[0] == "curl"
    opts: dict[str, str] = {}
    headers: dict[str, str] = {}
    url = ""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg in ("--cert", "--key", "--cacert"):
            opts[arg] = argv[i + 1]
            i += 2
            continue
        if arg == "-H":
            name, _, value = argv[i + 1].partition(": ")
            sub = re.search(r"\$\((.*)\)", value)
            if sub:
                minted = subprocess.run(
                    shlex.split(sub.group(1)),
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert minted.returncode == 0, minted.stderr
                value = value[: sub.start()] + minted.stdout.strip() + value[sub.end() :]
            headers[name] = value
            i += 2
            continue
        if arg.startswith("https://"):
            url = arg
        i += 1
    ctx = ssl.create_default_context(cafile=opts["--cacert"])
    ctx.load_cert_chain(opts["--cert"], opts["--key"])
    hostport, _, path = url.removeprefix("https://").partition("/")
    host, _, port = hostport.rpartition(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        conn.request("GET", "/" + path, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def check_stack(tmp_path: Path, *args: str, stop_with: int = signal.SIGINT) -> list[str]:
    state = tmp_path / "state"
    up = UpProcess(state, *args)
    try:
        output = up.wait_ready()
        commands = curl_commands(output)
        assert len(commands) == 3, output
        assert "Authorization: Bearer $(" in commands[0]
        if shutil.which("curl"):
            assert [run_with_curl(c) for c in commands] == EXPECTED
        assert [run_with_python(c) for c in commands] == EXPECTED
        ports = ports_of(output)
        assert ports and all(port_open(p) for p in ports)
        assert up.interrupt(stop_with) == 0
    finally:
        up.kill()
    # every child is gone: nothing mentions the state dir, no printed port still listens
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not processes_mentioning(str(state)), 10, "the children to exit", 0.1)
    assert processes_mentioning(str(state)) == []
    assert [p for p in ports if port_open(p)] == []
    return output


@pytest.mark.timeout(240)
def test_up_without_vault(tmp_path: Path) -> None:
    output = check_stack(tmp_path, "--no-vault")
    assert any("(keys: file)" in line for line in output)
    assert (tmp_path / "state" / "keys").is_dir()


@pytest.mark.timeout(240)
def test_up_with_openbao(tmp_path: Path) -> None:
    output = check_stack(tmp_path, stop_with=signal.SIGTERM)
    assert any("keys: vault-kv on OpenBao" in line for line in output), output
    token_file = tmp_path / "state" / "vault-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    # the signer ran with a least-privilege token, not the root token
    assert "vault-token" in (tmp_path / "state" / "signer.yaml").read_text()


@pytest.mark.timeout(120)
def test_child_that_dies_early_is_reported(tmp_path: Path) -> None:
    state = tmp_path / "state"
    layout = Layout(state)
    prepare_pki(layout)
    layout.key("gateway").write_text("not a key\n")  # the gateway cannot start
    done = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "up", "--no-vault", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        start_new_session=True,
    )
    assert done.returncode == 1
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("svidgate up: error: gateway exited with status")
    assert str(layout.log("gateway")) in errors[0]
    assert "Ctrl-C" not in done.stdout
    assert processes_mentioning(str(state)) == []


def test_state_dir_is_reused_and_renewed(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "state")
    first = prepare_pki(layout)
    assert first == ["ca", *IDENTITIES]
    assert layout.key("client").stat().st_mode & 0o777 == 0o600
    serial = x509.load_pem_x509_certificate(layout.cert("client").read_bytes()).serial_number
    assert prepare_pki(layout) == []  # reused as is
    later = datetime.now(UTC) + SVID_TTL - timedelta(minutes=30)  # close to expiry
    assert prepare_pki(layout, now=later) == list(IDENTITIES)
    renewed = x509.load_pem_x509_certificate(layout.cert("client").read_bytes())
    assert renewed.serial_number != serial
    layout.cert("signer").unlink()
    assert prepare_pki(layout, now=later) == ["signer"]
    # a new CA (the old one expired) re-issues everything under it
    far = datetime.now(UTC) + timedelta(days=400)
    assert prepare_pki(layout, now=far) == ["ca", *IDENTITIES]


def test_signer_policy_is_least_privilege() -> None:
    hcl = signer_policy_hcl(kv_mount="kv", kv_path="a/b", transit_mount="t", transit_key="k")
    paths = re.findall(r'^path "([^"]+)"', hcl, flags=re.MULTILINE)
    assert paths == [
        "kv/data/a/b",
        "kv/metadata/a/b",
        "kv/destroy/a/b",
        "t/sign/k",
        "t/keys/k",
        "t/keys/k/rotate",
        "auth/token/lookup-self",
        "auth/token/renew-self",
    ]
    assert "*" not in hcl and "sudo" not in hcl and "delete" not in hcl
