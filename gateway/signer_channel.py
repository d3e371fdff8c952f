"""The gateway's TLS connection to a signer over TCP, verified on the connection that carries
the RPCs.

gRPC's Python TLS credentials check a DNS name, never a URI SAN, and take no verification
callback. So gRPC never speaks TLS to the signer here: the grpc.aio channel dials a private
Unix socket (in a 0700 directory made by :func:`tempfile.mkdtemp`, one per signer client) that
:class:`SignerConnector` serves in the same event loop. For each connection accepted there, the
connector opens TLS to the signer with Python's ``ssl`` (the gateway's SVID as client
certificate, the bundle of the pinned ID's trust domain as the only CA, TLS >= 1.2, no host name
check, ALPN ``h2``) and then, on that same TLS connection, verifies the signer's chain and SVID
with :mod:`svidgate.pki` and requires its SPIFFE ID to be ``signer.tls.spiffe_id``
(:func:`check_signer_identity`). Only then are bytes relayed, both ways, with back-pressure.
Any failure closes the local connection before a single byte crosses; gRPC then fails the RPC
with UNAVAILABLE, which the gateway answers with 503.

Bounds: at most :data:`MAX_CONNECTIONS` relayed connections at once (gRPC uses one per
channel), :data:`CONNECT_TIMEOUT` for TCP connect, handshake and identity check together, and a
relayed connection ends at the signer certificate's notAfter. The certificate, key and bundle
files are checked before each new connection; changed files (a reloaded SVID) apply to new
connections, and a broken file keeps the previous context (logged once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import ssl
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from svidgate.gateway.errors import CredentialsError, GatewayError
from svidgate.gateway.tls import build_client_context, peer_chain_der
from svidgate.pki.bundle import BundleSet, load_bundle, marshal_pem
from svidgate.pki.errors import PkiError
from svidgate.pki.spiffe_id import SpiffeId, parse_spiffe_id
from svidgate.pki.svid import X509Svid, parse_raw_chain, verify_x509_svid

from svidgate.config import ConfigError, parse_host_port

log = logging.getLogger("svidgate.gateway.signer_channel")

CONNECT_TIMEOUT = 5.0  # seconds: TCP connect + TLS handshake + identity check
MAX_CONNECTIONS = 4  # relayed connections at once; gRPC keeps one per channel
CHUNK = 64 * 1024
LOG_REPEAT_INTERVAL = 30.0  # seconds before the same connection failure is logged again
SOCKET_NAME = "signer.sock"
_SUN_PATH_MAX = 100  # bytes; the kernel's limit is 107


class SignerIdentityError(Exception):
    """The signer's certificate is not an SVID of the pinned ID, chained to its bundle."""


class SignerTLSFiles(Protocol):
    """What the connector needs from ``gateway.config.SignerTLS`` (paths already absolute)."""

    @property
    def cert(self) -> Path: ...
    @property
    def key(self) -> Path: ...
    @property
    def bundle(self) -> Path: ...
    @property
    def spiffe_id(self) -> str: ...
    @property
    def server_name(self) -> str | None: ...


def check_signer_identity(
    chain_der: Sequence[bytes], bundles: BundleSet, expected: SpiffeId, *, now: datetime
) -> X509Svid:
    """The signer's chain (leaf first, as sent) must be an X.509-SVID chained to the bundle of
    the trust domain its ID names, valid at ``now``, with exactly the ``expected`` SPIFFE ID.
    Raises SignerIdentityError."""
    try:
        chain = parse_raw_chain(chain_der)
        if not chain:
            raise SignerIdentityError("the signer presented no certificate")
        svid = verify_x509_svid(chain[0], chain[1:], bundles, now=now)
    except PkiError as exc:
        raise SignerIdentityError(f"the signer's certificate is not trusted: {exc}") from None
    if svid.spiffe_id != expected:
        raise SignerIdentityError(f"signer presented {svid.spiffe_id}, expected {expected}")
    return svid


