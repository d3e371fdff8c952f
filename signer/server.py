"""The signer process: grpc.aio server on a Unix socket and/or TCP with mTLS, health,
reflection, the key store's background loop, TLS reload, graceful shutdown on SIGTERM/SIGINT.

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
import signal
import socket
import stat
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from svidgate.signer.config import SignerConfig, TlsConfig
from svidgate.signer.keystore import KeyStore
from svidgate.signer.service import SignerService
from svidgate.signer.sources import KeySource
from svidgate.signer.v1 import signer_pb2, signer_pb2_grpc

from svidgate.config import ConfigError

log = logging.getLogger("svidgate.signer")
SERVICE_NAME = signer_pb2.DESCRIPTOR.services_by_name["Signer"].full_name
HEALTH_SIGN = f"{SERVICE_NAME}.Sign"
HEALTH_SOURCE = f"{SERVICE_NAME}.KeySource"
SHUTDOWN_GRACE = 5.0


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


class TlsCredentials:
    """Server certificate + client CA bundle, reloaded on file change without a restart.

    grpc calls :meth:`fetch` before every handshake, so it only hands over a configuration
    that :meth:`poll` already built and validated; a broken new file keeps the old state."""

    def __init__(self, tls: TlsConfig) -> None:
        self.tls = tls
        self._stamp = self._files_stamp()
        self._pending: grpc.ServerCertificateConfiguration | None = None
        self.initial = self._build()
        self.reloads = 0

    def _files_stamp(self) -> tuple[tuple[int, int], ...]:
        out = []
        for path in (self.tls.cert, self.tls.key, self.tls.bundle):
            try:
                st = path.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0))
        return tuple(out)

    def _build(self) -> grpc.ServerCertificateConfiguration:
        try:
            chain = self.tls.cert.read_bytes()
            key_pem = self.tls.key.read_bytes()
            bundle = self.tls.bundle.read_bytes()
        except OSError as exc:
            raise ConfigError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
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
        """Rebuild when a file changed; True when a new configuration was staged."""
        stamp = self._files_stamp()
        if stamp == self._stamp:
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


def _listen_unix(server: grpc.aio.Server, path: Path) -> None:
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"listen.unix: {path} exists and is not a socket")
        if _socket_in_use(path):
            raise ConfigError(f"listen.unix: {path} is in use (is another signer running?)")
        path.unlink()  # a stale socket from a process that died
    server.add_insecure_port(f"unix:{path}")


class SignerServer:
    """Owns the grpc server, the key store and the background tasks."""

    def __init__(self, cfg: SignerConfig, *, source: KeySource | None = None) -> None:
        self.cfg = cfg
        self.store = KeyStore(source or build_source(cfg), cfg)
        self.server = grpc.aio.server()
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self.tls = TlsCredentials(cfg.tls) if cfg.tls is not None else None
        self.tcp_port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._owns_socket = False
        servicer = SignerService(self.store, cfg)
        signer_pb2_grpc.add_SignerServicer_to_server(servicer, self.server)  # type: ignore[no-untyped-call]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    async def start(self) -> None:
        for name in ("", SERVICE_NAME, HEALTH_SIGN, HEALTH_SOURCE):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        unix = self.cfg.listen.unix
        if unix is not None:
            unix.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        old_umask = os.umask(0o177)  # the socket file is born private, then gets its mode
        try:
            if unix is not None:
                _listen_unix(self.server, unix)
                self._owns_socket = True
        finally:
            os.umask(old_umask)
        address = self.cfg.tcp_address()
        if address is not None:
            assert self.tls is not None
            host, port = address
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            self.tcp_port = self.server.add_secure_port(target, self.tls.credentials())
            if self.tcp_port == 0:
                raise ConfigError(f"listen.tcp: cannot listen on {self.cfg.listen.tcp}")
        await self.server.start()
        if unix is not None:
            os.chmod(unix, self.cfg.listen.unix_mode)
        self.store.start()
        self._tasks.append(asyncio.create_task(self._health_loop(), name="signer-health"))
        if self.tls is not None:
            self._tasks.append(asyncio.create_task(self._tls_loop(), name="signer-tls"))
        log.info(
            "signer listening (unix=%s tcp=%s, keys=%s)",
            unix,
            self.tcp_port,
            self.store.source.description,
        )

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
        await self.health.enter_graceful_shutdown()
        await self.store.end_watches()
        await self.server.stop(grace)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.store.close()
        unix = self.cfg.listen.unix
        if unix is not None and self._owns_socket:
            with contextlib.suppress(OSError):
                unix.unlink()


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(cfg))
    else:
        uvloop.run(serve(cfg))
    return 0
