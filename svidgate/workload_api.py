"""X.509 SVIDs and trust bundles from the SPIFFE Workload API (a SPIRE agent's socket).

Owns the connection to the agent and the last good X.509 context: :class:`X509Watcher` waits a
bounded time for the first update at start-up (:class:`WorkloadApiUnavailable` otherwise), then
keeps streaming. py-spiffe's client is thread-based: its stream runs in a daemon thread, which
only stores each update and hands it to the asyncio loop with ``call_soon_threadsafe``. When the
agent goes away the stream retries (py-spiffe backs off up to 5 s) and the last good context
stays current, so a running service keeps its SVID until the agent is back or the SVID expires.

Private keys stay in memory (:class:`X509Material` never prints them); :func:`endpoint` names
the socket (``$SPIFFE_ENDPOINT_SOCKET`` by default).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("svidgate.workload_api")

ENV_SOCKET = "SPIFFE_ENDPOINT_SOCKET"


class WorkloadApiUnavailable(Exception):
    """No X.509 context from the Workload API in time, or no socket configured."""


@dataclass(frozen=True)
class X509Material:
    """One X.509 context: the default SVID (chain, key) and every bundle the agent sent."""

    serial: int  # 1 for the first update, +1 for each later one
    spiffe_id: str
    chain: tuple[x509.Certificate, ...]  # leaf first
    key_pem: bytes = field(repr=False)  # PKCS#8 PEM, in memory only
    bundles: dict[str, tuple[x509.Certificate, ...]]  # trust domain -> authorities (federated too)

    @property
    def not_after(self) -> datetime:
        return self.chain[0].not_valid_after_utc

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)


def endpoint(socket: str | None) -> str:
    """The Workload API address: ``socket`` or ``$SPIFFE_ENDPOINT_SOCKET`` (``unix:///path``)."""
    value = socket or os.environ.get(ENV_SOCKET, "")
    if not value:
        raise WorkloadApiUnavailable(
            f"no Workload API socket: set workload_api.socket or ${ENV_SOCKET}"
        )
    return value


def socket_path(address: str) -> str | None:
    """The file of a ``unix:`` address (``unix:///p`` or ``unix:/p``); None for ``tcp:``."""
    if not address.startswith("unix:"):
        return None
    rest = address[len("unix:") :]
    return "/" + rest.lstrip("/") if rest.startswith("//") else rest


def _material(serial: int, context: object) -> X509Material:
    """Copy py-spiffe's X509Context into our frozen form (default SVID, bundles by name)."""
    svid = context.default_svid  # type: ignore[attr-defined]
    key_pem = svid.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    bundles = {
        b.trust_domain.name: tuple(b.x509_authorities)
        for b in context.x509_bundle_set.bundles  # type: ignore[attr-defined]
    }
    return X509Material(serial, str(svid.spiffe_id), tuple(svid.cert_chain), key_pem, bundles)


class X509Watcher:
    """The Workload API's X.509 stream with the last good context kept (see module doc)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._first = threading.Event()
        self._current: X509Material | None = None
        self._last_error = ""
        self._client: object | None = None
        self._cancel: object | None = None
        self._deliver: Callable[[X509Material], object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def current(self) -> X509Material:
        with self._lock:
            if self._current is None:
                raise WorkloadApiUnavailable(f"no X.509 context from {self.address} yet")
            return self._current

    def start(self, timeout: float) -> X509Material:
        """Connect and wait (at most ``timeout`` seconds) for the first X.509 context."""
        from spiffe import WorkloadApiClient

        deadline = time.monotonic() + timeout
        path = socket_path(self.address)
        while path is not None and not os.path.exists(path):
            if time.monotonic() >= deadline:
                raise WorkloadApiUnavailable(
                    f"no Workload API socket at {self.address} after {timeout:g}s"
                )
            time.sleep(0.05)
        try:
            client = WorkloadApiClient(self.address)
        except Exception as exc:  # py-spiffe's ArgumentError: a bad address
            raise WorkloadApiUnavailable(f"Workload API {self.address}: {exc}") from None
        self._client = client
        self._cancel = client.stream_x509_contexts(self._on_update, self._on_error)
        if not self._first.wait(max(0.0, deadline - time.monotonic())):
            why = f" ({self._last_error})" if self._last_error else ""
            self.close()
            raise WorkloadApiUnavailable(
                f"no X.509 SVID from the Workload API at {self.address} within {timeout:g}s{why}"
            )
        return self.current

    def deliver_to(
        self, loop: asyncio.AbstractEventLoop, callback: Callable[[X509Material], object]
    ) -> None:
        """Run ``callback(material)`` on ``loop`` for every later update."""
        with self._lock:
            self._loop, self._deliver = loop, callback

    def _on_update(self, context: object) -> None:  # the stream's thread
        try:
            with self._lock:
                serial = self._current.serial + 1 if self._current is not None else 1
                material = _material(serial, context)
                self._current = material
                loop, deliver = self._loop, self._deliver
        except Exception as exc:  # a context without a usable SVID: keep the last good one
            log.error("ignoring a Workload API update without a usable X.509 SVID: %s", exc)
            return
        self._first.set()
        log.info("X.509 SVID %s from the Workload API (serial %d)", material.spiffe_id, serial)
        if loop is not None and deliver is not None and not loop.is_closed():
            loop.call_soon_threadsafe(deliver, material)

    def _on_error(self, error: Exception) -> None:  # the stream's thread: it has stopped
        self._last_error = str(error)
        if self._closed:
            return
        log.error("Workload API stream ended (%s); keeping the last X.509 SVID", error)
        # py-spiffe stops only on errors it will not retry: start a new stream after a pause.
        timer = threading.Timer(5.0, self._restart)
        timer.daemon = True
        timer.start()

    def _restart(self) -> None:
        client = self._client
        if self._closed or client is None:
            return
        self._cancel = client.stream_x509_contexts(  # type: ignore[attr-defined]
            self._on_update, self._on_error
        )

    def close(self) -> None:
        self._closed = True
        cancel, client = self._cancel, self._client
        self._cancel = self._client = None
        for closer in (getattr(cancel, "cancel", None), getattr(client, "close", None)):
            if closer is not None:
                try:
                    closer()
                except Exception as exc:  # closing is best effort
                    log.debug("closing the Workload API client: %s", exc)
