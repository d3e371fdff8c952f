"""Reloadable gateway state: config, TLS contexts, bundles, policy — built, validated, swapped.

:func:`build_state` reads every file and checks that the pieces fit; it raises on any problem
and has no side effects, so :class:`StateHolder` can keep the old state when a reload fails.
New TLS connections pick up the current server context through the SNI callback (it fires
also when the client sends no SNI); open connections keep theirs. :func:`trust_digest` tells
a reload that changed what is trusted (the gateway then re-checks its open connections).

With ``tls.source: workload_api`` (or a trust domain with ``source: workload_api``) the holder
owns an :class:`~svidgate.workload_api.X509Watcher`: each SVID or bundle update from the agent
builds a new state from the current config exactly like a reload (new handshakes get the new
SVID, upstream pools present it, a trust change re-checks open connections).
"""

from __future__ import annotations

import asyncio
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
from svidgate.gateway.tls import Certificate, PemKeyPair, build_client_context, build_server_context
from svidgate.pki.bundle import Bundle, BundleSet, load_bundle, marshal_pem
from svidgate.pki.errors import PkiError
from svidgate.pki.spiffe_id import SpiffeId, parse_spiffe_id, parse_trust_domain
from svidgate.pki.svid import check_svid_profile, load_certificates, verify_x509_svid

from svidgate.config import ConfigError
from svidgate.workload_api import WorkloadApiUnavailable, X509Material, X509Watcher, endpoint

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
    workload_serial: int = 0  # the Workload API update it was built from (0: none)


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
            paths += [up.tls.cert, up.tls.key, up.tls.bundle]
    return list(dict.fromkeys(p for p in paths if p is not None))


def _workload_bundle(name: str, workload: X509Material | None, *, strict: bool) -> Bundle:
    """The agent's bundle for ``name``. Missing at start-up: an error (the registration entry
    lacks federatesWith?); missing later (de-federated): no authority, so nobody of that trust
    domain gets in, and the SVID keeps rotating."""
    if workload is None:
        raise CredentialsError(f"trust_domains.{name}: the Workload API is not connected")
    authorities = workload.bundles.get(name, ())
    if not authorities:
        if strict:
            raise CredentialsError(f"trust_domains.{name}: the Workload API sent no bundle for it")
        log.warning("the Workload API sent no bundle for %s: it is trusted no more", name)
    return Bundle(parse_trust_domain(name), authorities)


def _load_bundles(
    cfg: GatewayConfig, workload: X509Material | None, *, strict: bool = True
) -> BundleSet:
    bundles: list[Bundle] = []
    for name, td in cfg.trust_domains.items():
        if td.source == "workload_api":
            bundles.append(_workload_bundle(name, workload, strict=strict))
            continue
        try:
            assert td.bundle is not None  # the config rules require it for source: file
            bundles.append(load_bundle(td.bundle, name))
        except PkiError as exc:
            raise CredentialsError(f"trust_domains.{name}.bundle: {exc}") from None
    return BundleSet.from_bundles(bundles)


def _own_chain(cfg: GatewayConfig, workload: X509Material | None) -> list[x509.Certificate]:
    if cfg.tls.source == "workload_api":
        if workload is None:
            raise CredentialsError("tls.workload_api: the Workload API is not connected")
        return list(workload.chain)
    assert cfg.tls.cert is not None  # the config rules require it for source: files
    return load_certificates(cfg.tls.cert)


def _own_certificate(cfg: GatewayConfig, workload: X509Material | None) -> Certificate:
    """What the listener (and upstream mTLS) presents: the SVID in memory, or the cert file."""
    if cfg.tls.source == "workload_api" and workload is not None:
        return PemKeyPair(workload.chain_pem(), workload.key_pem)
    assert cfg.tls.cert is not None
    return cfg.tls.cert


def _check_own_certificate(
    cfg: GatewayConfig, bundles: BundleSet, now: datetime, workload: X509Material | None
) -> x509.Certificate:
    where = "tls.workload_api" if cfg.tls.source == "workload_api" else f"tls.cert: {cfg.tls.cert}"
    try:
        chain = _own_chain(cfg, workload)
        leaf = chain[0]
        gateway_id = check_svid_profile(leaf)
        if gateway_id.trust_domain in bundles:
            verify_x509_svid(leaf, chain[1:], bundles, now=now)
        elif not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            raise CredentialsError("certificate is outside its validity period")
    except (PkiError, IndexError) as exc:
        raise CredentialsError(f"{where}: {exc or 'no certificate'}") from None
    return leaf


