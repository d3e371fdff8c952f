"""The signer's error tree (one base); the single table mapping them to gRPC status codes lives
in the service layer."""

from __future__ import annotations


class SignerError(Exception):
    """Base of every signer error. ``str(err)`` never holds a token, key or Vault token."""
