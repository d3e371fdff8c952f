"""The signer process: grpc.aio servers on a Unix socket and/or TCP with mTLS, health,
reflection, the key store's background loop, TLS reload, graceful shutdown on SIGTERM/SIGINT.

Each listener has its own grpc.aio server (same servicers, same event loop) with the options of
:func:`svidgate.signer.limits.server_options`: a flood of TCP connections or RPCs fills the TCP
server's connection and RPC budget, never the Unix socket's. At start the soft file descriptor
limit is raised to the hard limit.

The Unix socket is made without a window for a path swap: the directory that will hold it must
belong to the signer's user (or root) and be writable by no one else, unless it is sticky (only
the owner may then remove or rename an entry) or ``listen.unix_shared_dir`` accepts it; the
socket is bound inside a fresh 0700 directory made next to the target (:func:`tempfile.mkdtemp`,
so nobody else can reach the path), gets its mode there, and is then ``rename``-d over the target
path. rename(2) replaces the name itself, a symlink planted there included, and never follows it,
so no chmod ever lands on somebody else's file. On shutdown the socket is removed only while
the path is still the socket this process made.

Health (grpc.health.v1): ``""`` and ``svidgate.signer.v1.Signer`` are SERVING while the signer
can verify (it has keys, cached or fresh) and NOT_SERVING only when it cannot; the degraded
parts are reported separately: ``svidgate.signer.v1.Signer.Sign`` (signing possible) and
``svidgate.signer.v1.Signer.KeySource`` (the last source read succeeded).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from svidgate.signer.config import ListenConfig, SignerConfig, TlsConfig
from svidgate.signer.discovery import DiscoveryServer
from svidgate.signer.keystore import KeyStore
from svidgate.signer.limits import raise_fd_limit, server_options
from svidgate.signer.service import GuardedHealth, GuardedReflection, SignerService
from svidgate.signer.sources import KeySource
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc

from svidgate import logs
from svidgate.config import ConfigError
from svidgate.workload_api import WorkloadApiUnavailable, X509Watcher, endpoint

if TYPE_CHECKING:
    from svidgate.signer.admin import SignerMetrics

    from svidgate.admin_http import AdminServer
    from svidgate.tracing import Tracing

log = logging.getLogger("svidgate.signer")
SERVICE_NAME = signer_pb2.DESCRIPTOR.services_by_name["Signer"].full_name
HEALTH_SIGN = f"{SERVICE_NAME}.Sign"
HEALTH_SOURCE = f"{SERVICE_NAME}.KeySource"
SHUTDOWN_GRACE = 5.0
MAX_SOCKET_PATH = 107  # bytes in sockaddr_un.sun_path, without the terminating NUL


def build_source(cfg: SignerConfig) -> KeySource:
    """The configured key source (Vault sources get an authenticated client lazily)."""
    keys = cfg.keys
    if keys.source == "file":
        from svidgate.signer.sources.file import FileKeySource

        assert keys.dir is not None
        return FileKeySource(keys.dir, keys.algorithm)
    from svidgate.signer.sources.vault_kv import VaultKvKeySource
    from svidgate.signer.sources.vault_transit import VaultTransitKeySource
    from svidgate.signer.vault import VaultClient

    assert keys.vault is not None
    client = VaultClient(keys.vault)
    if keys.source == "vault-kv":
        return VaultKvKeySource(client, keys.algorithm)
    return VaultTransitKeySource(client, keys.algorithm, cfg.rotation.prepare_ahead)


def _start_watcher(tls: TlsConfig) -> X509Watcher:
    """Connect to the Workload API; ConfigError (one line, exit 2) when it sends nothing."""
    try:
        watcher = X509Watcher(endpoint(tls.workload_api.socket))
        watcher.start(tls.workload_api.timeout.total_seconds())
    except WorkloadApiUnavailable as exc:
        raise ConfigError(f"tls.workload_api: {exc}") from None
    return watcher


class TlsCredentials:
    """Server certificate + client CA bundle, reloaded on file change without a restart.

    grpc calls :meth:`fetch` before every handshake, so it only hands over a configuration
    that :meth:`poll` already built and validated; a broken new file keeps the old state.
    With ``tls.source: workload_api`` the SVID and the bundle of the signer's own trust domain
    come from the agent (:class:`~svidgate.workload_api.X509Watcher`); :meth:`poll` stages
    each new update the same way."""

    def __init__(self, tls: TlsConfig, trust_domain: str = "") -> None:
        self.tls = tls
        self.trust_domain = trust_domain
        self.watcher: X509Watcher | None = None
        self._serial = 0
        self._stamp = self._files_stamp()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        if tls.source == "workload_api":
            self.watcher = _start_watcher(tls)
        self.initial = self._build()
        self.reloads = 0

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()

    def _files_stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in (self.tls.cert, self.tls.key, self.tls.bundle):
            if path is None:
                continue
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0))
        return tuple(out)

    def _read(self) -> tuple[bytes, bytes, bytes]:
        """(chain, key, bundle) PEM from the files or the Workload API's latest update."""
        if self.watcher is not None:
            material = self.watcher.current
            self._serial = material.serial
            roots = material.bundles.get(self.trust_domain, ())
            bundle = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in roots)
            if not bundle:
                raise ConfigError(f"tls.workload_api: no bundle for {self.trust_domain} from it")
            return material.chain_pem(), material.key_pem, bundle
        assert self.tls.cert and self.tls.key and self.tls.bundle  # config rules: source files
        try:
            return (
                self.tls.cert.read_bytes(),
                self.tls.key.read_bytes(),
                self.tls.bundle.read_bytes(),
            )
        except OSError as exc:
            raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None

    def _build(self) -> grpc.ServerCertificateConfiguration:
        chain, key_pem, bundle = self._read()
        try:
            leaf = x509.load_pem_x509_certificates(chain)[0]
            key = serialization.load_pem_private_key(key_pem, password=None)
            roots = x509.load_pem_x509_certificates(bundle)
        except ValueError as exc:
            raise ConfigError(f"tls: unreadable certificate, key or bundle ({exc})") from None
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise ConfigError("tls.key does not match tls.cert")
        if not roots:
            raise ConfigError("tls.bundle holds no certificate")
        pairs = [(key_pem, chain)]
        return grpc.ssl_server_certificate_configuration(pairs, root_certificates=bundle)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial,
            self.fetch,  # type: ignore[arg-type]  # None = keep the current configuration
            require_client_authentication=True,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        pending, self._pending = self._pending, None
        return pending

    def poll(self) -> bool:
        """Rebuild when a file changed (or the Workload API sent an update); True when a new
        configuration was staged."""
        stamp = self._files_stamp()
        if self.watcher is not None:
            if self.watcher.current.serial == self._serial:
                return False
        elif stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self._pending = self._build()
        except ConfigError as exc:
            log.error("TLS reload failed, keeping the previous certificate: %s", exc)
            return False
        self.reloads += 1
        log.info("TLS certificate/bundle reloaded")
        return True


