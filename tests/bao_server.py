"""Compatibility name for tests/test_deploy.py, which imports ``bao_server.BaoServer``; the
OpenBao helper is :mod:`support.bao` (new code imports it from there)."""

from support.bao import ROOT_TOKEN, SIGNER_POLICY, BaoServer, bao_binary, signer_policy_hcl

__all__ = ["ROOT_TOKEN", "SIGNER_POLICY", "BaoServer", "bao_binary", "signer_policy_hcl"]
