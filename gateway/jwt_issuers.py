"""JWT-SVIDs from other issuers (``jwt_issuers`` in gateway.yaml) and which key set checks a token.

Each issuer is a trust domain whose JWT bundle comes from one source, held by an
:class:`IssuerKeys` (build → validate → swap one reference; a failed read keeps the last good
key set, and an issuer without one fails closed with 503 ``issuer_unavailable``):

- ``{file: PATH}``: a JWKS or SPIFFE bundle file, read at start (a broken file stops start-up),
  again when it changes (polled every ``reload_interval``) and on every reload (SIGHUP);
- ``{url: "https://…", ca: PEM}``: fetched over HTTPS only, the server's certificate checked
  against ``ca``, at most :data:`MAX_BUNDLE_BYTES` within ``timeout``, every ``refresh``, and
  again for a kid it does not hold, at most once per ``refetch_min_interval``;
- ``{source: workload_api}``: the agent's ``FetchJWTBundles`` stream through py-spiffe's
  (thread-based) ``WorkloadApiClient``, bridged with ``loop.call_soon_threadsafe``; the stream
  is opened again with a backoff when it ends.

A token names its issuer only through unverified claims, so they only *select* a key set
(:func:`select_issuer`): ``iss`` equal to an issuer's configured ``issuer`` (the signer's:
``signer.issuer`` or the one it publishes), else the trust domain of ``sub`` for issuers without
``issuer``, else the signer if the route accepts it. The route must list the selected issuer
(else 401 ``issuer_not_allowed``), and verification is then :func:`~svidgate.pki.jwt_svid.
verify_jwt_svid` with that issuer's keys only: a kid known to another issuer never verifies,
and ``sub`` must belong to the issuer's trust domain (401 ``bad_subject``). The signer's own
tokens go on to :class:`~svidgate.gateway.signer_client.SignerClient` as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

from svidgate.gateway.config import SIGNER_ISSUER, JwtIssuerConfig
from svidgate.gateway.errors import IssuerUnavailable, TokenRejected
from svidgate.gateway.signer_client import KeySet, KeySetError, implied_algorithm, rejecting_tokens
from svidgate.pki.errors import PkiError
from svidgate.pki.jose import b64url_decode
from svidgate.pki.jwt_svid import (
    MalformedTokenError,
    VerificationKey,
    VerificationPolicy,
    VerifiedToken,
    parse_json_object,
    parse_token,
    verify_jwt_svid,
)
from svidgate.pki.spiffe_id import parse_spiffe_id

from svidgate.config import ConfigError

if TYPE_CHECKING:
    import aiohttp
    from spiffe import JwtBundleSet

log = logging.getLogger("svidgate.gateway.jwt_issuers")

MAX_BUNDLE_BYTES: Final = 256 * 1024
RETRY_MIN: Final = 0.5  # seconds before a failed first fetch / a lost stream is tried again
RETRY_MAX: Final = 30.0


# ---------------------------------------------------------------------------------------------
# Which issuer a token belongs to (pure)


@dataclass(frozen=True, slots=True)
class TokenOrigin:
    """What a token *claims* about its minter, before anything is verified."""

    iss: str | None
    trust_domain: str | None


@dataclass(frozen=True, slots=True)
class Candidate:
    """An issuer as selection sees it; ``issuer`` None: ``iss`` is not what identifies it."""

    name: str
    issuer: str | None
    trust_domain: str | None


def token_origin(token: str) -> TokenOrigin:
    """``iss`` and the trust domain of ``sub`` from the unverified payload; raises
    :class:`~svidgate.pki.jwt_svid.JwtSvidError` for a token that is not a well-formed JWS."""
    parsed = parse_token(token)
    try:
        payload = b64url_decode(parsed.payload_b64)
    except ValueError:
        raise MalformedTokenError("a part is not base64url") from None
    claims = parse_json_object(payload, "payload")
    iss = claims.get("iss")
    sub = claims.get("sub")
    domain: str | None = None
    if isinstance(sub, str):
        with contextlib.suppress(PkiError):
            domain = parse_spiffe_id(sub, require_path=True).trust_domain.name
    return TokenOrigin(iss if isinstance(iss, str) else None, domain)


def select_issuer(
    origin: TokenOrigin, candidates: Iterable[Candidate], accepted: Collection[str]
) -> str:
    """The name of the issuer whose keys check the token; raises TokenRejected
    ``issuer_not_allowed`` when the route does not accept it. ``iss`` matches first, then the
    trust domain of ``sub`` (issuers without ``issuer``), then the signer as the fallback."""
    pool = list(candidates)
    by_iss = [c.name for c in pool if c.issuer is not None and c.issuer == origin.iss]
    by_domain = [
        c.name
        for c in pool
        if c.issuer is None and c.trust_domain is not None and c.trust_domain == origin.trust_domain
    ]
    for found in (by_iss, by_domain):
        if found:
            allowed = [name for name in found if name in accepted]
            if not allowed:
                raise TokenRejected(
                    "issuer_not_allowed", f"issuer {found[0]!r} is not accepted on this route"
                )
            return allowed[0]
    if SIGNER_ISSUER in accepted:
        return SIGNER_ISSUER
    raise TokenRejected("issuer_not_allowed", "no issuer accepted on this route minted it")


# ---------------------------------------------------------------------------------------------
# Key sets by source


class IssuerKeys:
    """One issuer's key set as its source last delivered it (None before the first)."""

    def __init__(self, name: str, cfg: JwtIssuerConfig) -> None:
        self.name = name
        self.cfg = cfg
        self.keyset: KeySet | None = None
        self.policy = VerificationPolicy(cfg.issuer, cfg.clock_skew, cfg.max_ttl)
        self.candidate = Candidate(name, cfg.issuer, cfg.trust_domain)
        self._sequence = 0

    async def start(self) -> None:
        """Begin delivering keys (raise ConfigError when the source can never work)."""

    async def close(self) -> None:
        """Stop background work."""

    def reload(self) -> None:
        """A reload of the gateway (SIGHUP or a changed file): read again where that means
        anything."""

    async def keys_for(self, kid: str) -> KeySet:
        """The key set to check a token with kid ``kid``; raises IssuerUnavailable."""
        if self.keyset is None:
            raise IssuerUnavailable(f"no keys of issuer {self.name!r} yet")
        return self.keyset

    def install(self, keyset: KeySet) -> None:
        previous, self.keyset = self.keyset, keyset
        if previous is None or previous.keys.keys() != keyset.keys.keys():
            log.info("jwt issuer %s: kids %s", self.name, ",".join(sorted(keyset.keys)) or "(none)")

    def parse(self, text: str) -> KeySet:
        """A JWKS or SPIFFE bundle document as this issuer's key set; raises KeySetError."""
        self._sequence += 1
        return KeySet.parse(text, self._sequence, bundle=True)