@dataclass(frozen=True)
class _Generation:
    stamps: tuple[tuple[int, int, int], ...]
    context: ssl.SSLContext
    bundles: BundleSet


def _stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ClientContextSource:
    """The TLS client context (and the bundle) for new signer connections, rebuilt when the
    certificate, key or bundle file changes; a broken file keeps the previous generation."""

    def __init__(self, tls: SignerTLSFiles, trust_domain: str) -> None:
        self.tls = tls
        self.trust_domain = trust_domain
        self._files = (Path(tls.cert), Path(tls.key), Path(tls.bundle))
        self._current: _Generation | None = None
        self._failed_stamps: tuple[tuple[int, int, int], ...] | None = None

    def load(self) -> _Generation:
        """Read the files now; raises CredentialsError."""
        stamps = tuple(_stamp(p) for p in self._files)
        try:
            bundle = load_bundle(self.tls.bundle, self.trust_domain)
        except PkiError as exc:
            raise CredentialsError(f"signer.tls.bundle: {exc}") from None
        try:
            context = build_client_context(marshal_pem(bundle), self.tls.cert, self.tls.key)
        except GatewayError as exc:
            raise CredentialsError(f"signer.tls: {exc}") from None
        context.set_alpn_protocols(["h2"])  # gRPC servers require ALPN h2
        return _Generation(stamps, context, BundleSet.from_bundles([bundle]))

    def current(self) -> _Generation:
        """The generation to use for a new connection (reloaded when the files changed)."""
        current = self._current
        if current is None:
            self._current = current = self.load()
            return current
        stamps = tuple(_stamp(p) for p in self._files)
        if stamps in (current.stamps, self._failed_stamps):
            return current
        try:
            self._current = current = self.load()
        except CredentialsError as exc:
            self._failed_stamps = stamps
            log.error("signer TLS files changed but cannot be used, keeping the previous: %s", exc)
            return current
        self._failed_stamps = None
        log.info("signer TLS credentials reloaded; new signer connections use them")
        return current


