"""Giving a worker's freed heap back to the system after a burst of connections ends.

Each TLS connection allocates tens of KiB in C (uvloop's SSL buffers, OpenSSL's state) from
glibc's heap. When a burst of connections ends (a flood of half-open handshakes, a wave of
short-lived clients) that memory is free again but glibc keeps it in the process: the RSS
stays at the burst's peak. ``malloc_trim(0)`` hands free pages back (the heap's top and whole
free pages inside it). :class:`HeapTrimmer` calls it once a burst is over: when the number of
open connections has fallen by at least ``drop`` from its peak since the last trim, after a
short ``quiet`` pause, at most once per ``quiet`` seconds. Without glibc (musl, macOS) it does
nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable

log = logging.getLogger("svidgate.gateway.heap")

DEFAULT_DROP = 256  # connections closed since the peak before a trim is worth it
DEFAULT_QUIET = 2.0  # seconds after the drop (and between trims)


def _load_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_MALLOC_TRIM = _load_malloc_trim()


class HeapTrimmer:
    """Trims the heap once the open-connection count has dropped enough from its peak."""

    __slots__ = ("_drop", "_handle", "_loop", "_open", "_peak", "_quiet", "_trim", "trims")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        drop: int = DEFAULT_DROP,
        quiet: float = DEFAULT_QUIET,
        trim: Callable[[int], int] | None = _MALLOC_TRIM,
    ) -> None:
        self._loop = loop
        self._drop = drop
        self._quiet = quiet
        self._trim = trim
        self._peak = 0
        self._open = 0
        self._handle: asyncio.TimerHandle | None = None
        self.trims = 0

    def opened(self, count: int) -> None:
        """``count`` connections are open now (one more than before)."""
        self._open = count
        self._peak = max(self._peak, count)

    def closed(self, count: int) -> None:
        """``count`` connections are open now (one fewer than before)."""
        self._open = count
        if self._trim is None or self._handle is not None:
            return
        if self._peak - count >= self._drop:
            self._handle = self._loop.call_later(self._quiet, self._run)

    def _run(self) -> None:
        self._handle = None
        if self._trim is None:
            return
        self._trim(0)
        self.trims += 1
        self._peak = self._open  # the next drop is measured from here

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
