"""The svidgate side of the benchmark, driven only through the public ``svidgate`` CLI.

A throwaway trust domain (``svidgate pki init/issue``), the signer sidecar with the file key
source on a Unix socket (``svidgate signer serve``), a bearer token minted with
``svidgate signer sign``, and the gateway (``svidgate gateway serve``) with three routes to the
same upstream: RBAC only, RBAC + JWT verified remotely (signer Verify RPC), RBAC + JWT verified
locally (JWKS from the signer).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from bench.procs import BenchError, Service, free_port, pinned

TRUST_DOMAIN = "bench.test"
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/client"
OTHER_ID = f"spiffe://{TRUST_DOMAIN}/ns/other/sa/intruder"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/gateway"
SIGNER_ID = f"spiffe://{TRUST_DOMAIN}/signer"
AUDIENCE = "bench"

# route name -> path prefix; the JWT routes differ only in how the token is verified.
ROUTES = {
    "rbac": "/rbac",
    "jwt-remote": "/jwt-remote",
    "jwt-local": "/jwt-local",
}


def svidgate_cmd() -> list[str]:
    """The console script next to the running interpreter (the project venv), else PATH."""
    exe = Path(sys.executable).with_name("svidgate")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("svidgate")
    if found is None:
        raise BenchError("the `svidgate` command is not installed (run `make install`)")
    return [found]


def cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> str:
    """Run ``svidgate ARGS``; raises BenchError with svidgate's one-line error on failure."""
    proc = subprocess.run(
        [*svidgate_cmd(), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise BenchError(f"`svidgate {' '.join(args[:3])} …` exited {proc.returncode}: {msg}")
    return proc.stdout


def has_command(*words: str) -> bool:
    """Whether ``svidgate WORDS --help`` exists (the CLIs land one by one)."""
    proc = subprocess.run(
        [*svidgate_cmd(), *words, "--help"], capture_output=True, timeout=60, check=False
    )
    return proc.returncode == 0


@dataclass(frozen=True)
class Pki:
    dir: Path
    bundle: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    client_pem: Path  # cert chain + key in one file, for `ab -E`
    other_crt: Path
    other_key: Path
    signer_crt: Path
    signer_key: Path


def make_pki(work: Path) -> Pki:
    """A fresh ECDSA P-256 trust domain and the SVIDs every party needs."""
    d = work / "pki"
    cli("pki", "init", "--trust-domain", TRUST_DOMAIN, "--dir", str(d), "--ttl", "24h")

    def issue(name: str, spiffe_id: str, *extra: str) -> tuple[Path, Path]:
        out = d / name
        cli("pki", "issue", "--dir", str(d), "--spiffe-id", spiffe_id, "--out", str(out), *extra)
        return out.with_suffix(".crt"), out.with_suffix(".key")

    server = issue("server", GATEWAY_ID, "--dns", "localhost", "--ip", "127.0.0.1")
    client = issue("client", CLIENT_ID)
    other = issue("other", OTHER_ID)
    signer = issue("signer", SIGNER_ID, "--dns", "localhost", "--ip", "127.0.0.1")
    pem = d / "client.pem"
    pem.write_bytes(client[0].read_bytes() + client[1].read_bytes())
    pem.chmod(0o600)
    return Pki(
        dir=d,
        bundle=d / "bundle.pem",
        server_crt=server[0],
        server_key=server[1],
        client_crt=client[0],
        client_key=client[1],
        client_pem=pem,
        other_crt=other[0],
        other_key=other[1],
        signer_crt=signer[0],
        signer_key=signer[1],
    )


@dataclass
class SvidgateStack:
    work: Path
    signer: Service | None
    gateway: Service
    port: int
    admin_port: int
    token: str
    signer_sock: Path | None = None

    def jwks(self) -> str:
        """The signer's public keys (JWKS JSON) from its GetJWKS RPC, for peers that verify
        tokens themselves (Envoy's jwt_authn)."""
        if self.signer_sock is None:
            raise BenchError("no signer running (no JWT route): no JWKS to hand out")
        return fetch_jwks(self.signer_sock)

    def server_pids(self) -> list[int]:
        return self.gateway.tree() + (self.signer.tree() if self.signer else [])

    def gateway_pids(self) -> list[int]:
        return self.gateway.tree()

    def stop(self) -> None:
        self.gateway.stop()
        if self.signer is not None:
            self.signer.stop()


def _signer_config(work: Path, pki: Pki) -> Path:
    conf = {
        "trust_domain": TRUST_DOMAIN,
        "issuer": SIGNER_ID,
        "listen": {"unix": "run/signer.sock"},
        "tls": {"cert": str(pki.signer_crt), "key": str(pki.signer_key), "bundle": str(pki.bundle)},
        "authorization": {
            "verify": [GATEWAY_ID],
            "sign": [f"spiffe://{TRUST_DOMAIN}/**"],
            "rotate": [f"spiffe://{TRUST_DOMAIN}/admin"],
        },
        "keys": {"source": "file", "algorithm": "ES256", "dir": "keys/"},
        # Long enough for one token to outlast the whole benchmark.
        "tokens": {"default_ttl": "5m", "max_ttl": "2h", "clock_skew": "30s"},
        "rotation": {"period": "24h", "prepare_ahead": "10m", "poll_interval": "10s"},
    }
    d = work / "signer"
    (d / "run").mkdir(parents=True, exist_ok=True)
    (d / "keys").mkdir(exist_ok=True)
    path = d / "signer.yaml"
    path.write_text(yaml.safe_dump(conf, sort_keys=False))
    return path


def _gateway_config(
    work: Path,
    pki: Pki,
    *,
    port: int,
    admin_port: int,
    upstream_port: int,
    workers: int,
    signer_sock: Path | None,
    routes: tuple[str, ...],
    access_log: bool,
    audit_allow: bool,
    upstream_protocol: str = "http1",
) -> Path:
    def route(name: str, prefix: str) -> dict[str, object]:
        r: dict[str, object] = {
            "name": name,
            "match": {"path_prefix": prefix},
            "upstream": "upstream",
            "allow": [CLIENT_ID],
        }
        if name.startswith("jwt-"):
            verify = name.removeprefix("jwt-")
            r["jwt"] = {"required": True, "audience": AUDIENCE, "bind": "subject", "verify": verify}
        return r

    conf = {
        "listen": f"127.0.0.1:{port}",
        "workers": workers,
        "admin_listen": f"127.0.0.1:{admin_port}",
        "tls": {"cert": str(pki.server_crt), "key": str(pki.server_key), "min_version": "1.3"},
        "trust_domains": {TRUST_DOMAIN: {"bundle": str(pki.bundle)}},
        "signer": {"address": f"unix:{signer_sock}", "timeout": "250ms"} if signer_sock else None,
        "upstreams": {
            "upstream": {"url": f"http://127.0.0.1:{upstream_port}", "protocol": upstream_protocol}
        },
        "routes": [route(name, ROUTES[name]) for name in routes],
        "identity_headers": {"xfcc": True},
        "access_log": access_log,
        # the idle-memory probe holds 1,000 connections of one bench client; the per-identity
        # default (512) would refuse half of them
        "limits": {"max_connections_per_identity": 4096},
    }
    if not audit_allow:  # the default (allow decisions audited) is what users run
        conf["audit"] = {"allow": False}
    d = work / "gateway"
    d.mkdir(parents=True, exist_ok=True)
    path = d / "gateway.yaml"
    path.write_text(
        yaml.safe_dump({k: v for k, v in conf.items() if v is not None}, sort_keys=False)
    )
    return path


def _wait_file(path: Path, svc: Service, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return
        if not svc.alive():
            raise BenchError(f"{svc.name} exited early; last log lines:\n{svc.tail()}")
        time.sleep(0.05)
    raise BenchError(f"{svc.name} did not create {path} within {timeout}s")


def start_stack(
    work: Path,
    pki: Pki,
    *,
    upstream_port: int,
    workers: int,
    cpus: str,
    routes: tuple[str, ...] = tuple(ROUTES),
    access_log: bool = False,
    audit_allow: bool = True,
    upstream_protocol: str = "http1",
) -> SvidgateStack:
    """Start signer (if a JWT route is wanted) then gateway, pinned; mint the bench token."""
    env = {**os.environ, "SVIDGATE_DEBUG": "1"}
    signer_conf = _signer_config(work, pki)
    sock = signer_conf.parent / "run" / "signer.sock"
    with_jwt = any(r.startswith("jwt-") for r in routes)
    signer: Service | None = None
    if with_jwt:
        signer = Service.start(
            "svidgate signer",
            pinned([*svidgate_cmd(), "signer", "serve", "--config", str(signer_conf)], cpus),
            log=work / "signer.log",
            cwd=signer_conf.parent,
            env=env,
        )
    try:
        token = ""
        if signer is not None:
            _wait_file(sock, signer)
            token = _mint(signer_conf)
        port, admin_port = free_port(), free_port()
        gw_conf = _gateway_config(
            work,
            pki,
            port=port,
            admin_port=admin_port,
            upstream_port=upstream_port,
            workers=workers,
            signer_sock=sock if with_jwt else None,
            routes=routes,
            access_log=access_log,
            audit_allow=audit_allow,
            upstream_protocol=upstream_protocol,
        )
        cli("gateway", "check", "--config", str(gw_conf))
        gateway = Service.start(
            "svidgate gateway",
            pinned([*svidgate_cmd(), "gateway", "serve", "--config", str(gw_conf)], cpus),
            log=work / "gateway.log",
            cwd=gw_conf.parent,
            env=env,
        )
    except BaseException:
        if signer is not None:
            signer.stop()
        raise
    stack = SvidgateStack(
        work, signer, gateway, port, admin_port, token, sock if signer is not None else None
    )
    try:
        gateway.wait_port(port, timeout=30)
        gateway.wait_port(admin_port, timeout=30)
        _wait_ready(admin_port, gateway)
    except BaseException:
        stack.stop()
        raise
    return stack


def fetch_jwks(sock: Path) -> str:
    """GetJWKS over the signer's Unix socket; the key set as JSON (at least one key)."""
    import json

    import grpc
    from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc

    with grpc.insecure_channel(f"unix:{sock}") as channel:
        stub = signer_pb2_grpc.SignerStub(channel)  # type: ignore[no-untyped-call]
        try:
            reply = stub.GetJWKS(signer_pb2.GetJWKSRequest(), timeout=10)
        except grpc.RpcError as exc:
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            raise BenchError(f"signer GetJWKS failed: {detail}") from None
    text: str = reply.jwks_json
    try:
        keys = json.loads(text).get("keys")
    except (ValueError, AttributeError):
        keys = None
    if not keys:
        raise BenchError("signer GetJWKS returned no keys")
    return text


def _mint(signer_conf: Path) -> str:
    token = cli(
        "signer",
        "sign",
        "--config",
        str(signer_conf),
        "--subject",
        CLIENT_ID,
        "--audience",
        AUDIENCE,
        "--ttl",
        "2h",
    ).strip()
    if token.count(".") != 2:
        raise BenchError("`svidgate signer sign` did not print a JWT")
    return token


def _wait_ready(admin_port: int, svc: Service, timeout: float = 30.0) -> None:
    import http.client

    deadline = time.monotonic() + timeout
    status = 0
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=2)
        try:
            conn.request("GET", "/readyz")
            status = conn.getresponse().status
            if status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if not svc.alive():
            raise BenchError(f"{svc.name} exited; last log lines:\n{svc.tail()}")
        time.sleep(0.1)
    raise BenchError(f"{svc.name} /readyz still {status} after {timeout}s")
