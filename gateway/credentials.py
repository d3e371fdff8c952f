"""Reloadable gateway state: config, TLS contexts, bundles, policy — built, validated, swapped.

:func:`build_state` reads every file and checks that the pieces fit; it raises on any problem
and has no side effects, so :class:`StateHolder` can keep the old state when a reload fails.
New TLS connections pick up the current server context through the SNI callback (it fires
also when the client sends no SNI); open connections keep theirs. :func:`trust_digest` tells
a reload that changed what is trusted (the gateway then re-checks its open connections).
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from svidgate.gateway.config import GatewayConfig, load_config
from svidgate.gateway.errors import CredentialsError, GatewayError
from svidgate.gateway.policy import Policy
from svidgate.gateway.tls import build_client_context, build_server_context
from svidgate.pki.bundle import Bundle, BundleSet, load_bundle, marshal_pem
from svidgate.pki.errors import PkiError
from svidgate.pki.spiffe_id import SpiffeId, parse_spiffe_id
from svidgate.pki.svid import check_svid_profile, load_certificates, verify_x509_svid

from svidgate.config import ConfigError

log = logging.getLogger("svidgate.gateway")


@dataclass(frozen=True)
class GatewayState:
    """One consistent generation of everything that reloads."""

    generation: int
    config_path: Path
    config: GatewayConfig
    ssl_context: ssl.SSLContext
    bundles: BundleSet
    gateway_id: SpiffeId
    cert_not_after: datetime
    policy: Policy
    upstream_contexts: dict[str, ssl.SSLContext | None]
    watched: dict[Path, tuple[int, int, int]] = field(default_factory=dict)  # stamps at build
    trust: bytes = b""  # trust_digest(bundles): equal digests, equal trust


def trust_digest(bundles: BundleSet) -> bytes:
    """SHA-256 over every trust domain and its X.509 authorities (DER, sorted): two states with
    the same digest accept exactly the same client chains."""
    h = hashlib.sha256()
    for bundle in sorted(bundles, key=lambda b: str(b.trust_domain)):
        name = str(bundle.trust_domain).encode()
        h.update(len(name).to_bytes(4, "big") + name)
        ders = sorted(c.public_bytes(Encoding.DER) for c in bundle.x509_authorities)
        h.update(len(ders).to_bytes(4, "big"))
        for der in ders:
            h.update(len(der).to_bytes(4, "big") + der)
    return h.digest()


def _file_stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def watched_files(config_path: Path, cfg: GatewayConfig) -> list[Path]:
    """Every file whose change triggers a reload."""
    paths = [config_path.absolute(), cfg.tls.cert, cfg.tls.key]
    paths += [td.bundle for td in cfg.trust_domains.values()]
    for up in cfg.upstreams.values():
        if up.tls is not None:
            paths += [p for p in (up.tls.cert, up.tls.key, up.tls.bundle) if p is not None]
    return list(dict.fromkeys(paths))


def _load_bundles(cfg: GatewayConfig) -> BundleSet:
    bundles: list[Bundle] = []
    for name, td in cfg.trust_domains.items():
        try:
            bundles.append(load_bundle(td.bundle, name))
        except PkiError as exc:
            raise CredentialsError(f"trust_domains.{name}.bundle: {exc}") from None
    return BundleSet.from_bundles(bundles)


def _check_own_certificate(
    cfg: GatewayConfig, bundles: BundleSet, now: datetime
) -> x509.Certificate:
    try:
        chain = load_certificates(cfg.tls.cert)
        leaf = chain[0]
        gateway_id = check_svid_profile(leaf)
        if gateway_id.trust_domain in bundles:
            verify_x509_svid(leaf, chain[1:], bundles, now=now)
        elif not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise CredentialsError("certificate is outside its validity period")
    except (PkiError, IndexError) as exc:
        raise CredentialsError(f"tls.cert: {cfg.tls.cert}: {exc or 'no certificate'}") from None
    return leaf


def _upstream_context(cfg: GatewayConfig, name: str) -> ssl.SSLContext | None:
    up = cfg.upstreams[name]
    if not up.url.startswith("https://"):
        return None
    if up.tls is None:
        raise CredentialsError(f"upstreams.{name}.tls: an https upstream needs tls.bundle")
    try:
        td = parse_spiffe_id(up.tls.spiffe_id).trust_domain
        pem = marshal_pem(load_bundle(up.tls.bundle, td))
    except PkiError as exc:
        raise CredentialsError(f"upstreams.{name}.tls.bundle: {exc}") from None
    try:
        ctx = build_client_context(pem, up.tls.cert, up.tls.key)
    except GatewayError as exc:
        raise CredentialsError(f"upstreams.{name}.tls: {exc}") from None
    if up.protocol == "h2":
        ctx.set_alpn_protocols(["h2"])  # the upstream must select it (checked after the handshake)
    return ctx


def build_state(
    config_path: Path,
    *,
    generation: int = 1,
    sni_callback: Callable[[ssl.SSLObject, str | None, ssl.SSLContext], int | None] | None = None,
    now: datetime | None = None,
) -> GatewayState:
    """Load config and every file it names; raise ConfigError or GatewayError on any problem."""
    now = now or datetime.now(UTC)
    cfg = load_config(config_path)
    watched = {p: _file_stamp(p) for p in watched_files(config_path, cfg)}
    bundles = _load_bundles(cfg)
    leaf = _check_own_certificate(cfg, bundles, now)
    ctx = build_server_context(
        cfg.tls.cert,
        cfg.tls.key,
        bundles,
        min_version=cfg.tls.min_version,
        sni_callback=sni_callback,
        http2=cfg.http2,
    )
    policy = Policy.from_config(cfg)
    upstreams = {name: _upstream_context(cfg, name) for name in cfg.upstreams}
    return GatewayState(
        generation=generation,
        config_path=config_path,
        config=cfg,
        ssl_context=ctx,
        bundles=bundles,
        gateway_id=check_svid_profile(leaf),
        cert_not_after=leaf.not_valid_after_utc,
        policy=policy,
        upstream_contexts=upstreams,
        watched=watched,
        trust=trust_digest(bundles),
    )


class StateHolder:
    """Holds the current :class:`GatewayState`; reload = build → validate → swap one reference."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path.absolute()
        self.current = build_state(self.config_path, sni_callback=self.sni_callback)
        self.listeners: list[Callable[[GatewayState, GatewayState], None]] = []
        # What the files looked like at the last reload attempt (successful or not).
        self._stamps = dict(self.current.watched)

    def sni_callback(
        self, ssl_object: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext
    ) -> int | None:
        """Give each new handshake the current context (certificate and client-CA store)."""
        current = self.current.ssl_context
        if ctx is not current:
            ssl_object.context = current
        return None

    def changed(self) -> bool:
        """True when a watched file's mtime, size or inode differs from the loaded state."""
        return any(_file_stamp(p) != stamp for p, stamp in self._stamps.items())

    def reload(self) -> bool:
        """Try to load a new state; on failure keep the old one, log and return False."""
        old = self.current
        try:
            new = build_state(
                self.config_path, generation=old.generation + 1, sni_callback=self.sni_callback
            )
        except (ConfigError, GatewayError) as exc:
            # Remember the stamps so a broken file is reported once, not on every poll.
            self._stamps = {p: _file_stamp(p) for p in self._stamps}
            log.error("reload failed, keeping the previous state: %s", exc)
            return False
        self.current = new
        self._stamps = dict(new.watched)
        log.info("reloaded configuration and credentials (generation %d)", new.generation)
        for listener in self.listeners:
            listener(old, new)
        return True