def _socket_in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def check_socket_dir(directory: Path, *, shared: bool) -> None:
    """ConfigError unless only the signer's user (or root) can replace entries of
    ``directory``: owned by that user or root, and not writable by group or others unless it is
    sticky or ``shared`` (``listen.unix_shared_dir``)."""
    st = directory.stat()
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(
            f"listen.unix: {directory} belongs to uid {st.st_uid}, not to the signer's user "
            f"(uid {os.geteuid()}) or root: its owner could replace the socket"
        )
    if mode & 0o022 and not mode & stat.S_ISVTX and not shared:
        raise ConfigError(
            f"listen.unix: {directory} is writable by other users (mode {mode:04o}): anyone who "
            f"can write there could replace the socket; use a directory only the signer's user "
            f"can write to, or set listen.unix_shared_dir (a Kubernetes emptyDir)"
        )


def _clear_target(path: Path) -> None:
    """A stale socket (its process died) is left for the rename to replace; a live one, or
    anything that is not a socket, is refused."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"listen.unix: {path} exists and is not a socket")
    if _socket_in_use(path):
        raise ConfigError(f"listen.unix: {path} is in use (is another signer running?)")


class UnixSocket:
    """The signer's socket file: bound in a private directory, renamed into place."""

    def __init__(self, listen: ListenConfig) -> None:
        assert listen.unix is not None
        self.path = listen.unix
        self.mode = listen.unix_mode
        self.shared_dir = listen.unix_shared_dir
        self._staging: Path | None = None
        self._identity: tuple[int, int] | None = None

    def bind(self, server: grpc.aio.Server) -> None:
        """Check the directory and the path, then bind the socket in a fresh 0700 directory."""
        directory = self.path.parent
        try:
            directory.mkdir(mode=0o755, parents=True, exist_ok=True)  # the socket's mode guards it
            check_socket_dir(directory, shared=self.shared_dir)
            _clear_target(self.path)
            self._staging = Path(tempfile.mkdtemp(prefix=".sg", dir=directory))
        except OSError as exc:
            raise ConfigError(f"listen.unix: {exc.filename or directory}: {exc.strerror}") from None
        staged = self._staging / "s"
        if len(os.fsencode(staged)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"listen.unix: {directory} is too long a directory for a socket (the signer "
                f"binds first at {staged}: {len(os.fsencode(staged))} bytes, at most "
                f"{MAX_SOCKET_PATH})"
            )
        old_umask = os.umask(0o177)  # the socket file is born private
        try:
            server.add_insecure_port(f"unix:{staged}")
        except RuntimeError:
            raise ConfigError(f"listen.unix: cannot bind a socket in {directory}") from None
        finally:
            os.umask(old_umask)

    def publish(self) -> None:
        """Give the bound socket its mode and rename it over the configured path."""
        assert self._staging is not None
        staged = self._staging / "s"
        try:
            os.chmod(staged, self.mode)  # inside a 0700 directory nobody else can swap the path
            st = staged.lstat()
            os.rename(staged, self.path)
        except OSError as exc:
            where = f"listen.unix: cannot put the socket at {self.path}"
            raise ConfigError(f"{where}: {exc.strerror}") from None
        finally:
            self._remove_staging()
        self._identity = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        """Unlink the socket if the path is still ours; drop the staging directory."""
        self._remove_staging()
        if self._identity is None:
            return
        with contextlib.suppress(OSError):
            st = self.path.lstat()
            if (st.st_dev, st.st_ino) == self._identity:
                self.path.unlink()
        self._identity = None

    def _remove_staging(self) -> None:
        staging, self._staging = self._staging, None
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


