"""A real SPIRE server and agent for tests (binaries built by ``.ci/spire``).

Usage (the ``spire`` fixture of tests/conftest.py does the first and last steps)::

    with Spire(trust_domain="example.org") as spire:             # server + agent, ~2-5 s
        spire.register("spiffe://example.org/gw", gid=4242)      # who gets which SVID
        spire.register("spiffe://example.org/client", gid=0)     # gid 0: this test process
        svid = spire.fetch_x509("spiffe://example.org/client")   # py-spiffe, as this process
        token = spire.fetch_jwt("spiffe://example.org/client", "orders")   # a JWT-SVID (ES256)
        spire.socket                                             # "unix:///…/agent.sock"
        spire.bundle_pem(), spire.bundle_json()                  # CAs; SPIFFE bundle + JWT keys
        spire.mint_x509("spiffe://example.org/x", directory)     # an SVID for a non-workload

The server keeps its datastore in SQLite in a private temporary directory and attests the agent
with a join token; the agent attests workloads with the ``unix`` attestor. Different processes
get different identities by their primary group: every test runs as root, so a child started
with ``subprocess.Popen(..., group=GID)`` stays able to read every file while the agent sees
``unix:gid:GID`` (this process has gid 0). ``x509_ttl`` sets the default X.509-SVID lifetime (the
agent renews an SVID when half of it is left: a 20 s TTL rotates every ~10 s).
``stop_agent()`` / ``start_agent()`` restart the agent on the same data directory (its own SVID
and key are kept on disk, so it re-attests without a new join token).

If the binaries are missing, starting fails with the command that builds them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from support.ports import free_port
from support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = REPO / "build" / "tools" / "bin"
AGENT_ID_PATH = "/spire-agent"  # the join token's alias: parent of every registration entry


def spire_binary(name: str) -> str:
    """``build/tools/bin/NAME`` (from .ci/spire), else NAME on PATH; a clear error otherwise."""
    local = BIN_DIR / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"the `{name}` binary is missing: run `bash .ci/spire` (builds SPIRE with Go into "
            f"{BIN_DIR})"
        )
    return found


class Spire:
    """spire-server + spire-agent in a private temporary directory (see the module doc)."""

    def __init__(
        self, trust_domain: str = "example.org", *, x509_ttl: str = "1h", jwt_ttl: str = "5m"
    ) -> None:
        self.trust_domain = trust_domain
        self.x509_ttl = x509_ttl
        self.jwt_ttl = jwt_ttl
        # short: unix socket paths are limited to 107 bytes
        self.dir = Path(tempfile.mkdtemp(prefix="spire-", dir="/tmp"))
        self.server_socket = self.dir / "server.sock"
        self.agent_socket = self.dir / "agent.sock"
        self.port = 0
        self._server: subprocess.Popen[bytes] | None = None
        self._agent: subprocess.Popen[bytes] | None = None

    # -- the public face -------------------------------------------------------------------------

    @property
    def socket(self) -> str:
        """The Workload API address for SPIFFE_ENDPOINT_SOCKET / workload_api.socket."""
        return f"unix://{self.agent_socket}"

    def id(self, path: str) -> str:
        return f"spiffe://{self.trust_domain}{path}"

    def start(self) -> Spire:
        self.port = free_port()
        (self.dir / "server.conf").write_text(self._server_conf())
        self._server = self._spawn("spire-server", "server.conf", "server.log")
        self._wait_healthy("spire-server", self.server_socket, self._server, "server.log")
        token = self.server("token", "generate", "-spiffeID", self.id(AGENT_ID_PATH), "-ttl", "600")
        (self.dir / "agent.conf").write_text(self._agent_conf(token.split()[-1]))
        self.start_agent()
        return self

    def start_agent(self) -> None:
        self._agent = self._spawn("spire-agent", "agent.conf", "agent.log")
        self._wait_healthy("spire-agent", self.agent_socket, self._agent, "agent.log")

    def stop_agent(self) -> None:
        self._agent = _stop(self._agent)
        self.agent_socket.unlink(missing_ok=True)

    def stop(self) -> None:
        self.stop_agent()
        self._server = _stop(self._server)
        shutil.rmtree(self.dir, ignore_errors=True)

    def register(
        self,
        spiffe_id: str,
        *,
        gid: int | None = None,
        selectors: tuple[str, ...] = (),
        x509_ttl: int | None = None,
        federates_with: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
    ) -> str:
        """Create a registration entry under the agent; returns the entry ID. ``gid`` adds the
        selector ``unix:gid:GID``; ``x509_ttl`` (seconds) overrides the server default; ``dns``
        adds DNS SANs (a Python gRPC client checks the server's host name)."""
        args = ["entry", "create", "-parentID", self.id(AGENT_ID_PATH), "-spiffeID", spiffe_id]
        for selector in ((f"unix:gid:{gid}",) if gid is not None else ()) + selectors:
            args += ["-selector", selector]
        if x509_ttl is not None:
            args += ["-x509SVIDTTL", str(x509_ttl)]
        for td in federates_with:
            args += ["-federatesWith", f"spiffe://{td}"]
        for name in dns:
            args += ["-dns", name]
        out = self.server(*args)
        for line in out.splitlines():
            if line.startswith("Entry ID"):
                return line.split(":", 1)[1].strip()
        raise RuntimeError(f"spire-server entry create: no entry ID in {out!r}")

    def mint_x509(self, spiffe_id: str, directory: Path, ttl: str = "1h") -> tuple[Path, Path]:
        """An X.509-SVID minted by the server itself (``spire-server x509 mint``), for a test
        client that is no workload of the agent: (cert chain PEM, key PEM 0600) in
        ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        self.server("x509", "mint", "-spiffeID", spiffe_id, "-ttl", ttl, "-write", str(directory))
        key = directory / "key.pem"
        key.chmod(0o600)
        return directory / "svid.pem", key

    def set_federated_bundle(self, trust_domain: str, pem: Path) -> None:
        """Trust another domain's CA (PEM) in SPIRE; entries that federate with it get it too."""
        self.server("bundle", "set", "-id", f"spiffe://{trust_domain}", "-path", str(pem))

    def server(self, *args: str) -> str:
        """Run ``spire-server ARGS -socketPath …`` and return its stdout."""
        return _run([spire_binary("spire-server"), *args, "-socketPath", str(self.server_socket)])

    def fetch_x509(self, spiffe_id: str, timeout: float = 30.0) -> Any:
        """This process's X.509-SVID ``spiffe_id`` from the agent (py-spiffe ``X509Svid``),
        waiting until the agent has it."""
        from spiffe import WorkloadApiClient

        with WorkloadApiClient(self.socket) as client:
            found: list[Any] = []

            def have() -> bool:
                try:
                    svids = client.fetch_x509_svids(timeout=5)
                except Exception:  # no entry synced yet: PermissionDenied
                    return False
                found[:] = [s for s in svids if str(s.spiffe_id) == spiffe_id]
                return bool(found)

            wait_until(have, timeout, f"SPIRE to issue {spiffe_id}", interval=0.2)
            return found[0]

    def fetch_jwt(self, spiffe_id: str, audience: str, timeout: float = 30.0) -> str:
        """A JWT-SVID for ``spiffe_id`` minted by SPIRE (FetchJWTSVID) for this process."""
        from spiffe import WorkloadApiClient

        self.fetch_x509(spiffe_id, timeout)  # the entry has reached the agent
        with WorkloadApiClient(self.socket) as client:
            svid = client.fetch_jwt_svid(audience={audience}, subject=spiffe_id, timeout=5)
            return str(svid.token)

    def bundle_pem(self) -> bytes:
        """The trust domain's current X.509 authorities (PEM), as the server shows them."""
        return self.server("bundle", "show").encode()

    def bundle_json(self) -> bytes:
        """The trust domain's bundle in the SPIFFE format (X.509 authorities and JWT keys)."""
        return self.server("bundle", "show", "-format", "spiffe").encode()

    # -- internals -------------------------------------------------------------------------------

    def _server_conf(self) -> str:
        d = self.dir
        return f"""
server {{
  bind_address = "127.0.0.1"
  bind_port = "{self.port}"
  socket_path = "{self.server_socket}"
  trust_domain = "{self.trust_domain}"
  data_dir = "{d}/server-data"
  log_level = "INFO"
  ca_ttl = "24h"
  default_x509_svid_ttl = "{self.x509_ttl}"
  default_jwt_svid_ttl = "{self.jwt_ttl}"
}}
plugins {{
  DataStore "sql" {{
    plugin_data {{
      database_type = "sqlite3"
      connection_string = "{d}/server-data/datastore.sqlite3"
    }}
  }}
  KeyManager "memory" {{ plugin_data {{}} }}
  NodeAttestor "join_token" {{ plugin_data {{}} }}
}}
"""

    def _agent_conf(self, token: str) -> str:
        d = self.dir
        return f"""
agent {{
  data_dir = "{d}/agent-data"
  log_level = "INFO"
  server_address = "127.0.0.1"
  server_port = "{self.port}"
  socket_path = "{self.agent_socket}"
  trust_domain = "{self.trust_domain}"
  insecure_bootstrap = true
  join_token = "{token}"
}}
plugins {{
  NodeAttestor "join_token" {{ plugin_data {{}} }}
  KeyManager "disk" {{ plugin_data {{ directory = "{d}/agent-data" }} }}
  WorkloadAttestor "unix" {{ plugin_data {{}} }}
}}
"""

    def _spawn(self, name: str, conf: str, log: str) -> subprocess.Popen[bytes]:
        binary = spire_binary(name)
        with (self.dir / log).open("ab") as out:
            return subprocess.Popen(
                [binary, "run", "-config", str(self.dir / conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
                start_new_session=True,
            )

    def _wait_healthy(
        self, name: str, socket: Path, proc: subprocess.Popen[bytes], log: str
    ) -> None:
        def healthy() -> bool:
            if proc.poll() is not None:
                tail = (self.dir / log).read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {proc.returncode}: {tail}")
            check = [spire_binary(name), "healthcheck", "-shallow", "-socketPath", str(socket)]
            return (
                subprocess.run(check, check=False, capture_output=True, timeout=30).returncode == 0
            )

        wait_until(healthy, 60.0, f"{name} to become healthy", interval=0.2)

    def log(self, name: str = "agent") -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> Spire:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, check=False, capture_output=True, timeout=60)
    if done.returncode != 0:
        err = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise RuntimeError(f"{' '.join(argv[:3])}: exit {done.returncode}: {err[-1000:]}")
    return done.stdout.decode()


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return None
