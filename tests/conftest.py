"""The suite-wide fixtures, built on the helpers in tests/support/ (importable as ``support.*``
through pyproject's pytest ``pythonpath``):

- ``bao`` — one real OpenBao dev server for the session, set up for signers
  (:class:`support.bao.BaoServer`; a test that stops OpenBao starts its own instance).
- ``pki`` — the session's test PKI: CAs for example.org and other.org and every suite's SVIDs
  (:class:`support.pki.Pki`; tests that change files use ``pki.copy(...)``).
- ``signer_process`` — starts ``svidgate signer serve`` child processes
  (:class:`support.signer_process.SignerProcess`) and stops whatever is left at teardown.
- ``short_dir`` — a short directory for Unix sockets.
- ``redis_server`` — a real ``redis-server`` of its own for one test
  (:class:`support.redis.RedisServer`; the test may stop and start it again).
- ``spire`` — starts a real SPIRE server + agent (:class:`support.spire.Spire`, binaries from
  ``.ci/spire``) and stops it at teardown.

Free ports come from :func:`support.ports.free_port`; waits use :mod:`support.waiting`.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.bao import BaoServer
from support.pki import Pki
from support.redis import RedisServer
from support.signer_process import SignerProcess
from support.spire import Spire


@pytest.fixture(scope="session")
def bao() -> Iterator[BaoServer]:
    with BaoServer() as server:
        server.setup_signer()
        yield server


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def signer_process() -> Iterator[Callable[..., SignerProcess]]:
    """``signer_process(config, log, env=…)`` → an unstarted :class:`SignerProcess`; any still
    running at teardown is stopped."""
    made: list[SignerProcess] = []

    def make(
        config: Path,
        log: Path | None = None,
        *,
        socket: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> SignerProcess:
        proc = SignerProcess(config, log or config.with_suffix(".log"), socket=socket, env=env)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        if proc.running:
            proc.stop()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory for Unix sockets (sun_path is limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sg-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture
def spire() -> Iterator[Callable[..., Spire]]:
    """``spire(trust_domain=…, x509_ttl=…)`` → a started real SPIRE server + agent
    (:class:`support.spire.Spire`), stopped at teardown."""
    made: list[Spire] = []

    def make(**kwargs: str) -> Spire:
        instance = Spire(**kwargs)
        made.append(instance)
        return instance.start()

    yield make
    for instance in made:
        instance.stop()