class SignerServer:
    """Owns the grpc servers (one per listener), the key store and the background tasks."""

    def __init__(self, cfg: SignerConfig, *, source: KeySource | None = None) -> None:
        self.cfg = cfg
        self.store = KeyStore(source or build_source(cfg), cfg)
        self.service = SignerService(self.store, cfg)
        self.health = GuardedHealth(self.service)
        # metrics and the admin listener only with admin_listen (aiohttp and prometheus_client
        # are not even imported without it: a signer starts as fast as before)
        self.metrics: SignerMetrics | None = None
        self._interceptors: list[Any] = []
        if cfg.admin_listen is not None:
            from svidgate.signer.admin import RpcMetrics, SignerMetrics

            self.metrics = SignerMetrics(self.store)
            self._interceptors.append(RpcMetrics(self.metrics))
        self.admin: AdminServer | None = None
        self.admin_port: int | None = None
        self.stopping = False
        self.tls = TlsCredentials(cfg.tls, str(cfg.trust_domain)) if cfg.tls is not None else None
        self.tcp_port: int | None = None
        self.unix = UnixSocket(cfg.listen) if cfg.listen.unix is not None else None
        self._servers: dict[str, grpc.aio.Server] = {}
        self.discovery = DiscoveryServer(cfg, self.store) if cfg.discovery is not None else None
        self._tasks: list[asyncio.Task[None]] = []
        self.tracing: Tracing | None = None
        if cfg.tracing is not None:
            from svidgate.tracing import Tracing

            self.tracing = Tracing(cfg.tracing, "signer")
        if self.unix is not None:
            self._servers["unix"] = self._server(tcp=False)
        if cfg.listen.tcp is not None:
            self._servers["tcp"] = self._server(tcp=True)

    def _server(self, *, tcp: bool) -> grpc.aio.Server:
        limits = self.cfg.limits
        # none at all unless admin_listen or tracing asks: grpc's interceptor path is not free
        interceptors = list(self._interceptors)
        if self.tracing is not None:
            from svidgate.signer.rpc_spans import RpcSpans

            interceptors.append(RpcSpans(self.tracing))
        server = grpc.aio.server(
            options=server_options(limits, tcp=tcp),
            maximum_concurrent_rpcs=limits.rpcs,
            interceptors=interceptors or None,
        )
        signer_pb2_grpc.add_SignerServicer_to_server(self.service, server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            GuardedReflection(self.service, names), server
        )
        return server

    async def start(self) -> None:
        if self.unix is not None:  # first: a refused socket path is the only line on stderr
            self.unix.bind(self._servers["unix"])
        fds = raise_fd_limit()
        log.info("file descriptors: soft limit %d -> %d (hard %d)", fds.before, fds.after, fds.hard)
        for name in ("", SERVICE_NAME, HEALTH_SIGN, HEALTH_SOURCE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = self.cfg.tcp_address()
        if address is not None:
            assert self.tls is not None
            host, port = address
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.tcp_port = self._servers["tcp"].add_secure_port(target, self.tls.credentials())
            if self.tcp_port == 0:
                raise ConfigError(f"listen.tcp: cannot listen on {self.cfg.listen.tcp}")
        for server in self._servers.values():
            await server.start()
        if self.unix is not None:
            self.unix.publish()
        self.store.start()
        if self.discovery is not None:
            await self.discovery.start()
        self._tasks.append(asyncio.create_task(self._health_loop(), name="signer-health"))
        await self._start_admin()
        if self.tls is not None:
            self._tasks.append(asyncio.create_task(self._tls_loop(), name="signer-tls"))
        log.info(
            "signer listening (unix=%s tcp=%s, keys=%s)",
            self.cfg.listen.unix,
            self.tcp_port,
            self.store.source.description,
        )

    async def _start_admin(self) -> None:
        """``admin_listen``: /healthz, /readyz, /metrics over plain HTTP."""
        if self.cfg.admin_listen is None or self.metrics is None:
            return
        from svidgate.signer.admin import admin_server, readiness

        self.admin = admin_server(
            self.cfg.admin_listen,
            self.metrics,
            lambda: readiness(self.store, lambda: self.stopping),
        )
        try:
            self.admin_port = await self.admin.start()
        except OSError as exc:
            where = f"admin_listen: cannot listen on {self.cfg.admin_listen}"
            raise ConfigError(f"{where}: {exc.strerror}") from None
        watch = self.metrics.watch_active_key()
        self._tasks.append(asyncio.create_task(watch, name="signer-active-key"))
        log.info("signer admin listening on %s (port %d)", self.cfg.admin_listen, self.admin_port)

    async def _health_loop(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        last: dict[str, int] = {}
        while True:
            wanted = {
                "": serving if self.store.can_verify else not_serving,
                SERVICE_NAME: serving if self.store.can_verify else not_serving,
                HEALTH_SIGN: serving if self.store.can_sign else not_serving,
                HEALTH_SOURCE: serving if self.store.source_healthy else not_serving,
            }
            for name, status in wanted.items():
                if last.get(name) != status:
                    await self.health.set(name, status)
            last = wanted
            await asyncio.sleep(0.1)

    async def _tls_loop(self) -> None:
        assert self.tls is not None
        while True:
            await asyncio.sleep(1.0)
            await asyncio.to_thread(self.tls.poll)

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        self.stopping = True  # /readyz: 503 from now on
        await self.health.enter_graceful_shutdown()
        await self.store.end_watches()
        if self.discovery is not None:
            await self.discovery.stop()
        await asyncio.gather(*(server.stop(grace) for server in self._servers.values()))
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()
        if self.tls is not None:
            self.tls.close()
        if self.unix is not None:
            self.unix.remove()
        if self.admin is not None:
            await self.admin.close()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)


async def serve(cfg: SignerConfig, *, stop: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stop`` is set), then shut down gracefully."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    server = SignerServer(cfg)
    try:
        await server.start()
        await stop.wait()
        log.info("signer shutting down")
    finally:
        await server.stop()
        for sig in installed:
            loop.remove_signal_handler(sig)


def run(cfg: SignerConfig) -> int:
    """Blocking entry point for ``svidgate signer serve`` (uvloop when available)."""
    logs.configure("signer", fd=sys.stderr.fileno())
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
    return 0