def _stamp(path: Path) -> tuple[int, int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0, 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class FileIssuerKeys(IssuerKeys):
    """A JWKS / SPIFFE bundle file: read at start, on change and on every reload."""

    def __init__(self, name: str, cfg: JwtIssuerConfig, poll: timedelta) -> None:
        super().__init__(name, cfg)
        assert cfg.bundle.file is not None
        self.path: Path = cfg.bundle.file
        self.poll = poll.total_seconds()
        self._stamp = (0, 0, 0)
        self._task: asyncio.Task[None] | None = None

    def _read(self) -> KeySet:
        stamp = _stamp(self.path)
        try:
            with self.path.open("rb") as file:
                data = file.read(MAX_BUNDLE_BYTES + 1)
        except OSError as exc:
            raise KeySetError(f"cannot read it ({exc.strerror})") from None
        if len(data) > MAX_BUNDLE_BYTES:
            raise KeySetError(f"larger than {MAX_BUNDLE_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise KeySetError("not UTF-8") from None
        keyset = self.parse(text)
        self._stamp = stamp
        return keyset

    async def start(self) -> None:
        try:
            self.install(self._read())
        except KeySetError as exc:
            raise ConfigError(f"jwt_issuers.{self.name}.bundle.file: {self.path}: {exc}") from None
        if self.poll > 0:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        await _cancel(self._task)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll)
            if _stamp(self.path) != self._stamp:
                self.reload()

    def reload(self) -> None:
        try:
            self.install(self._read())
        except KeySetError as exc:
            self._stamp = _stamp(self.path)  # reported once, not at every poll
            log.error(
                "jwt_issuers.%s.bundle.file: %s: %s; keeping the previous keys",
                self.name,
                self.path,
                exc,
            )


class UrlIssuerKeys(IssuerKeys):
    """An HTTPS JWKS / bundle URL: cached, refreshed, refetched for an unknown kid."""

    def __init__(self, name: str, cfg: JwtIssuerConfig) -> None:
        super().__init__(name, cfg)
        assert cfg.bundle.url is not None and cfg.bundle.ca is not None
        self.url: str = cfg.bundle.url
        self.fetches = 0  # requests made (successful or not)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._last_refetch = float("-inf")

    def _ssl_context(self) -> ssl.SSLContext:
        ca = self.cfg.bundle.ca
        try:
            ctx = ssl.create_default_context(cafile=str(ca))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"jwt_issuers.{self.name}.bundle.ca: {ca}: {exc}") from None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    async def start(self) -> None:
        import aiohttp

        timeout = self.cfg.bundle.timeout.total_seconds()
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl_context(), limit=2),
            timeout=aiohttp.ClientTimeout(total=timeout),
            trust_env=False,  # no proxy from the environment
        )
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def close(self) -> None:
        await _cancel(self._task)
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _refresh_loop(self) -> None:
        retry = RETRY_MIN
        refresh = self.cfg.bundle.refresh.total_seconds()
        while True:
            ok = await self.refresh()
            if ok:
                retry = RETRY_MIN
                await asyncio.sleep(refresh)
            else:
                await asyncio.sleep(min(retry, refresh))
                retry = min(retry * 2, RETRY_MAX)

    async def refresh(self) -> bool:
        """Fetch once; on any failure log it and keep the previous keys (False)."""
        import aiohttp

        try:
            self.install(await self._fetch())
        except (KeySetError, OSError, TimeoutError, aiohttp.ClientError) as exc:
            log.warning(
                "jwt issuer %s: %s: %s; keeping the previous keys", self.name, self.url, exc
            )
            return False
        return True

    async def _fetch(self) -> KeySet:
        assert self._session is not None
        self.fetches += 1
        headers = {"Accept": "application/json"}
        async with self._session.get(self.url, allow_redirects=False, headers=headers) as resp:
            if resp.status != 200:
                raise KeySetError(f"HTTP status {resp.status}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_chunked(64 * 1024):
                size += len(chunk)
                if size > MAX_BUNDLE_BYTES:
                    raise KeySetError(f"response larger than {MAX_BUNDLE_BYTES} bytes")
                chunks.append(chunk)
        body = b"".join(chunks)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise KeySetError("response is not UTF-8") from None
        return self.parse(text)

    async def keys_for(self, kid: str) -> KeySet:
        current = self.keyset
        if current is not None and kid in current.keys:
            return current
        async with self._lock:
            current = self.keyset
            if current is None or kid not in current.keys:
                now = time.monotonic()
                if now - self._last_refetch >= self.cfg.bundle.refetch_min_interval.total_seconds():
                    self._last_refetch = now
                    await self.refresh()
        return await super().keys_for(kid)


class WorkloadApiIssuerKeys(IssuerKeys):
    """The JWT bundle of the issuer's trust domain from the SPIFFE Workload API."""

    def __init__(self, name: str, cfg: JwtIssuerConfig) -> None:
        super().__init__(name, cfg)
        self.socket = cfg.bundle.socket
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        await _cancel(self._task)

    async def _run(self) -> None:
        retry = RETRY_MIN
        while True:
            try:
                await self._stream()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "jwt issuer %s: Workload API: %s; keeping the previous keys", self.name, exc
                )
            await asyncio.sleep(retry)
            retry = min(retry * 2, RETRY_MAX)

    async def _stream(self) -> None:
        """One FetchJWTBundles stream, until it fails (raises) or is cancelled."""
        from spiffe import WorkloadApiClient

        loop = asyncio.get_running_loop()
        client = await asyncio.to_thread(WorkloadApiClient, self.socket)
        failed: asyncio.Future[Exception] = loop.create_future()

        def on_success(bundles: JwtBundleSet) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(self._install_bundles, bundles)

        def on_error(exc: Exception) -> None:
            def fail() -> None:
                if not failed.done():
                    failed.set_result(exc)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fail)

        handle = client.stream_jwt_bundles(on_success, on_error)
        try:
            raise await failed
        finally:
            handle.cancel()
            await asyncio.to_thread(client.close)

    def _install_bundles(self, bundles: JwtBundleSet) -> None:
        from spiffe import TrustDomain

        bundle = bundles.get_bundle_for_trust_domain(TrustDomain(self.cfg.trust_domain))
        if bundle is None:
            log.warning(
                "jwt issuer %s: the Workload API sent no JWT bundle for %s; keeping the "
                "previous keys",
                self.name,
                self.cfg.trust_domain,
            )
            return
        keys: dict[str, VerificationKey] = {}
        for kid, public_key in bundle.jwt_authorities.items():
            alg = implied_algorithm(public_key)
            if alg is not None and kid:
                keys[kid] = VerificationKey(kid, alg, public_key)  # type: ignore[arg-type]
        self._sequence += 1
        self.install(KeySet(sequence=self._sequence, keys=MappingProxyType(keys)))


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def build_issuer(name: str, cfg: JwtIssuerConfig, *, poll: timedelta) -> IssuerKeys:
    bundle = cfg.bundle
    if bundle.file is not None:
        return FileIssuerKeys(name, cfg, poll)
    if bundle.url is not None:
        return UrlIssuerKeys(name, cfg)
    return WorkloadApiIssuerKeys(name, cfg)


