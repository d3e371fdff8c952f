"""The data-plane listener: accepts TCP connections on the (SO_REUSEPORT) listening socket,
bounds them, runs the TLS handshake, admits the peer and serves it with the HTTP/1.1 core, or
the HTTP/2 core when ALPN selected ``h2`` (:class:`_AlpnChoice`; same admission either way).

Limits, in the order a peer meets them:

1. ``max_connections`` per worker, counted from accept to close (half-open handshakes
   included): one connection too many is closed at once, before any TLS byte (RST).
2. ``handshake_timeout``, from accept: the client must speak and finish the handshake in
   time. Until its first byte a connection holds a socket, a reader, a timer and a small
   protocol object (about 2 KiB); TLS state is allocated only when the ClientHello arrives.
   At most ``max_handshakes`` handshakes are in progress (a stalled one holds ~60 KiB of TLS
   state): one more resets the oldest. A real client finishes in a round trip, so what gives
   way is a stalled one, and a flood of them cannot take more than that much memory.
3. the caller's identity check (``identify``), right after the handshake, before a parser or
   buffer exists: it returns an :class:`Admission` or raises (:class:`Refused`: counted; any
   other error: logged and refused — fail closed).
4. ``max_connections_per_identity`` on the admission's key: beyond it, closed at once.

Once a burst of connections is over, the memory it took is handed back to the system
(:class:`~svidgate.gateway.heap.HeapTrimmer`).

Works on uvloop (the gateway's loop) and on the stock asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
import ssl
import struct
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from svidgate.gateway.heap import HeapTrimmer
from svidgate.gateway.http1 import (
    Admission,
    Counters,
    H1Connection,
    Handler,
    Limits,
    Refused,
)
from svidgate.gateway.http2 import H2Limits, H2ServerConnection

log = logging.getLogger("svidgate.gateway.listener")

P = TypeVar("P")
Connection = H1Connection[P] | H2ServerConnection[P]
Identify = Callable[[asyncio.BaseTransport], Admission[P]]
HandshakeFailed = Callable[[object, BaseException], None]  # (peer address, what failed)
ACCEPT_BATCH = 64  # connections accepted per wake-up of the listening socket
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_RETRY_ACCEPT = 0.1  # seconds without accepting after running out of file descriptors


class Listener(Generic[P]):
    """One worker's TLS listener on an already bound, listening, non-blocking socket."""

    def __init__(
        self,
        sock: socket.socket,
        ssl_context: ssl.SSLContext,
        handler: Handler[P],
        identify: Identify[P],
        limits: Limits | None = None,
        *,
        on_close: Callable[[P], None] | None = None,
        h2_limits: H2Limits | None = None,
        on_handshake_failure: HandshakeFailed | None = None,
    ) -> None:
        """``on_close(peer)`` is called once for every admission ``identify`` returned, when
        its connection ends (or at once, when the per-identity cap refuses it);
        ``on_handshake_failure(address, exc)`` for every failed (or timed out) handshake."""
        self._sock = sock
        self._ssl = ssl_context
        self._handler = handler
        self._identify = identify
        self._on_close = on_close
        self._on_handshake_failure = on_handshake_failure
        self._limits = limits or Limits()
        self._h2_limits = h2_limits or H2Limits()
        self._counters = Counters()
        self._connections: set[Connection[P]] = set()
        self._keys: dict[Connection[P], Hashable] = {}
        self._per_key: dict[Hashable, int] = {}
        # in progress, oldest first: the oldest gives way when max_handshakes is reached
        self._handshakes: dict[H1Connection[P], asyncio.Task[None]] = {}
        self._silent_ones: dict[H1Connection[P], tuple[socket.socket, asyncio.TimerHandle]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._heap: HeapTrimmer | None = None  # gives a burst's memory back once it is over
        self._accepting = False
        self._resume: asyncio.TimerHandle | None = None
        self._all_closed: asyncio.Event | None = None  # set during shutdown

    # ConnectionOwner
    @property
    def limits(self) -> Limits:
        return self._limits

    @property
    def h2_limits(self) -> H2Limits:
        return self._h2_limits

    @property
    def counters(self) -> Counters:
        return self._counters

    @property
    def handler(self) -> Handler[P]:
        return self._handler

    @property
    def port(self) -> int:
        port: int = self._sock.getsockname()[1]
        return port

    @property
    def open_connections(self) -> int:
        """Connections from accept to close, half-open handshakes included."""
        return len(self._connections)

    def connections_of(self, key: Hashable) -> int:
        return self._per_key.get(key, 0)

    # -- accepting --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start accepting (call from the event loop that serves the connections)."""
        self._loop = asyncio.get_running_loop()
        self._heap = HeapTrimmer(self._loop)
        self._accepting = True
        self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                log.warning("accept failed (%s): pausing accepts", errno.errorcode[exc.errno])
                self._pause_accepting()
                return
            self._accept(sock)

    def _pause_accepting(self) -> None:
        assert self._loop is not None
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(_RETRY_ACCEPT, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._accepting and self._loop is not None:
            self._loop.add_reader(self._sock.fileno(), self._on_readable)

    def _accept(self, sock: socket.socket) -> None:
        if len(self._connections) >= self._limits.max_connections:
            self._counters.over_capacity += 1
            _reset(sock)
            return
        sock.setblocking(False)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn: H1Connection[P] = H1Connection(self)
        self._connections.add(conn)
        self._counters.accepted += 1
        if self._heap is not None:
            self._heap.opened(len(self._connections))
        # TLS state (≈ 50 KiB with uvloop) is allocated only once the client speaks: until its
        # first byte a connection holds the socket, a reader and one timer.
        loop = self._loop
        assert loop is not None
        deadline = loop.time() + self._limits.handshake_timeout
        try:
            spoke = sock.recv(1, socket.MSG_PEEK)  # the ClientHello is often in already
        except (BlockingIOError, InterruptedError):
            spoke = None
        except OSError:
            spoke = b""
        if spoke:  # no reader, no timer: straight to the handshake
            self._handshake_now(conn, sock, deadline)
            return
        if spoke is not None:  # closed or reset before a byte
            self._counters.handshake_failed += 1
            _reset(sock)
            self.forget(conn)
            return
        timer = loop.call_at(deadline, self._silent, conn)
        self._silent_ones[conn] = (sock, timer)
        loop.add_reader(sock.fileno(), self._spoke, conn, deadline)

    def _spoke(self, conn: H1Connection[P], deadline: float) -> None:
        """The client's first bytes (its ClientHello) are there: run the TLS handshake."""
        sock, timer = self._silent_ones.pop(conn)
        timer.cancel()
        assert self._loop is not None
        self._loop.remove_reader(sock.fileno())
        self._handshake_now(conn, sock, deadline)

    def _handshake_now(self, conn: H1Connection[P], sock: socket.socket, deadline: float) -> None:
        loop = self._loop
        assert loop is not None
        remaining = max(deadline - loop.time(), 0.01)
        handshakes = self._handshakes
        if len(handshakes) >= self._limits.max_handshakes:
            oldest = next(iter(handshakes))
            handshakes.pop(oldest).cancel()  # its socket is closed, it counts as failed
        task = loop.create_task(self._handshake(conn, sock, remaining))
        handshakes[conn] = task
        task.add_done_callback(lambda _t: handshakes.pop(conn, None))

    def _silent(self, conn: H1Connection[P]) -> None:
        """No ClientHello within the handshake timeout: reset and forget."""
        sock, _timer = self._silent_ones.pop(conn)
        assert self._loop is not None
        self._loop.remove_reader(sock.fileno())
        self._counters.handshake_failed += 1
        if self._on_handshake_failure is not None:
            self._on_handshake_failure(_peer(sock), TimeoutError("no ClientHello in time"))
        _reset(sock)
        self.forget(conn)

    async def _handshake(self, conn: H1Connection[P], sock: socket.socket, seconds: float) -> None:
        assert self._loop is not None
        done = False
        peer = _peer(sock) if self._on_handshake_failure is not None else None
        try:
            await self._loop.connect_accepted_socket(
                lambda: _AlpnChoice(self, conn),
                sock,
                ssl=self._ssl,
                ssl_handshake_timeout=seconds,
                # A closing connection waits this long at most for the peer's close_notify.
                ssl_shutdown_timeout=self._limits.handshake_timeout,
            )
            done = True
        except asyncio.CancelledError:  # given way to a newer handshake, or shutting down
            self._counters.handshake_failed += 1
            raise
        except Exception as exc:
            # The transport closed the socket. The hook logs it (rate-limited: scanners and
            # clients without a certificate are routine).
            self._counters.handshake_failed += 1
            if self._on_handshake_failure is not None:
                self._on_handshake_failure(peer, exc)
        finally:
            if not done:
                self.forget(conn)

    # -- admission (ConnectionOwner) ----------------------------------------------------------

    def admit(self, conn: Connection[P], transport: asyncio.BaseTransport) -> Admission[P] | None:
        try:
            admission = self._identify(transport)
        except Refused as exc:
            self._counters.identity_refused += 1
            log.debug("connection refused: %s", exc)
            return None
        except Exception:
            self._counters.identity_refused += 1
            log.exception("the identity check failed: connection refused")
            return None
        key = admission.key
        count = self._per_key.get(key, 0)
        if count >= self._limits.max_connections_per_identity:
            self._counters.identity_over_cap += 1
            if self._on_close is not None:
                self._on_close(admission.peer)
            return None
        self._per_key[key] = count + 1
        self._keys[conn] = key
        return admission

    def to_h2(self, conn: H1Connection[P]) -> H2ServerConnection[P]:
        """The connection negotiated h2: an HTTP/2 connection takes its place."""
        h2conn: H2ServerConnection[P] = H2ServerConnection(self)
        self._connections.discard(conn)
        self._connections.add(h2conn)
        return h2conn

    def forget(self, conn: Connection[P]) -> None:
        self._connections.discard(conn)
        if self._heap is not None:
            self._heap.closed(len(self._connections))
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()
        key = self._keys.pop(conn, None)
        if key is None:
            return
        info = conn.info
        if self._on_close is not None and info is not None:
            self._on_close(info.peer)
        left = self._per_key[key] - 1
        if left:
            self._per_key[key] = left
        else:
            del self._per_key[key]

    # -- stopping ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting; the listening socket is closed. Open connections keep going."""
        if self._accepting and self._loop is not None:
            self._accepting = False
            self._loop.remove_reader(self._sock.fileno())
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._heap is not None:
            self._heap.cancel()
        self._sock.close()

    async def shutdown(self, drain_seconds: float) -> None:
        """Drain: stop accepting, close idle connections, let in-flight requests finish (their
        responses say ``Connection: close``) for up to ``drain_seconds``, then cut the rest."""
        self.close()
        for task in list(self._handshakes.values()):
            task.cancel()
        for half_open in list(self._silent_ones):
            self._silent(half_open)
        self._all_closed = asyncio.Event()
        for conn in list(self._connections):
            conn.shutdown()
        if self._connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_seconds):
                    await self._all_closed.wait()
        for conn in list(self._connections):
            conn.abort()
        if self._handshakes:
            await asyncio.gather(*self._handshakes.values(), return_exceptions=True)


class _AlpnChoice(asyncio.Protocol, Generic[P]):
    """The protocol during the handshake: once it is done, the core ALPN chose takes the
    transport (HTTP/2 for ``h2``, else the HTTP/1.1 connection made at accept)."""

    __slots__ = ("_conn", "_listener")

    def __init__(self, listener: Listener[P], conn: H1Connection[P]) -> None:
        self._listener = listener
        self._conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        chosen: asyncio.Protocol = self._conn
        if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
            chosen = self._listener.to_h2(self._conn)
        transport.set_protocol(chosen)
        chosen.connection_made(transport)


def _peer(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return None


def _reset(sock: socket.socket) -> None:
    """Close with RST: nothing lingers for a connection that is refused outright."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def _peername(sock: socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:
        return None
