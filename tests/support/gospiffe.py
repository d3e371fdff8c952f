"""The go-spiffe interop program (tests/interop/gospiffe, built by .ci/gospiffe into
build/tools/bin/gospiffe-interop) and a way to run it from async tests without blocking the
event loop that serves the gateway under test."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "build" / "tools" / "bin" / "gospiffe-interop"
BUILD = ROOT / ".ci" / "gospiffe"


def gospiffe_binary() -> Path:
    """The built program; builds it once with .ci/gospiffe (idempotent, needs Go) if absent."""
    if not BINARY.exists():
        result = subprocess.run(
            ["bash", str(BUILD)], capture_output=True, text=True, timeout=600, check=False
        )
        if result.returncode != 0 or not BINARY.exists():
            raise AssertionError(
                f"{BINARY} is missing and `bash .ci/gospiffe` failed (it needs Go >= 1.24 and "
                f"the Go module proxy): {result.stderr[-2000:]}"
            )
    return BINARY


async def run_gospiffe(*args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run ``gospiffe-interop ARGS``; its one JSON line (``ok`` true or false, and details)."""
    proc = await asyncio.create_subprocess_exec(
        str(gospiffe_binary()),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    try:
        result: dict[str, Any] = json.loads(out.decode())
    except ValueError:
        raise AssertionError(f"gospiffe-interop printed no JSON: {out!r} {err!r}") from None
    assert (proc.returncode == 0) == bool(result.get("ok")), result
    return result
