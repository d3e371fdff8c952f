"""The two clocks of a connection: its one lazily re-armed deadline (the head and idle
timeouts), and the wait for a client that is slow to read its response (the write timeout)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from svidgate.gateway.http1.errors import ClientDisconnected, WriteTimeout

_EARLY = 0.001  # a timer firing this close to its deadline counts as on time


def _nothing() -> None:
    """Stands in for a dropped callback (see :meth:`Deadline.cancel`, :meth:`WriteFlow.lose`)."""


class Deadline:
    """One deadline with one timer: moving the deadline later (every keep-alive request does)
    costs no timer operation; the timer re-arms itself when it fires early."""

    __slots__ = ("_at", "_expired", "_loop", "_timer", "_timer_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], None]) -> None:
        self._loop = loop
        self._expired = expired
        self._at: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def set(self, seconds: float) -> None:
        """``expired`` is called ``seconds`` from now unless the deadline moves or is cleared."""
        at = self._loop.time() + seconds
        self._at = at
        if self._timer is None or self._timer_at > at:
            if self._timer is not None:
                self._timer.cancel()
            self._start(at)

    def clear(self) -> None:
        self._at = None  # the pending timer finds nothing to do

    def cancel(self) -> None:
        """Stop for good: the timer goes and so does the callback (a bound method of the
        owner: dropping it breaks the owner ↔ deadline reference cycle)."""
        self._at = None
        self._expired = _nothing
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start(self, at: float) -> None:
        self._timer = self._loop.call_at(at, self._fire)
        self._timer_at = at

    def _fire(self) -> None:
        self._timer = None
        at = self._at
        if at is None:
            return
        if self._loop.time() < at - _EARLY:
            self._start(at)
            return
        self._at = None
        self._expired()


class WriteFlow:
    """Back-pressure of a transport's writes: paused above its high-water mark, a writer waits
    for it to drain at most ``timeout`` seconds, then ``timed_out`` cuts the connection."""

    __slots__ = ("_loop", "_lost", "_paused", "_timed_out", "_timeout", "_waiter")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, timed_out: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._timeout = timeout
        self._timed_out = timed_out
        self._paused = False
        self._lost = False
        self._waiter: asyncio.Future[None] | None = None

    def pause(self) -> None:
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._wake(None)

    def lose(self) -> None:
        """The connection is gone: a waiting writer gets :class:`ClientDisconnected`."""
        self._lost = True
        self._timed_out = _nothing  # the owner's bound method: no reference cycle is left
        self._wake(ClientDisconnected("client_disconnected"))

    async def wait(self) -> None:
        """Return once the client reads again; raises :class:`WriteTimeout` (the connection is
        cut) or :class:`ClientDisconnected`."""
        if self._lost:
            raise ClientDisconnected("client_disconnected")
        if not self._paused:
            return
        waiter = self._waiter
        if waiter is None:
            waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_later(self._timeout, self._expire, waiter)
        try:
            await asyncio.shield(waiter)
        finally:
            timer.cancel()

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if waiter is self._waiter and not waiter.done():
            self._wake(WriteTimeout("client_not_reading"))
            self._timed_out()

    def _wake(self, exc: Exception | None) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            return
        if exc is None:
            waiter.set_result(None)
        else:
            waiter.set_exception(exc)
