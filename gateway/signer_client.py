"""The gateway's side of the signer contract: verify JWTs remotely (``Verify``) or locally.

One persistent grpc.aio channel carries every call: to the signer's Unix socket, or, for a TCP
signer, to :class:`~svidgate.gateway.signer_channel.SignerConnector`, which relays it over TLS
once the signer's SPIFFE ID is verified on that connection. A
background task keeps a ``GetJWKS`` + ``WatchKeys`` subscription open: it feeds the local
verifier (``mode="local"``), evicts cached remote verifications whose key is gone, and tells
readiness whether the signer is reachable. Local verification is
:func:`svidgate.pki.jwt_svid.verify_jwt_svid`, the same core the signer's ``Verify`` runs, with
the issuer, ``max_ttl`` and clock skew the signer pushes with its keys (a configured
``signer.max_ttl`` / ``signer.clock_skew`` can only make them stricter). Every failure ends in
exactly one of two errors: :class:`TokenRejected` (the token is bad: 401, with the core's reason
code) or :class:`SignerUnavailable` (we could not find out: 503). Nothing here ever allows a
token it could not verify.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.exceptions import PyJWTError
from svidgate.gateway.errors import SignerUnavailable, TokenRejected
from svidgate.gateway.signer_channel import CONNECT_TIMEOUT, SignerConnector, SignerTLSFiles
from svidgate.pki.jose import ALGORITHMS, jws_algorithm, key_fits_algorithm, loads_strict
from svidgate.pki.jwt_svid import (
    JwtSvidError,
    UnknownKidError,
    VerificationKey,
    VerificationPolicy,
    VerifiedToken,
    check_binding,
    parse_token,
    precheck,
    verify_jwt_svid,
)
from svidgate.signer.v1 import REASON_METADATA_KEY

from svidgate.config import ConfigError

if TYPE_CHECKING:
    import grpc
    import grpc.aio
    from svidgate.signer.v1 import signer_pb2_grpc

log = logging.getLogger("svidgate.gateway.signer_client")

VerifyMode = Literal["remote", "local"]

DEFAULT_CLOCK_SKEW = timedelta(seconds=30)
DEFAULT_CACHE_ENTRIES = 10_000
DEFAULT_CACHE_BYTES = 16 * 1024 * 1024  # per cache (remote and local each have one)
DEFAULT_CACHE_TOKEN_BYTES = 4096  # longer tokens are verified every time, never cached
# Bytes one cache entry costs besides its claims and key strings: the OrderedDict slot, the key
# tuple and its 32-byte digest, _CacheEntry, VerifiedToken, its MappingProxyType and the float.
# tracemalloc on CPython 3.11 measured about 420 bytes; rounded up.
CACHE_ENTRY_OVERHEAD = 512
REFETCH_MIN_INTERVAL = 1.0  # seconds between two GetJWKS refetches triggered by unknown kids
RECONNECT_BACKOFF_MIN = 0.05
RECONNECT_BACKOFF_MAX = 2.0
# How long gRPC gives one connection attempt to reach the signer's SETTINGS frame. gRPC core
# takes it from grpc.min_reconnect_backoff_ms (its MIN_CONNECT_TIMEOUT): at 100 ms every attempt
# that took longer (a TCP signer's TLS handshake and identity check, a loaded host) was
# abandoned and dialled again. Twice the connector's own deadline, so for a TCP signer the
# connector decides when an attempt failed.
CONNECT_ATTEMPT_TIMEOUT_MS = int(2 * CONNECT_TIMEOUT * 1000)
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth"})
# gRPC codes whose failure is about the token itself; every other code means "could not ask".
_TOKEN_ERROR_CODES = frozenset({"UNAUTHENTICATED", "INVALID_ARGUMENT"})


class CacheSettings(Protocol):
    """What the client needs from ``gateway.config.SignerCacheConfig``."""

    @property
    def max_entries(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def max_token_bytes(self) -> int: ...


class SignerSettings(Protocol):
    """What the client needs from ``gateway.config.SignerClientConfig``."""

    @property
    def address(self) -> str: ...
    @property
    def timeout(self) -> timedelta: ...
    @property
    def tls(self) -> SignerTLSFiles | None: ...


# ---------------------------------------------------------------------------------------------
# Verification cache (remote mode)

CacheKey = tuple[bytes, str, str, str, bool]


def cache_key(
    token: str,
    audience: str,
    expected_subject: str | None,
    thumbprint: str | None,
    require_binding: bool = False,
) -> CacheKey:
    """Key of one verification; the token is hashed so the cache never holds bearer tokens."""
    digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
    return (digest, audience, expected_subject or "", thumbprint or "", require_binding)


def deep_size(value: object) -> int:
    """Bytes held by a decoded JSON value (``sys.getsizeof`` over dicts, lists and scalars).
    Shared objects (small ints, interned keys) are counted each time: an over-estimate. Claims
    come from ``loads_strict``, so the recursion is at most MAX_JSON_DEPTH (64) deep."""
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        for key, item in value.items():
            size += deep_size(key) + deep_size(item)
    elif isinstance(value, list):
        for item in value:
            size += deep_size(item)
    return size


def entry_cost(key: CacheKey, token: VerifiedToken) -> int:
    """What one cached verification costs in memory: :data:`CACHE_ENTRY_OVERHEAD`, the claims
    as Python objects and the strings of the key (the token itself is never held, only its
    SHA-256). Checked against tracemalloc in tests/gateway/test_signer_client.py."""
    strings = sum(sys.getsizeof(part) for part in key[1:4]) + sys.getsizeof(token.subject)
    return CACHE_ENTRY_OVERHEAD + strings + deep_size(dict(token.claims))


@dataclass(slots=True)
class _CacheEntry:
    token: VerifiedToken
    valid_until: float
    cost: int


class VerificationCache:
    """LRU of successful verifications, each valid until ``min(exp, key removal)``, bounded by
    ``max_entries`` and by ``max_bytes`` (the sum of :func:`entry_cost`). A token longer than
    ``max_token_bytes`` is not cached (it is verified every time)."""

    def __init__(
        self,
        max_entries: int = DEFAULT_CACHE_ENTRIES,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        max_token_bytes: int = DEFAULT_CACHE_TOKEN_BYTES,
    ) -> None:
        if max_entries < 1 or max_bytes < 1 or max_token_bytes < 0:
            raise ValueError("max_entries and max_bytes must be positive, max_token_bytes >= 0")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_token_bytes = max_token_bytes
        self._entries: OrderedDict[CacheKey, _CacheEntry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """The summed cost of the entries held now."""
        return self._bytes

    def get(self, key: CacheKey, *, now: float) -> VerifiedToken | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.valid_until:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry.token

    def put(
        self,
        key: CacheKey,
        token: VerifiedToken,
        *,
        valid_until: float,
        now: float,
        token_bytes: int,
    ) -> bool:
        """Cache a verification of a token of ``token_bytes`` bytes, evicting the least
        recently used entries to stay within both bounds; False when it is not cached."""
        if valid_until <= now or token_bytes > self.max_token_bytes:
            return False
        cost = entry_cost(key, token)
        if cost > self.max_bytes:
            return False
        self._drop(key)
        self._entries[key] = _CacheEntry(token, valid_until, cost)
        self._bytes += cost
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.cost
        return True

    def retain_kids(self, kids: Collection[str]) -> int:
        """Drop every entry verified with a key that is no longer published; returns the count."""
        gone = [k for k, e in self._entries.items() if e.token.kid not in kids]
        for k in gone:
            self._drop(k)
        return len(gone)

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    def _drop(self, key: CacheKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry.cost


# ---------------------------------------------------------------------------------------------
# Key set (local mode). The verification rules are pki.jwt_svid's, shared with the signer; the
# gateway never imports the signer.


class KeySetError(ValueError):
    """A JWKS document from the signer is unusable; the previous key set stays in force."""


@dataclass(frozen=True)
class KeySet:
    """The signer's public keys as pushed over WatchKeys (a full set per message), with the
    token rules it pushes beside them (``None``: not sent)."""

    sequence: int
    keys: Mapping[str, VerificationKey]
    issuer: str | None = None
    max_ttl: timedelta | None = None
    clock_skew: timedelta | None = None

    @classmethod
    def parse(
        cls,
        jwks_json: str,
        sequence: int,
        *,
        max_ttl_seconds: int = 0,
        clock_skew_seconds: int = 0,
        bundle: bool = False,
    ) -> KeySet:
        """Parse and check a JWKS: every key needs a unique ``kid``, an allowed ``alg`` that
        fits its key type, no private members; ``use`` (when present) must be ``sig``.
        ``max_ttl_seconds`` 0 means the signer sent none (then the skew is unknown too).

        ``bundle``: another issuer's JWKS or SPIFFE bundle (:mod:`gateway.jwt_issuers`): keys
        for other uses (``x509-svid``, ``enc``) or of types no allowed algorithm takes are
        skipped, ``use`` may also be ``jwt-svid``, and a key without ``alg`` gets the one its
        type implies (:func:`implied_algorithm`); kids must still be unique."""
        try:
            doc = loads_strict(jwks_json)
        except ValueError as exc:
            raise KeySetError(f"JWKS is not JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise KeySetError('JWKS must be an object with a "keys" array')
        if max_ttl_seconds < 0 or clock_skew_seconds < 0:
            raise KeySetError("negative max_ttl_seconds or clock_skew_seconds")
        keys: dict[str, VerificationKey] = {}
        for index, raw in enumerate(doc["keys"]):
            if bundle:
                found = _parse_bundle_jwk(raw, f"keys[{index}]")
                if found is None:
                    continue
                key = found
            else:
                key = _parse_jwk(raw, f"keys[{index}]")
            if key.kid in keys:
                raise KeySetError(f"keys[{index}]: duplicate kid {key.kid!r}")
            keys[key.kid] = key
        issuer = doc.get("issuer")
        pushed = max_ttl_seconds > 0
        return cls(
            sequence=sequence,
            keys=MappingProxyType(keys),
            issuer=issuer if isinstance(issuer, str) and issuer else None,
            max_ttl=timedelta(seconds=max_ttl_seconds) if pushed else None,
            clock_skew=timedelta(seconds=clock_skew_seconds) if pushed else None,
        )

    def lookup(self, kid: str) -> VerificationKey:
        """The key published under ``kid``; raises UnknownKidError (kid is only a dict key)."""
        key = self.keys.get(kid)
        if key is None:
            raise UnknownKidError("no such key")
        return key


def implied_algorithm(public_key: object) -> str | None:
    """The algorithm a key without ``alg`` is taken with: EC P-256 → ES256, Ed25519 → EdDSA,
    RSA (≥ 2048 bits) → RS256 (what SPIRE signs with); None for anything else."""
    for alg in ("ES256", "EdDSA", "RS256"):
        if key_fits_algorithm(alg, public_key):
            return alg
    return None


def _parse_bundle_jwk(raw: Any, where: str) -> VerificationKey | None:
    """One member of another issuer's JWKS / SPIFFE bundle, or None when it is not a JWT
    signing key svidgate can use; raises KeySetError for a broken or private key."""
    if not isinstance(raw, dict):
        raise KeySetError(f"{where}: not an object")
    if PRIVATE_JWK_MEMBERS & raw.keys():
        raise KeySetError(f"{where}: contains private key material")
    if raw.get("use", "sig") not in ("sig", "jwt-svid"):
        return None
    if "alg" in raw:
        if raw["alg"] not in ALGORITHMS:
            return None
        return _parse_jwk({**raw, "use": "sig"}, where)
    kty = {"EC": "ES256", "OKP": "EdDSA", "RSA": "RS256"}.get(str(raw.get("kty")))
    if kty is None:
        return None
    try:
        key = _parse_jwk({**raw, "use": "sig", "alg": kty}, where)
    except KeySetError:
        return None  # e.g. an EC key on another curve: not one svidgate verifies with
    return key if implied_algorithm(key.public_key) == key.algorithm else None


def _parse_jwk(raw: Any, where: str) -> VerificationKey:
    """One public JWK of the signer's JWKS as a verification key; raises KeySetError."""
    if not isinstance(raw, dict):
        raise KeySetError(f"{where}: not an object")
    kid = raw.get("kid")
    alg = raw.get("alg")
    if not isinstance(kid, str) or not kid:
        raise KeySetError(f"{where}: missing kid")
    if not isinstance(alg, str) or alg not in ALGORITHMS:
        raise KeySetError(f"{where} ({kid}): alg {alg!r} is not allowed")
    if raw.get("use", "sig") != "sig":
        raise KeySetError(f"{where} ({kid}): use must be 'sig'")
    if PRIVATE_JWK_MEMBERS & raw.keys():
        raise KeySetError(f"{where} ({kid}): contains private key material")
    try:
        public_key = jws_algorithm(alg).from_jwk(raw)
    except (PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise KeySetError(f"{where} ({kid}): unusable key: {exc}") from None
    if not key_fits_algorithm(alg, public_key) or not isinstance(
        public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
    ):
        raise KeySetError(f"{where} ({kid}): key type does not fit alg {alg}")
    return VerificationKey(kid=kid, algorithm=alg, public_key=public_key)


def local_policy(
    keys: KeySet, *, issuer: str | None, max_ttl: timedelta | None, clock_skew: timedelta
) -> VerificationPolicy:
    """The rules of local verification, never more lenient than the signer's own ``Verify``:
    the configured issuer (else the JWKS ``issuer``), the smaller of the pushed and configured
    ``max_ttl`` and of the pushed and configured clock skew. Raises SignerUnavailable when no
    issuer or no ``max_ttl`` is known (a signer that has not pushed one)."""
    expected_issuer = issuer or keys.issuer
    if not expected_issuer:
        raise SignerUnavailable("no issuer known for local verification (set signer.issuer)")
    limits = [limit for limit in (keys.max_ttl, max_ttl) if limit is not None]
    if not limits:
        raise SignerUnavailable("the signer has sent no max_ttl: local verification unavailable")
    skew = clock_skew if keys.clock_skew is None else min(clock_skew, keys.clock_skew)
    return VerificationPolicy(expected_issuer, skew, min(limits))


@contextlib.contextmanager
def rejecting_tokens() -> Iterator[None]:
    """Translate the core's JwtSvidError into the gateway's TokenRejected (401), same reason."""
    try:
        yield
    except JwtSvidError as err:
        raise TokenRejected(err.reason, err.detail) from None


# ---------------------------------------------------------------------------------------------
# The client


def _reason_from_error(err: grpc.aio.AioRpcError) -> tuple[str, str]:
    """The signer's reason code: trailing metadata first, then the ``reason: …`` message prefix."""
    reason = ""
    trailing: Any = err.trailing_metadata()
    if trailing:
        for md_key, value in trailing:
            if md_key == REASON_METADATA_KEY and isinstance(value, str):
                reason = value
                break
    message = err.details() or ""
    prefix, sep, rest = message.partition(":")
    if not reason and sep and prefix and prefix.replace("_", "").isalnum():
        reason = prefix
    detail = rest.strip() if sep and prefix == reason else message
    return (reason or "rejected"), detail[:200]


@dataclass
class _WatchState:
    connected: bool = False
    keyset: KeySet | None = None
    last_refetch: float = float("-inf")
    refetch_lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class SignerClient:
    """Verifies JWTs through the signer; create with :meth:`from_config`, then :meth:`start`."""

    def __init__(
        self,
        *,
        address: str,
        timeout: timedelta,
        tls: SignerTLSFiles | None = None,
        issuer: str | None = None,
        clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
        max_ttl: timedelta | None = None,
        cache: CacheSettings | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``issuer``, ``clock_skew``, ``max_ttl``: local verification (see :func:`local_policy`);
        ``cache``: the bounds of each verification cache (default: the module's defaults);
        ``clock``: Unix seconds for token times and cache lifetimes."""
        if not address:
            raise ConfigError("signer.address: empty")
        if address.startswith("unix:") and tls is not None:
            raise ConfigError("signer.tls: only for a TCP address, not unix:")
        if not address.startswith("unix:") and tls is None:
            raise ConfigError("signer.tls: required for a TCP signer address (mTLS)")
        if tls is not None and not tls.spiffe_id:
            raise ConfigError("signer.tls.spiffe_id: is required for a TCP signer")
        if max_ttl is not None and max_ttl < timedelta(seconds=1):
            raise ConfigError("signer.max_ttl: must be at least 1s")
        self.address = address
        self.timeout = timeout
        self.tls = tls
        self.issuer = issuer
        self.clock_skew = clock_skew
        self.max_ttl = max_ttl
        self.clock = clock
        bounds = (
            (DEFAULT_CACHE_ENTRIES, DEFAULT_CACHE_BYTES, DEFAULT_CACHE_TOKEN_BYTES)
            if cache is None
            else (cache.max_entries, cache.max_bytes, cache.max_token_bytes)
        )
        self.cache = VerificationCache(*bounds)
        # Local verifications, kept apart from remote ones: same key, same lifetime rules.
        self.local_cache = VerificationCache(*bounds)
        self._channel: grpc.aio.Channel | None = None
        self._connector: SignerConnector | None = None
        self._stub: signer_pb2_grpc.SignerStub | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._state = _WatchState()

    @classmethod
    def from_config(cls, cfg: SignerSettings) -> SignerClient:
        """Build a client from the gateway's ``signer`` section; cheap, no I/O."""
        return cls(
            address=cfg.address,
            timeout=cfg.timeout,
            tls=cfg.tls,
            issuer=getattr(cfg, "issuer", None),
            clock_skew=getattr(cfg, "clock_skew", None) or DEFAULT_CLOCK_SKEW,
            max_ttl=getattr(cfg, "max_ttl", None),
            cache=getattr(cfg, "cache", None),
        )

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the channel and start the key subscription; does not wait for the signer."""
        if self._channel is not None:
            return
        import grpc
        import grpc.aio
        from svidgate.signer.v1 import signer_pb2_grpc

        options: list[tuple[str, Any]] = [
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", CONNECT_ATTEMPT_TIMEOUT_MS),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # gRPC servers refuse pings more often than every 5 min by default (GOAWAY)
            ("grpc.keepalive_time_ms", 300_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.enable_retries", 0),
        ]
        target = self.address
        if self.tls is not None:
            # TCP: gRPC speaks to a private Unix socket; the connector relays to the signer over
            # TLS after verifying its SPIFFE ID on that very connection (signer_channel.py).
            connector = SignerConnector(self.address, self.tls)
            target = await connector.start()
            self._connector = connector
            options.append(("grpc.default_authority", self.address))
        channel = grpc.aio.insecure_channel(target, options=options)
        self._channel = channel
        self._stub = signer_pb2_grpc.SignerStub(channel)  # type: ignore[no-untyped-call]
        self._watch_task = asyncio.create_task(self._watch_keys(), name="signer-watch-keys")

    async def close(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:
            await channel.close(grace=None)
        connector, self._connector = self._connector, None
        if connector is not None:
            await connector.close()
        self._state.connected = False

    def _failure(self, rpc: str, code: str) -> str:
        identity_error = self.identity_error
        return f"signer {rpc} failed: {code}" + (f" ({identity_error})" if identity_error else "")

    @property
    def identity_error(self) -> str | None:
        """Why the last TCP connection to the signer was refused (a wrong or untrusted SPIFFE
        ID), until a connection to the right signer succeeds; None over a Unix socket."""
        return self._connector.identity_error if self._connector is not None else None

    async def __aenter__(self) -> SignerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def ready(self, *, mode: VerifyMode = "remote") -> bool:
        """Remote: the key subscription is live (the signer answers). Local: a key set is held
        (the last good one is kept while the signer is away) with an issuer and a max_ttl."""
        if self._channel is None or self.identity_error is not None:
            return False
        if mode == "local":
            keyset = self._state.keyset
            if keyset is None:
                return False
            try:
                self._local_policy(keyset)
            except SignerUnavailable:
                return False
            return True
        return self._state.connected

    def _local_policy(self, keyset: KeySet) -> VerificationPolicy:
        return local_policy(
            keyset, issuer=self.issuer, max_ttl=self.max_ttl, clock_skew=self.clock_skew
        )

    @property
    def known_issuer(self) -> str | None:
        """The ``iss`` of this signer's tokens: ``signer.issuer``, else the one it publishes."""
        keyset = self._state.keyset
        return self.issuer or (keyset.issuer if keyset is not None else None)

    @property
    def keyset(self) -> KeySet | None:
        """The last good key set received from the signer (``None`` before the first)."""
        return self._state.keyset

    # -- verification ---------------------------------------------------------------------------

    async def verify(
        self,
        token: str,
        *,
        audience: str,
        mode: VerifyMode,
        expected_subject: str | None = None,
        certificate_thumbprint: str | None = None,
        require_binding: bool | None = None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> VerifiedToken:
        """Verify ``token`` for ``audience``; raises TokenRejected or SignerUnavailable.

        ``expected_subject``: ``sub`` must equal it. ``certificate_thumbprint``: the connection's
        ``x5t#S256``; a certificate-bound token always needs it to match, and
        ``require_binding`` (default: whether a thumbprint is given) refuses unbound tokens.
        ``metadata``: sent with a remote Verify (the trace context).
        """
        if not audience:
            raise ValueError("audience is required")
        require = bool(certificate_thumbprint) if require_binding is None else require_binding
        if mode == "local":
            return await self._verify_local(
                token, audience, expected_subject, certificate_thumbprint, require
            )
        if mode != "remote":
            raise ValueError(f"unknown verify mode {mode!r}")
        return await self._verify_remote(
            token, audience, expected_subject, certificate_thumbprint, require, metadata=metadata
        )

    async def _verify_remote(
        self,
        token: str,
        audience: str,
        expected_subject: str | None,
        thumbprint: str | None,
        require_binding: bool,
        *,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> VerifiedToken:
        import grpc
        import grpc.aio
        from svidgate.signer.v1 import signer_pb2

        with rejecting_tokens():
            precheck(token)
        key = cache_key(token, audience, expected_subject, thumbprint, require_binding)
        cached = self.cache.get(key, now=self.clock())
        if cached is not None:
            return cached
        stub = self._require_stub()
        request = signer_pb2.VerifyRequest(
            token=token,
            audience=[audience],
            expected_subject=expected_subject or "",
            certificate_thumbprint=thumbprint or "",
            require_binding=require_binding,
        )
        try:
            response = await stub.Verify(
                request, timeout=self.timeout.total_seconds(), metadata=metadata
            )
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code.name in _TOKEN_ERROR_CODES:
                reason, detail = _reason_from_error(err)
                raise TokenRejected(reason, detail) from None
            raise SignerUnavailable(self._failure("Verify", code.name)) from None
        except (asyncio.CancelledError, grpc.aio.UsageError) as err:
            if isinstance(err, asyncio.CancelledError):
                raise
            raise SignerUnavailable("signer channel is closed") from None
        verified = _remote_result(response)
        # Defence in depth: the binding the route asked for is checked here too.
        with rejecting_tokens():
            check_binding(
                verified.claims,
                expected_subject=expected_subject,
                certificate_thumbprint=thumbprint,
                require_binding=require_binding,
            )
        valid_until = float(response.expires_at)
        if response.key_valid_until:
            valid_until = min(valid_until, float(response.key_valid_until))
        keyset = self._state.keyset
        if keyset is None or verified.kid in keyset.keys:
            self.cache.put(
                key, verified, valid_until=valid_until, now=self.clock(), token_bytes=len(token)
            )
        return verified

    async def _verify_local(
        self,
        token: str,
        audience: str,
        expected_subject: str | None,
        thumbprint: str | None,
        require_binding: bool,
    ) -> VerifiedToken:
        with rejecting_tokens():
            precheck(token)
        key = cache_key(token, audience, expected_subject, thumbprint, require_binding)
        now = self.clock()
        cached = self.local_cache.get(key, now=now)
        current = self._state.keyset
        if cached is not None and current is not None and cached.kid in current.keys:
            # The key already pins subject, thumbprint and binding mode; check the binding
            # again anyway (cheap), so a cache hit can never weaken it.
            with rejecting_tokens():
                check_binding(
                    cached.claims,
                    expected_subject=expected_subject,
                    certificate_thumbprint=thumbprint,
                    require_binding=require_binding,
                )
            return cached
        with rejecting_tokens():
            kid = parse_token(token).kid
        keyset = self._state.keyset
        if keyset is None or kid not in keyset.keys:
            keyset = await self._refetch_for_kid(kid)
        policy = self._local_policy(keyset)
        with rejecting_tokens():
            verified = verify_jwt_svid(
                token,
                lookup=keyset.lookup,
                policy=policy,
                audiences=(audience,),
                now=datetime.fromtimestamp(now, UTC),
                expected_subject=expected_subject,
                certificate_thumbprint=thumbprint,
                require_binding=require_binding,
            )
        if self._state.keyset is keyset:  # not replaced while we were refetching
            # Valid until exp (the clock skew is not extended to cached entries); an entry
            # leaves earlier when its key is removed or changed (:meth:`_install_keyset`).
            valid_until = float(verified.expires_at)
            self.local_cache.put(
                key, verified, valid_until=valid_until, now=now, token_bytes=len(token)
            )
        return verified

    async def _refetch_for_kid(self, kid: str) -> KeySet:
        """Unknown kid: ask GetJWKS once (rate-limited, one fetch in flight at a time)."""
        state = self._state
        async with state.refetch_lock:
            current = state.keyset
            if current is not None and kid in current.keys:
                return current  # another request fetched it meanwhile
            now = time.monotonic()
            if now - state.last_refetch >= REFETCH_MIN_INTERVAL:
                state.last_refetch = now
                try:
                    await self._fetch_jwks()
                except SignerUnavailable:
                    if state.keyset is None:
                        raise
                    log.warning("signer unreachable while refetching keys for an unknown kid")
            if state.keyset is None:
                raise SignerUnavailable("no signer keys yet")
            return state.keyset

    async def _fetch_jwks(self) -> KeySet:
        import grpc.aio
        from svidgate.signer.v1 import signer_pb2

        stub = self._require_stub()
        try:
            response = await stub.GetJWKS(
                signer_pb2.GetJWKSRequest(), timeout=self.timeout.total_seconds()
            )
        except grpc.aio.AioRpcError as err:
            raise SignerUnavailable(self._failure("GetJWKS", err.code().name)) from None
        return self._install_keyset(
            response.jwks_json,
            response.sequence,
            max_ttl_seconds=response.max_ttl_seconds,
            clock_skew_seconds=response.clock_skew_seconds,
        )

    def _install_keyset(
        self,
        jwks_json: str,
        sequence: int,
        *,
        max_ttl_seconds: int = 0,
        clock_skew_seconds: int = 0,
    ) -> KeySet:
        try:
            keyset = KeySet.parse(
                jwks_json,
                int(sequence),
                max_ttl_seconds=int(max_ttl_seconds),
                clock_skew_seconds=int(clock_skew_seconds),
            )
        except KeySetError as exc:
            log.error("ignoring an unusable key set from the signer: %s", exc)
            raise SignerUnavailable("signer published an unusable key set") from None
        previous = self._state.keyset
        self._state.keyset = keyset
        evicted = self.cache.retain_kids(keyset.keys.keys())
        evicted += self.local_cache.retain_kids(_unchanged_kids(previous, keyset))
        if previous is None or previous.keys.keys() != keyset.keys.keys():
            log.info(
                "signer key set %d: kids %s (evicted %d cached verifications)",
                keyset.sequence,
                ",".join(sorted(keyset.keys)),
                evicted,
            )
        return keyset

    def _require_stub(self) -> signer_pb2_grpc.SignerStub:
        # No gate on identity_error here: RPCs only ever travel over verified connections, and
        # they are what makes gRPC dial again once the genuine signer is back.
        if self._stub is None:
            raise SignerUnavailable("signer client is not started")
        return self._stub

    # -- key subscription -----------------------------------------------------------------------

    async def _watch_keys(self) -> None:
        """Keep GetJWKS + WatchKeys open; reconnect with jittered backoff; keep the last keys."""
        import grpc.aio
        from svidgate.signer.v1 import signer_pb2

        backoff = RECONNECT_BACKOFF_MIN
        while True:
            try:
                keyset = await self._fetch_jwks()
                stub = self._require_stub()
                stream = stub.WatchKeys(signer_pb2.WatchKeysRequest(after_sequence=keyset.sequence))
                self._state.connected = True
                backoff = RECONNECT_BACKOFF_MIN
                async for message in stream:
                    with contextlib.suppress(SignerUnavailable):
                        self._install_keyset(
                            message.jwks_json,
                            message.sequence,
                            max_ttl_seconds=message.max_ttl_seconds,
                            clock_skew_seconds=message.clock_skew_seconds,
                        )
                log.warning("signer key stream ended; reconnecting")
            except asyncio.CancelledError:
                raise
            except (SignerUnavailable, grpc.aio.AioRpcError, OSError) as exc:
                if self._state.connected:
                    log.warning("signer key stream lost (%s); keeping the last key set", exc)
            except Exception:
                log.exception("unexpected error in the signer key stream")
            self._state.connected = False
            await asyncio.sleep(backoff * (0.5 + random.random()))  # noqa: S311 - jitter only
            backoff = min(backoff * 2, RECONNECT_BACKOFF_MAX)


def _remote_result(response: Any) -> VerifiedToken:
    """A VerifyResponse as a VerifiedToken; a response that does not hang together means the
    signer could not be asked properly (503), never an allow."""
    try:
        claims = loads_strict(response.claims_json) if response.claims_json else {}
    except ValueError:
        raise SignerUnavailable("signer returned unreadable claims") from None
    if not isinstance(claims, dict) or not response.subject or not response.kid:
        raise SignerUnavailable("signer returned an incomplete VerifyResponse")
    if claims.get("sub") != response.subject:
        raise SignerUnavailable("signer returned a subject that is not the token's sub")
    return VerifiedToken(
        kid=response.kid,
        subject=response.subject,
        expires_at=int(response.expires_at),
        claims=MappingProxyType(claims),
    )


def _unchanged_kids(previous: KeySet | None, current: KeySet) -> set[str]:
    """Kids whose key, algorithm and token rules (issuer, max_ttl, skew) are the same in both
    sets: local verifications made under anything else (a removed key, another key under the
    same kid, new rules) are dropped."""
    if previous is None or (previous.issuer, previous.max_ttl, previous.clock_skew) != (
        current.issuer,
        current.max_ttl,
        current.clock_skew,
    ):
        return set()
    same: set[str] = set()
    for kid, key in current.keys.items():
        old = previous.keys.get(kid)
        if (
            old is not None
            and old.algorithm == key.algorithm
            and _same_public_key(old.public_key, key.public_key)
        ):
            same.add(kid)
    return same


def _same_public_key(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an exotic key type without equality: treat it as changed
        return False