# ---------------------------------------------------------------------------------------------
# The registry


class JwtIssuers:
    """Every configured issuer by name; the signer (``signer``) is not one of them."""

    def __init__(self, configs: Mapping[str, JwtIssuerConfig], *, poll: timedelta) -> None:
        self.poll = poll
        self.issuers: dict[str, IssuerKeys] = {
            name: build_issuer(name, cfg, poll=poll) for name, cfg in configs.items()
        }

    def __bool__(self) -> bool:
        return bool(self.issuers)

    async def start(self) -> None:
        for issuer in self.issuers.values():
            await issuer.start()

    async def close(self) -> None:
        for issuer in self.issuers.values():
            await issuer.close()

    async def reconfigure(self, configs: Mapping[str, JwtIssuerConfig]) -> None:
        """After a reload: keep issuers whose settings are unchanged (and read their files
        again), start new or changed ones, close the rest. A changed issuer that cannot start
        is logged and holds no keys: its tokens get 503 ``issuer_unavailable``, never an allow."""
        current = dict(self.issuers)
        kept: dict[str, IssuerKeys] = {}
        for name, cfg in configs.items():
            old = current.get(name)
            if old is not None and old.cfg == cfg:
                kept[name] = current.pop(name)
                kept[name].reload()
                continue
            issuer = build_issuer(name, cfg, poll=self.poll)
            try:
                await issuer.start()
            except ConfigError as exc:
                log.error("reload: %s; issuer %s has no keys", exc, name)
            kept[name] = issuer
        self.issuers = kept
        for stale in current.values():
            await stale.close()

    def unready(self, names: Iterable[str]) -> str | None:
        """The first of ``names`` (other than the signer) that holds no key set yet."""
        for name in names:
            issuer = self.issuers.get(name)
            if name != SIGNER_ISSUER and (issuer is None or issuer.keyset is None):
                return name
        return None

    def select(self, token: str, accepted: Sequence[str], signer_issuer: str | None) -> str:
        """The issuer whose keys check ``token`` (see :func:`select_issuer`)."""
        with rejecting_tokens():
            origin = token_origin(token)
        candidates = [issuer.candidate for issuer in self.issuers.values()]
        if signer_issuer:
            candidates.insert(0, Candidate(SIGNER_ISSUER, signer_issuer, None))
        return select_issuer(origin, candidates, accepted)

    async def verify(
        self,
        name: str,
        token: str,
        *,
        audience: str,
        now: datetime,
        expected_subject: str | None,
        certificate_thumbprint: str | None,
        require_binding: bool,
    ) -> VerifiedToken:
        """Verify ``token`` with issuer ``name``'s keys only; raises TokenRejected or
        IssuerUnavailable."""
        issuer = self.issuers.get(name)
        if issuer is None:
            raise IssuerUnavailable(f"issuer {name!r} is not configured")
        with rejecting_tokens():
            kid = parse_token(token).kid
        keyset = await issuer.keys_for(kid)
        with rejecting_tokens():
            verified = verify_jwt_svid(
                token,
                lookup=keyset.lookup,
                policy=issuer.policy,
                audiences=(audience,),
                now=now,
                expected_subject=expected_subject,
                certificate_thumbprint=certificate_thumbprint,
                require_binding=require_binding,
            )
        domain = parse_spiffe_id(verified.subject, require_path=True).trust_domain.name
        if domain != issuer.cfg.trust_domain:
            raise TokenRejected(
                "bad_subject", f"sub is not in trust domain {issuer.cfg.trust_domain}"
            )
        return verified
