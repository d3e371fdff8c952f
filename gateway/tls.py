"""TLS contexts for the listener and for upstreams, and per-connection peer re-verification.

The stdlib ``ssl`` store is one merged pool of every trust domain's roots, so the handshake
only proves "chains to some trusted root". :func:`verify_peer` re-verifies the peer's own chain
against the bundle of the trust domain its SPIFFE ID names, once per connection — resumed
sessions included, since a resumed session skips the current CA store.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from svidgate.gateway.errors import CredentialsError
from svidgate.pki.bundle import BundleSet
from svidgate.pki.errors import NoCertificateError, PkiError, UntrustedSvidError
from svidgate.pki.svid import X509Svid, check_svid_profile, parse_raw_chain, verify_x509_svid

# TLS 1.2: ECDHE key exchange with AEAD ciphers only. TLS 1.3 suites are all AEAD + (EC)DHE.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:!SHA1:!SHA256:!SHA384"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}

SniCallback = Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None]


def _harden(ctx: ssl.SSLContext, min_version: str) -> None:
    ctx.minimum_version = _VERSIONS[min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_ECDH_USE


@dataclass(frozen=True)
class PemKeyPair:
    """A certificate chain and its private key held in memory (an SVID from the Workload API)."""

    chain_pem: bytes
    key_pem: bytes = field(repr=False)


Certificate = Path | PemKeyPair  # a chain file (with its key file) or a chain in memory


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _load_pem_pair(ctx: ssl.SSLContext, pair: PemKeyPair) -> None:
    """``ssl`` loads keys only from files: give it an anonymous memory file (memfd, never on
    disk) read through /proc; elsewhere a 0600 file in a private 0700 directory, removed
    right after loading."""
    data = pair.key_pem + b"\n" + pair.chain_pem
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("svid", os.MFD_CLOEXEC)
        try:
            _write_all(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory(prefix="svidgate-svid-") as private:  # mode 0700
        path = os.path.join(private, "svid.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        ctx.load_cert_chain(path)


def _load_chain(ctx: ssl.SSLContext, cert: Certificate, key: Path | None) -> None:
    try:
        if isinstance(cert, PemKeyPair):
            _load_pem_pair(ctx, cert)
        else:
            ctx.load_cert_chain(str(cert), None if key is None else str(key))
    except (OSError, ssl.SSLError) as exc:
        why = getattr(exc, "strerror", None) or exc
        if isinstance(cert, PemKeyPair):
            raise CredentialsError(f"cannot load the Workload API SVID: {why}") from None
        raise CredentialsError(f"cannot load certificate {cert} with key {key}: {why}") from None


def build_server_context(
    cert: Certificate,
    key: Path | None,
    bundles: BundleSet,
    *,
    min_version: str = "1.2",
    sni_callback: SniCallback | None = None,
    http2: bool = False,
) -> ssl.SSLContext:
    """A server context: client certificate required, hardened, no session tickets; ALPN
    offers ``h2`` before ``http/1.1`` when ``http2``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, min_version)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    _load_chain(ctx, cert, key)
    pem = bundles.pem()
    if not pem.strip():
        raise CredentialsError("the trust bundles hold no X.509 authorities")
    ctx.load_verify_locations(cadata=pem.decode("ascii"))
    ctx.set_alpn_protocols(["h2", "http/1.1"] if http2 else ["http/1.1"])
    if sni_callback is not None:
        ctx.sni_callback = sni_callback
    return ctx


def build_client_context(
    bundle_pem: bytes, cert: Certificate | None, key: Path | None
) -> ssl.SSLContext:
    """A client context for upstream mTLS. The hostname is not checked: the peer is pinned by
    its SPIFFE ID after the handshake (:func:`check_peer_id`)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(ctx, "1.2")
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not bundle_pem.strip():
        raise CredentialsError("the upstream bundle holds no X.509 authorities")
    ctx.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    if isinstance(cert, PemKeyPair) or (cert is not None and key is not None):
        _load_chain(ctx, cert, key)
    return ctx


def peer_chain_der(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> list[bytes]:
    """The DER of every certificate the peer sent (leaf first); empty for a resumed session.
    The one place that reads the chain: Python 3.13 has a public API, 3.11 a private one."""
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is not None:  # Python >= 3.13
        return list(getter() or [])
    inner = getattr(ssl_object, "_sslobj", None)
    chain = inner.get_unverified_chain() if inner is not None else None
    if not chain:
        return []
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket, bundles: BundleSet, *, now: datetime
) -> X509Svid:
    """Re-verify the peer against the bundle of its own trust domain; raises PkiError.

    A resumed TLS session skipped the handshake's chain check against the *current* store, and
    the server keeps only the leaf in the session: such a leaf is verified alone (so it must
    chain directly to a current root; one that needs an intermediate is refused)."""
    ders = peer_chain_der(ssl_object)
    if not ders and ssl_object.session_reused:
        der = ssl_object.getpeercert(binary_form=True)
        ders = [der] if der else []
    chain = parse_raw_chain(ders)
    if not chain:
        raise NoCertificateError("the peer presented no certificate")
    return verify_x509_svid(chain[0], chain[1:], bundles, now=now)


def check_peer_id(ssl_object: ssl.SSLObject | ssl.SSLSocket, expected: str) -> None:
    """Pin an upstream's SPIFFE ID (the chain was verified by the handshake)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise UntrustedSvidError("the upstream presented no certificate")
    try:
        got = check_svid_profile(parse_raw_chain([der])[0])
    except PkiError as exc:
        raise UntrustedSvidError(f"upstream certificate is not an SVID: {exc}") from None
    if str(got) != expected:
        raise UntrustedSvidError(f"upstream presented {got}, expected {expected}")
