"""The HTTP transport under the Vault client (:mod:`svidgate.signer.vault`): how requests reach
Vault, and how long they may take. It knows nothing of Vault's API and does not import hvac.

- :func:`new_session`: a requests Session that takes nothing from the environment
  (``trust_env = False``: no ``HTTP(S)_PROXY``/``ALL_PROXY``, no ``.netrc``, no
  ``REQUESTS_CA_BUNDLE``), uses the configured proxy only, and refuses every redirect: a 3xx
  answer raises :class:`RedirectRefused` naming the status, so a token is never sent anywhere
  but the configured origin.
- :class:`WorkerPool`: a fixed number of daemon threads, each with its own client (and so its
  own connections). Daemon threads never hold up interpreter exit, and closing a pool does not
  wait for them.
- :func:`run_with_deadline`: one overall deadline per call, whatever the server does. At the
  deadline the caller stops waiting (:class:`DeadlineExceeded`), and the sockets the call was
  using are shut down, which frees its thread even from a server that drip-feeds bytes under
  the per-read socket timeout. A call still queued at its deadline never runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, Generic, TypeVar

import requests
import requests.adapters
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

S = TypeVar("S")
T = TypeVar("T")


class RedirectRefused(requests.RequestException):
    """Vault (or something in its place) answered with a redirect; it is never followed."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status} redirect")
        self.status = status


class DeadlineExceeded(Exception):
    """A call did not finish within its deadline; its connections were cut."""


class CallAbandoned(OSError):
    """Raised in a worker when its call was abandoned before it opened a connection."""


# -- one call's connections ------------------------------------------------------------------


@dataclass(eq=False)
class CallHandle:
    """The connections one call opened or used, so they can be cut when it is abandoned."""

    _lock: threading.Lock = field(default_factory=threading.Lock)
    _connections: list[HTTPConnection] = field(default_factory=list)
    _sockets: list[socket.socket] = field(default_factory=list)  # dups of new raw sockets
    _finished: bool = False
    _abandoned: bool = False

    def attach(self, connection: HTTPConnection, new_socket: socket.socket | None = None) -> None:
        with self._lock:
            if self._abandoned:
                raise CallAbandoned("the call was abandoned at its deadline")
            if connection not in self._connections:
                self._connections.append(connection)
            if new_socket is not None:
                # a dup reaches the socket even while TLS wraps it (the original is detached)
                self._sockets.append(new_socket.dup())

    def finish(self) -> None:
        with self._lock:
            self._finished = True
            self._release()

    def abandon(self) -> None:
        """Shut down every socket of the call unless it has finished (then they may belong to
        the next call on the same thread)."""
        with self._lock:
            if self._finished or self._abandoned:
                return
            self._abandoned = True
            for connection in self._connections:
                _shut(connection.sock)
            for sock in self._sockets:
                _shut(sock)
            self._release()

    def _release(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets.clear()
        self._connections.clear()


def _shut(sock: socket.socket | None) -> None:
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            # the base method works on an SSLSocket's descriptor without touching its TLS state
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


_current = threading.local()


def _attach(connection: HTTPConnection, new_socket: socket.socket | None = None) -> None:
    handle: CallHandle | None = getattr(_current, "handle", None)
    if handle is not None:
        handle.attach(connection, new_socket)


def _track_new(connection: HTTPConnection, sock: socket.socket) -> socket.socket:
    try:
        _attach(connection, sock)
    except CallAbandoned:
        sock.close()
        raise
    return sock


class _TrackedConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _track_new(self, super()._new_conn())

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)  # a kept-alive connection is used again without _new_conn
        super().request(*args, **kwargs)


class _TrackedTlsConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _track_new(self, super()._new_conn())

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach(self)
        super().request(*args, **kwargs)


class _Pool(HTTPConnectionPool):
    ConnectionCls = _TrackedConnection


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TrackedTlsConnection


_POOL_CLASSES = {"http": _Pool, "https": _TlsPool}


class _TrackingAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections register with the running call."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager


