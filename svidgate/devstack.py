"""`svidgate up`: the whole dev stack on loopback."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `svidgate up` (not built yet: the command is absent, not faked)."""
