"""Running the gateway: listeners (SO_REUSEPORT), reload on SIGHUP / file change, SIGTERM drain,
and N worker processes sharing the port.

:class:`GatewayServer` is one worker; tests run it in-process. :func:`run` is what
``svidgate gateway serve`` calls: one worker in-process, or a small supervisor that forks
``workers`` processes and forwards SIGHUP / SIGTERM to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

from svidgate.gateway.admin import Metrics, admin_app
from svidgate.gateway.app import GatewayApp, Peer
from svidgate.gateway.config import LimitsConfig, load_config
from svidgate.gateway.credentials import StateHolder
from svidgate.gateway.handshake import handshake_failure_reason
from svidgate.gateway.http1 import Limits
from svidgate.gateway.http2 import H2Limits
from svidgate.gateway.listener import Listener
from svidgate.gateway.workers import enable_multiprocess, metrics_directory, worker_exited

from svidgate import logs
from svidgate.admin_http import AdminServer
from svidgate.cli import report_user_error, user_error_types
from svidgate.config import parse_host_port
from svidgate.logs import emit

log = logging.getLogger("svidgate.gateway")

LISTEN_BACKLOG = 1024


def listening_socket(address: str) -> socket.socket:
    """A TCP socket bound with SO_REUSEPORT so several workers can share the port."""
    host, port = parse_host_port(address, any_port=True)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def core_limits(cfg: LimitsConfig, write_timeout: float) -> Limits:
    """The HTTP/1.1 core's limits from ``gateway.yaml``'s ``limits:`` (times in seconds)."""
    return Limits(
        max_connections=cfg.max_connections,
        max_connections_per_identity=cfg.max_connections_per_identity,
        handshake_timeout=cfg.handshake_timeout.total_seconds(),
        header_timeout=cfg.header_timeout.total_seconds(),
        idle_timeout=cfg.idle_timeout.total_seconds(),
        max_header_bytes=cfg.max_header_bytes,
        max_headers=cfg.max_headers,
        max_body_bytes=cfg.max_body_bytes,
        body_timeout=cfg.body_timeout.total_seconds(),
        write_timeout=write_timeout,
    )


class GatewayServer:
    """One gateway worker: the TLS listener, the admin listener, reload and drain."""

    def __init__(
        self, config_path: Path, *, admin: bool = True, metrics_dir: Path | None = None
    ) -> None:
        self.config_path = Path(config_path)
        self.holder = StateHolder(self.config_path)
        self.metrics = Metrics(metrics_dir)
        cfg = self.holder.current.config
        signer = None
        if cfg.signer is not None:
            from svidgate.gateway.signer_client import SignerClient

            signer = SignerClient.from_config(cfg.signer)
        self.app = GatewayApp(self.holder, self.metrics, signer)
        if cfg.tracing is not None:  # only then is opentelemetry imported
            from svidgate.tracing import Tracing

            self.app.tracing = Tracing(cfg.tracing, "gateway")
        self._want_admin = admin and cfg.admin_listen is not None
        self.listener: Listener[Peer] | None = None
        self._admin: AdminServer | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._publish_task: asyncio.Task[None] | None = None
        self.port = 0
        self.admin_port = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        state = self.holder.current
        self.holder.attach(loop)  # Workload API updates (if used) now reach the loop
        await self.app.start()
        cfg = state.config
        # One write timeout per listener: the shortest any upstream asks for (a client that
        # does not read its response holds an upstream connection meanwhile).
        write_timeout = min(
            (u.timeouts.write.total_seconds() for u in cfg.upstreams.values()), default=30.0
        )
        sock = listening_socket(cfg.listen)
        self.listener = Listener(
            sock,
            state.ssl_context,
            self.app.handle,
            self.app.identify,
            core_limits(cfg.limits, write_timeout),
            on_close=self.app.connection_closed,
            h2_limits=H2Limits(
                max_concurrent_streams=cfg.limits.h2.max_concurrent_streams,
                max_header_list_bytes=cfg.limits.h2.max_header_list_bytes,
            ),
            on_handshake_failure=self._handshake_failed,
        )
        self.listener.start()
        listener = self.listener
        self.metrics.watch_listener(
            lambda: (listener.open_connections, listener.counters.snapshot())
        )
        if self.metrics.multiprocess_dir is not None:  # another worker may serve the scrape
            self._publish_task = loop.create_task(self.metrics.publish_forever())
        self.app.listener = self.listener
        self.port = self.listener.port
        if self._want_admin and state.config.admin_listen is not None:
            app = admin_app(self.metrics, self.app.readiness)
            self._admin = AdminServer(app, state.config.admin_listen)
            self.admin_port = await self._admin.start()
        interval = state.config.reload_interval.total_seconds()
        if interval > 0:
            self._watch_task = loop.create_task(self._watch_files(interval))
        emit(
            log,
            "listening",
            address=state.config.listen,
            port=self.port,
            admin_port=self.admin_port or None,
            pid=os.getpid(),
        )

    def _handshake_failed(self, peer: object, exc: BaseException) -> None:
        """A TLS handshake failed: counted by reason, and logged (rate-limited)."""
        self.metrics.handshake_failure(handshake_failure_reason(exc)).inc()
        self.app.handshake_failed(peer, exc)

    def reload(self) -> bool:
        ok = self.holder.reload()
        self.metrics.reloads.labels("ok" if ok else "failed").inc()
        return ok

    async def _watch_files(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.holder.changed():
                self.reload()

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Not ready → stop accepting → let in-flight requests finish (up to the deadline)."""
        if drain_timeout is None:
            drain_timeout = self.holder.current.config.drain_timeout.total_seconds()
        self.app.draining = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        if self.listener is not None:
            await self.listener.shutdown(drain_timeout)
        await self.app.close()
        self.holder.close()
        if self._publish_task is not None:
            self._publish_task.cancel()
            self.metrics.publish()  # the last figures of this worker
        if self._admin is not None:
            await self._admin.close()
        if self.app.tracing is not None:
            await asyncio.to_thread(self.app.tracing.shutdown)