def _refuse_redirects(response: requests.Response, *args: Any, **kwargs: Any) -> None:
    if 300 <= response.status_code < 400:
        response.close()
        raise RedirectRefused(response.status_code)


def new_session(*, verify: bool | str, proxy: str | None) -> requests.Session:
    """A session for Vault: nothing from the environment, ``proxy`` or none, no redirects."""
    session = requests.Session()
    session.trust_env = False
    session.verify = verify
    session.proxies = {"http": proxy, "https": proxy} if proxy else {}
    session.max_redirects = 0
    session.hooks["response"] = [_refuse_redirects]
    for prefix in ("http://", "https://"):
        session.mount(prefix, _TrackingAdapter())
    return session


# -- the worker pool -------------------------------------------------------------------------


@dataclass(eq=False)
class _Job(Generic[S, T]):
    fn: Callable[[S], T]
    future: concurrent.futures.Future[T] = field(default_factory=concurrent.futures.Future)
    handle: CallHandle = field(default_factory=CallHandle)

    def run(self, state: S) -> None:
        if not self.future.set_running_or_notify_cancel():
            return  # abandoned while queued
        _current.handle = self.handle
        try:
            result = self.fn(state)
        except BaseException as exc:  # handed to the waiting coroutine
            self.handle.finish()
            self.future.set_exception(exc)
        else:
            self.handle.finish()
            self.future.set_result(result)
        finally:
            _current.handle = None

    def abandon(self) -> None:
        if not self.future.cancel():
            self.handle.abandon()


class WorkerPool(Generic[S]):
    """``size`` daemon threads (started on first use), each with its own ``make()`` state,
    closed with ``close_state`` when the thread ends."""

    def __init__(
        self, name: str, size: int, make: Callable[[], S], close_state: Callable[[S], None]
    ) -> None:
        self.name = name
        self.size = size
        self._make = make
        self._close_state = close_state
        self._jobs: SimpleQueue[_Job[S, Any] | None] = SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._unfinished: set[_Job[S, Any]] = set()

    def submit(self, fn: Callable[[S], T]) -> _Job[S, T]:
        job: _Job[S, T] = _Job(fn)
        with self._lock:
            if self._closed:
                raise CallAbandoned(f"{self.name}: closed")
            self._unfinished.add(job)
            job.future.add_done_callback(lambda _: self._forget(job))
            if not self._threads:
                self._threads = [
                    threading.Thread(target=self._work, name=f"{self.name}-{n}", daemon=True)
                    for n in range(self.size)
                ]
                for thread in self._threads:
                    thread.start()
            self._jobs.put(job)
        return job

    def _work(self) -> None:
        state = self._make()
        try:
            while (job := self._jobs.get()) is not None:
                job.run(state)
        finally:
            self._close_state(state)

    def _forget(self, job: _Job[S, Any]) -> None:
        with self._lock:
            self._unfinished.discard(job)

    def close(self) -> None:
        """Abandon every unfinished call (cutting its connections) and let every thread end;
        never waits."""
        with self._lock:
            self._closed = True
            unfinished, self._unfinished = list(self._unfinished), set()
            for _ in self._threads:
                self._jobs.put(None)
        for job in unfinished:
            job.abandon()

    @property
    def threads(self) -> list[threading.Thread]:
        return list(self._threads)


async def run_with_deadline(pool: WorkerPool[S], fn: Callable[[S], T], deadline: float) -> T:
    """``fn(state)`` on one of ``pool``'s threads; DeadlineExceeded after ``deadline`` seconds
    (queueing included), and a cancelled caller abandons the call the same way."""
    job = pool.submit(fn)
    waiter = asyncio.wrap_future(job.future)
    try:
        done, _ = await asyncio.wait({waiter}, timeout=deadline)
    except asyncio.CancelledError:
        job.abandon()
        waiter.cancel()
        raise
    if not done:
        job.abandon()
        waiter.cancel()
        raise DeadlineExceeded(f"no answer within {deadline:g}s")
    return waiter.result()