def _upstream_context(
    cfg: GatewayConfig, name: str, bundles: BundleSet, workload: X509Material | None
) -> ssl.SSLContext | None:
    """The upstream's client context: its own files, else the gateway's Workload API SVID;
    its own bundle file, else the trust_domains bundle of the upstream's trust domain."""
    up = cfg.upstreams[name]
    if not up.url.startswith("https://"):
        return None
    if up.tls is None:
        raise CredentialsError(f"upstreams.{name}.tls: an https upstream needs tls.bundle")
    try:
        td = parse_spiffe_id(up.tls.spiffe_id).trust_domain
        if up.tls.bundle is not None:
            pem = marshal_pem(load_bundle(up.tls.bundle, td))
        else:
            pem = marshal_pem(bundles.get(td))
    except PkiError as exc:
        raise CredentialsError(f"upstreams.{name}.tls.bundle: {exc}") from None
    cert: Certificate | None = up.tls.cert
    if cert is None and cfg.tls.source == "workload_api":
        cert = _own_certificate(cfg, workload)
    try:
        ctx = build_client_context(pem, cert, up.tls.key)
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
    config: GatewayConfig | None = None,
    workload: X509Material | None = None,
    strict: bool = True,
) -> GatewayState:
    """Load config (unless given) and every file it names, take the SVID and bundles of
    ``workload`` where the config says so; raise ConfigError or GatewayError on any problem
    (``strict=False``: a trust domain the agent no longer sends is kept with no authority)."""
    now = now or datetime.now(UTC)
    cfg = config or load_config(config_path)
    watched = {p: _file_stamp(p) for p in watched_files(config_path, cfg)}
    bundles = _load_bundles(cfg, workload, strict=strict)
    leaf = _check_own_certificate(cfg, bundles, now, workload)
    ctx = build_server_context(
        _own_certificate(cfg, workload),
        cfg.tls.key,
        bundles,
        min_version=cfg.tls.min_version,
        sni_callback=sni_callback,
        http2=cfg.http2,
    )
    policy = Policy.from_config(cfg)
    upstreams = {name: _upstream_context(cfg, name, bundles, workload) for name in cfg.upstreams}
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
        workload_serial=workload.serial if workload is not None else 0,
    )


def start_watcher(cfg: GatewayConfig) -> X509Watcher | None:
    """Connect to the Workload API when the config uses it; bounded by workload_api.timeout."""
    if not cfg.uses_workload_api:
        return None
    wapi = cfg.tls.workload_api
    try:
        watcher = X509Watcher(endpoint(wapi.socket))
        watcher.start(wapi.timeout.total_seconds())
    except WorkloadApiUnavailable as exc:
        raise CredentialsError(f"tls.workload_api: {exc}") from None
    return watcher


class StateHolder:
    """Holds the current :class:`GatewayState`; reload = build → validate → swap one reference."""

    def __init__(self, config_path: Path) -> None:
        self.config_path = config_path.absolute()
        cfg = load_config(self.config_path)
        self.watcher = start_watcher(cfg)
        try:
            self.current = build_state(
                self.config_path, sni_callback=self.sni_callback, config=cfg, workload=self._svid()
            )
        except BaseException:
            self.close()
            raise
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
                self.config_path,
                generation=old.generation + 1,
                sni_callback=self.sni_callback,
                workload=self._svid(),
                strict=False,
            )
        except (ConfigError, GatewayError) as exc:
            # Remember the stamps so a broken file is reported once, not on every poll.
            self._stamps = {p: _file_stamp(p) for p in self._stamps}
            log.error("reload failed, keeping the previous state: %s", exc)
            return False
        if new.config.uses_workload_api and self.watcher is None:
            log.error("reload failed, keeping the previous state: the Workload API needs a restart")
            return False
        self._swap(old, new)
        log.info("reloaded configuration and credentials (generation %d)", new.generation)
        return True

    def _swap(self, old: GatewayState, new: GatewayState) -> None:
        self.current = new
        self._stamps = dict(new.watched)
        for listener in self.listeners:
            listener(old, new)

    # -- the Workload API ----------------------------------------------------------------------

    def _svid(self) -> X509Material | None:
        return self.watcher.current if self.watcher is not None else None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Apply each later Workload API update on ``loop`` (and one that came meanwhile)."""
        if self.watcher is None:
            return
        self.watcher.deliver_to(loop, self.workload_update)
        if self.watcher.current.serial != self.current.workload_serial:
            loop.call_soon(self.workload_update, self.watcher.current)

    def workload_update(self, material: X509Material) -> bool:
        """A new SVID or bundle set: rebuild the state from the current config (on the loop)."""
        old = self.current
        if material.serial <= old.workload_serial:
            return False
        try:
            new = build_state(
                self.config_path,
                generation=old.generation + 1,
                sni_callback=self.sni_callback,
                config=old.config,
                workload=material,
                strict=False,
            )
        except GatewayError as exc:
            log.error("Workload API update refused, keeping the previous SVID: %s", exc)
            return False
        self._swap(old, new)
        log.info(
            "applied the Workload API update (SVID %s until %s, generation %d)",
            material.spiffe_id,
            material.not_after.isoformat(),
            new.generation,
        )
        return True

    def close(self) -> None:
        """Stop streaming from the Workload API (the last state stays usable)."""
        if self.watcher is not None:
            self.watcher.close()
