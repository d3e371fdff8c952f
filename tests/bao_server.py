"""Compatibility names for tests/test_deploy.py and tests/gateway/test_gateway_revocation.py,
which import ``bao_server.BaoServer`` (and ``bao_binary``, ``bao_server``); the OpenBao helper
is :mod:`support.bao` (new code imports it from there)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from support.bao import ROOT_TOKEN, SIGNER_POLICY, BaoServer, bao_binary, signer_policy_hcl


@contextlib.contextmanager
def bao_server() -> Iterator[BaoServer]:
    """A fresh OpenBao dev server set up for signers (the session's is the ``bao`` fixture)."""
    with BaoServer() as server:
        server.setup_signer()
        yield server


__all__ = [
    "ROOT_TOKEN",
    "SIGNER_POLICY",
    "BaoServer",
    "bao_binary",
    "bao_server",
    "signer_policy_hcl",
]
