"""Waiting on a condition with a deadline: the one poll loop of the test suite.

Tests wait for an event (a key set pushed, a log line, a port accepting connections, a file
appearing) rather than sleeping a fixed time. Where the event can only be seen by looking, these
look every ``interval`` seconds and fail with ``what`` once ``timeout`` has passed.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

Predicate = Callable[[], bool | Awaitable[bool]]


async def wait_for(
    predicate: Predicate, timeout: float = 10.0, what: str = "condition", interval: float = 0.02
) -> None:
    """Return once ``predicate()`` (plain or async) is true; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until(
    predicate: Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
    interval: float = 0.02,
) -> None:
    """Blocking :func:`wait_for` for synchronous tests and helpers."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def sleep_until(deadline: float) -> None:
    """Sleep until ``time.monotonic()`` reaches ``deadline`` — for tests whose subject is that
    time passes (a TTL that must run out); the deadline is counted from the event that starts
    the clock, not from wherever the test happens to be."""
    await asyncio.sleep(max(0.0, deadline - time.monotonic()))
