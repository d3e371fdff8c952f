"""Fixtures for gateway integration tests (helpers live in gateway_harness.py; the PKI is the
session's ``pki`` from tests/conftest.py, copied per test because tests change its files)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import (
    Echo,
    GatewayProcess,
    Harness,
    LabPki,
    gateway_config,
    start_echo,
    write_config,
)
from svidgate.gateway.server import GatewayServer


@pytest.fixture
def test_pki(pki: LabPki, tmp_path: Path) -> LabPki:
    return pki.copy(tmp_path)


@pytest.fixture
async def echo(test_pki: LabPki) -> AsyncIterator[Echo]:
    e, runner = await start_echo(test_pki)
    yield e
    await runner.cleanup()


@pytest.fixture
async def start_gateway(test_pki: LabPki) -> AsyncIterator[Callable[..., Any]]:
    servers: list[GatewayServer] = []

    async def start(doc: dict[str, Any]) -> Harness:
        path = write_config(test_pki, doc)
        server = GatewayServer(path)
        await server.start()
        servers.append(server)
        return Harness(test_pki, server, path)

    yield start
    for server in servers:
        await server.stop(drain_timeout=1.0)


@pytest.fixture
async def gw(test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]) -> Harness:
    harness: Harness = await start_gateway(gateway_config(test_pki, echo.port))
    return harness


@pytest.fixture
async def serve(test_pki: LabPki) -> AsyncIterator[Callable[..., Any]]:
    """``await serve(doc)`` → a started :class:`GatewayProcess` (``svidgate gateway serve``);
    every one is stopped at teardown (SIGTERM: a supervisor takes its workers down with it)."""
    procs: list[GatewayProcess] = []

    async def start(doc: dict[str, Any]) -> GatewayProcess:
        gw = GatewayProcess(test_pki, doc, f"gateway-{len(procs)}")
        procs.append(gw)
        await gw.start(timeout=20)
        return gw

    yield start
    for gw in procs:
        gw.stop()