class SignerConnector:
    """Serves the gRPC channel's private Unix socket and relays each connection to the signer
    over TLS once the signer's SPIFFE ID is verified on that TLS connection."""

    def __init__(
        self,
        address: str,
        tls: SignerTLSFiles,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        if not tls.spiffe_id:
            raise ConfigError("signer.tls.spiffe_id: is required for a TCP signer")
        try:
            self.host, self.port = parse_host_port(address)
            self.expected = parse_spiffe_id(tls.spiffe_id, require_path=True)
        except (ValueError, PkiError) as exc:
            raise ConfigError(f"signer: {exc}") from None
        self.server_name = tls.server_name or self.host
        self.credentials = ClientContextSource(tls, str(self.expected.trust_domain))
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections
        self._identity_error: str | None = None  # the last identity failure
        self._verified_open = 0  # relayed connections whose signer passed the check
        self._dir: str | None = None
        self._server: asyncio.AbstractServer | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._last_logged: tuple[str, float] = ("", float("-inf"))

    @property
    def identity_error(self) -> str | None:
        """The last identity failure while no verified connection is open. A slow impostor
        connection that fails after a genuine one was verified does not mark the connector
        failed while the genuine connection carries the RPCs."""
        return None if self._verified_open else self._identity_error

    @property
    def active(self) -> int:
        """Relayed connections open now (including those still being verified)."""
        return len(self._relays)

    async def start(self) -> str:
        """Load the credentials (ConfigError when unreadable), listen on a private Unix socket
        and return the gRPC target ``unix:PATH``."""
        try:
            self.credentials.current()
        except CredentialsError as exc:
            raise ConfigError(str(exc)) from None
        self._dir = _private_dir()
        path = os.path.join(self._dir, SOCKET_NAME)
        self._server = await asyncio.start_unix_server(self._accept, path=path)
        return f"unix:{path}"

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._relays):
            task.cancel()
        for task in list(self._relays):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        directory, self._dir = self._dir, None
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)

    def _accept(self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter) -> None:
        """A connection from the gRPC channel: relay it in a task of our own (bounded)."""
        if len(self._relays) >= self.max_connections:
            self._report(f"{self.max_connections} signer connections open: refusing another")
            local_w.close()
            return
        task = asyncio.get_running_loop().create_task(self._connection(local_r, local_w))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _connection(
        self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter
    ) -> None:
        try:
            await self._serve(local_r, local_w)
        except asyncio.CancelledError:
            raise
        except Exception:  # never let one connection disturb the gateway
            log.exception("unexpected error on a signer connection")
        finally:
            local_w.close()

    async def _serve(self, local_r: asyncio.StreamReader, local_w: asyncio.StreamWriter) -> None:
        try:
            remote_r, remote_w, svid = await asyncio.wait_for(self._open(), self.connect_timeout)
        except SignerIdentityError as exc:
            self._identity_error = f"signer identity check failed: {exc}"
            self._report(f"{self._identity_error}; connection closed", level=logging.ERROR)
            return
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
            self._report(f"cannot connect to the signer at {self.host}:{self.port}: {why}")
            return
        self._identity_error = None
        self._verified_open += 1
        try:
            lifetime = svid.leaf.not_valid_after_utc.timestamp() - time.time()
            await _relay(local_r, local_w, remote_r, remote_w, max(lifetime, 0.0))
        finally:
            self._verified_open -= 1
            await _close(remote_w)

    async def _open(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, X509Svid]:
        generation = self.credentials.current()
        try:
            reader, writer = await asyncio.open_connection(
                self.host,
                self.port,
                ssl=generation.context,
                server_hostname=self.server_name,
                ssl_handshake_timeout=self.connect_timeout,
            )
        except ssl.SSLCertVerificationError as exc:  # no chain to signer.tls.bundle
            why = exc.verify_message or str(exc)
            raise SignerIdentityError(f"the signer's certificate is not trusted: {why}") from None
        try:
            ssl_object = writer.get_extra_info("ssl_object")
            if ssl_object is None or ssl_object.session_reused:
                raise SignerIdentityError("no fresh TLS session with the signer")
            svid = check_signer_identity(
                peer_chain_der(ssl_object),
                generation.bundles,
                self.expected,
                now=datetime.now(UTC),
            )
            if ssl_object.selected_alpn_protocol() != "h2":
                raise ConnectionError("the signer did not select ALPN h2")
        except BaseException:
            await _close(writer)
            raise
        return reader, writer, svid

    def _report(self, message: str, *, level: int = logging.WARNING) -> None:
        """Log a connection failure, the same one at most every LOG_REPEAT_INTERVAL seconds."""
        now = time.monotonic()
        last, at = self._last_logged
        if message == last and now - at < LOG_REPEAT_INTERVAL:
            return
        self._last_logged = (message, now)
        log.log(level, "%s", message)


def _private_dir() -> str:
    """A fresh 0700 directory for the socket, short enough for a Unix socket path."""
    for base in (None, "/tmp"):  # noqa: S108 - mkdtemp: unique, 0700
        directory = tempfile.mkdtemp(prefix="svidgate-signer-", dir=base)
        if len(os.path.join(directory, SOCKET_NAME).encode()) <= _SUN_PATH_MAX:
            return directory
        os.rmdir(directory)
    raise ConfigError("cannot make a short private directory for the signer socket")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF; ``drain`` makes a slow receiver stop the reading (back-pressure)."""
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()


async def _relay(
    local_r: asyncio.StreamReader,
    local_w: asyncio.StreamWriter,
    remote_r: asyncio.StreamReader,
    remote_w: asyncio.StreamWriter,
    lifetime: float,
) -> None:
    """Both directions until either side ends, fails, or ``lifetime`` seconds pass."""
    pumps = {
        asyncio.ensure_future(_pump(local_r, remote_w)),
        asyncio.ensure_future(_pump(remote_r, local_w)),
    }
    try:
        await asyncio.wait(pumps, timeout=lifetime, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        for pump in pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), 1.0)
