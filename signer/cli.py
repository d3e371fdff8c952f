"""`svidgate signer …` subcommands."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add the `signer` subcommands (not built yet: the command is absent, not faked)."""
