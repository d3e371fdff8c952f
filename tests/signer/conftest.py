"""Fixtures for the signer tests: a test PKI made with pki.ca, a short directory for Unix
sockets, and a session-wide real OpenBao dev server (tests/bao_server.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from signer_harness import (
    ADMIN_ID,
    CLIENT_ID,
    GATEWAY_ID,
    MINTER_ID,
    SIGNER_ID,
    STRANGER_ID,
    TD,
    BaoServer,
    Pki,
    bao_server,
)
from svidgate.pki.bundle import marshal_pem
from svidgate.pki.ca import CertificateAuthority


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority.create(TD)
    (directory / "bundle.pem").write_bytes(marshal_pem(ca.bundle()))
    ca.issue(SIGNER_ID, dns=["localhost"]).write(directory / "signer")
    for name, sid in {
        "gateway": GATEWAY_ID,
        "client": CLIENT_ID,
        "admin": ADMIN_ID,
        "minter": MINTER_ID,
        "stranger": STRANGER_ID,
    }.items():
        ca.issue(sid).write(directory / name)
    return Pki(directory, ca)


@pytest.fixture(scope="session")
def bao() -> Iterator[BaoServer]:
    with bao_server() as server:
        yield server


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