async def serve_worker(
    config_path: Path, *, admin: bool = True, metrics_dir: Path | None = None
) -> int:
    """Run one worker until SIGTERM / SIGINT; SIGHUP reloads. Returns the exit code."""
    loop = asyncio.get_running_loop()
    server = GatewayServer(config_path, admin=admin, metrics_dir=metrics_dir)
    await server.start()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await stop.wait()
    emit(log, "draining", pid=os.getpid())
    await server.stop()
    emit(log, "stopped", pid=os.getpid())
    return 0


def configure_logging() -> None:
    """The shared schema on stderr (:mod:`svidgate.logs`), written by a background thread
    through a bounded queue, never on the event loop."""
    logs.configure("gateway", fd=sys.stderr.fileno())
    logging.getLogger("aiohttp").setLevel(logging.WARNING)


def _run_loop(config_path: Path, *, admin: bool, metrics_dir: Path | None = None) -> int:
    factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(serve_worker(config_path, admin=admin, metrics_dir=metrics_dir))


def run(config_path: Path) -> int:
    """``svidgate gateway serve``: validate once, then one worker or a supervisor of N."""
    configure_logging()
    workers = load_config(config_path).workers
    if workers == 1:
        holder = StateHolder(Path(config_path))  # fail fast with a clear one-line error
        holder.close()
        del holder
        return _run_loop(Path(config_path), admin=True)
    code = _check_in_child(Path(config_path))
    if code != 0:
        return code
    with metrics_directory() as metrics_dir:
        return _supervise(Path(config_path), workers, metrics_dir)


def _check_in_child(config_path: Path) -> int:
    """Build the state once (certificates, bundles, the Workload API's SVID) in a short-lived
    child, which reports a problem in one stderr line; returns its exit code. The supervisor
    itself never opens a gRPC channel (the Workload API client is one): gRPC does not survive
    ``fork``, and a worker forked from a process that had used it can hang at start-up."""
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            StateHolder(config_path).close()
            code = 0
        except user_error_types() as exc:
            code = report_user_error(exc)
        except BaseException as exc:
            print(f"svidgate: internal error: {type(exc).__name__}", file=sys.stderr)
        finally:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _supervise(config_path: Path, workers: int, metrics_dir: Path) -> int:
    """Fork ``workers`` processes (worker 0 also serves the admin listener, whose /metrics sums
    every worker's files in ``metrics_dir``) and forward SIGHUP / SIGTERM / SIGINT; a worker
    that dies unexpectedly is restarted (at most 1/s)."""
    children: dict[int, int] = {}  # pid -> index
    stopping = False

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # child
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                enable_multiprocess()
                code = _run_loop(config_path, admin=index == 0, metrics_dir=metrics_dir)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()  # os._exit skips atexit: write out what is pending
                os._exit(code)
        children[pid] = index

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(workers):
        spawn(index)
    last_restart = 0.0
    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries os.wait
            continue
        if pid not in children:
            continue
        index = children.pop(pid)
        worker_exited(metrics_dir, pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            exit_code = exit_code or (code if code > 0 else 0)
            continue
        log.error("worker %d (pid %d) exited with %d; restarting", index, pid, code)
        wait = 1.0 - (time.monotonic() - last_restart)
        if wait > 0:
            time.sleep(wait)
        last_restart = time.monotonic()
        spawn(index)
    return exit_code
