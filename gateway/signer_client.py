"""The gateway's side of the signer contract: verify JWTs remotely (``Verify``) or locally.

One persistent grpc.aio channel (a Unix socket, or TCP with mTLS) carries every call. A
background task keeps a ``GetJWKS`` + ``WatchKeys`` subscription open: it feeds the local
verifier (``mode="local"``), evicts cached remote verifications whose key is gone, and tells
readiness whether the signer is reachable. Every failure ends in exactly one of two errors:
:class:`TokenRejected` (the token is bad: 401) or :class:`SignerUnavailable` (we could not
find out: 503). Nothing here ever allows a token it could not verify.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import ssl
import time
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, Protocol

from jwt.algorithms import Algorithm, get_default_algorithms
from jwt.exceptions import PyJWTError
from svidgate.gateway.errors import SignerUnavailable, TokenRejected
from svidgate.pki.errors import PkiError
from svidgate.pki.jose import b64url_decode, key_fits_algorithm, loads_strict
from svidgate.pki.spiffe_id import parse_spiffe_id

from svidgate.config import ConfigError

if TYPE_CHECKING:
    import grpc
    import grpc.aio
    from svidgate.signer.v1 import signer_pb2_grpc

log = logging.getLogger("svidgate.gateway.signer_client")

VerifyMode = Literal["remote", "local"]

REASON_METADATA_KEY = "svidgate-reason"
MAX_TOKEN_BYTES = 8 * 1024
DEFAULT_CLOCK_SKEW = timedelta(seconds=30)
DEFAULT_CACHE_ENTRIES = 10_000
REFETCH_MIN_INTERVAL = 1.0  # seconds between two GetJWKS refetches triggered by unknown kids
RECONNECT_BACKOFF_MIN = 0.05
RECONNECT_BACKOFF_MAX = 2.0

# Asymmetric algorithms only; the algorithm always comes from the key, never from the token.
ALLOWED_ALGORITHMS = ("EdDSA", "ES256", "RS256", "PS256")
ALLOWED_HEADERS = frozenset({"alg", "kid", "typ"})
# Header parameters that would let a token pick its own key or demand unknown semantics.
FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "crit", "zip", "cty", "b64")
CNF_THUMBPRINT = "x5t#S256"
_ALGORITHMS: Mapping[str, Algorithm] = MappingProxyType(
    {name: alg for name, alg in get_default_algorithms().items() if name in ALLOWED_ALGORITHMS}
)
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "k", "oth"})
REQUIRED_CLAIMS = ("iss", "sub", "aud", "exp", "iat")
# gRPC codes whose failure is about the token itself; every other code means "could not ask".
_TOKEN_ERROR_CODES = frozenset({"UNAUTHENTICATED", "INVALID_ARGUMENT"})


class SignerTLSSettings(Protocol):
    """What the client needs from ``gateway.config.SignerTLS`` (paths already absolute)."""

    @property
    def cert(self) -> Path: ...
    @property
    def key(self) -> Path: ...
    @property
    def bundle(self) -> Path: ...
    @property
    def spiffe_id(self) -> str | None: ...
    @property
    def server_name(self) -> str: ...


class SignerSettings(Protocol):
    """What the client needs from ``gateway.config.SignerClientConfig``."""

    @property
    def address(self) -> str: ...
    @property
    def timeout(self) -> timedelta: ...
    @property
    def tls(self) -> SignerTLSSettings | None: ...


@dataclass(frozen=True)
class VerifiedToken:
    """A token the signer (or the local verifier) accepted; ``claims`` is read-only."""

    subject: str
    claims: Mapping[str, Any]
    kid: str
    expires_at: int


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


@dataclass
class _CacheEntry:
    token: VerifiedToken
    valid_until: float


class VerificationCache:
    """Bounded LRU of successful verifications, each valid until ``min(exp, key removal)``."""

    def __init__(self, max_entries: int = DEFAULT_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, _CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey, *, now: float) -> VerifiedToken | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.valid_until:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.token

    def put(self, key: CacheKey, token: VerifiedToken, *, valid_until: float, now: float) -> None:
        if valid_until <= now:
            return
        self._entries[key] = _CacheEntry(token, valid_until)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def retain_kids(self, kids: Collection[str]) -> int:
        """Drop every entry verified with a key that is no longer published; returns the count."""
        gone = [k for k, e in self._entries.items() if e.token.kid not in kids]
        for k in gone:
            del self._entries[k]
        return len(gone)

    def clear(self) -> None:
        self._entries.clear()


# ---------------------------------------------------------------------------------------------
# Key set and local verification (pure: ``now`` is an argument). The rules mirror the signer's
# verifier (signer/jwt.py) exactly, reason codes included; the gateway never imports the signer.


class KeySetError(ValueError):
    """A JWKS document from the signer is unusable; the previous key set stays in force."""


@dataclass(frozen=True)
class VerificationKey:
    kid: str
    algorithm: str
    public_key: Any


@dataclass(frozen=True)
class KeySet:
    """The signer's public keys as pushed over WatchKeys (a full set per message)."""

    sequence: int
    keys: Mapping[str, VerificationKey]
    issuer: str | None = None

    @classmethod
    def parse(cls, jwks_json: str, sequence: int) -> KeySet:
        """Parse and check a JWKS: every key needs a unique ``kid``, an allowed ``alg`` that
        fits its key type, no private members; ``use`` (when present) must be ``sig``."""
        try:
            doc = json.loads(jwks_json)
        except (ValueError, RecursionError) as exc:
            raise KeySetError(f"JWKS is not JSON: {exc}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise KeySetError('JWKS must be an object with a "keys" array')
        keys: dict[str, VerificationKey] = {}
        for index, raw in enumerate(doc["keys"]):
            where = f"keys[{index}]"
            if not isinstance(raw, dict):
                raise KeySetError(f"{where}: not an object")
            kid = raw.get("kid")
            alg = raw.get("alg")
            if not isinstance(kid, str) or not kid:
                raise KeySetError(f"{where}: missing kid")
            if kid in keys:
                raise KeySetError(f"{where}: duplicate kid {kid!r}")
            if alg not in ALLOWED_ALGORITHMS:
                raise KeySetError(f"{where} ({kid}): alg {alg!r} is not allowed")
            if raw.get("use", "sig") != "sig":
                raise KeySetError(f"{where} ({kid}): use must be 'sig'")
            if PRIVATE_JWK_MEMBERS & raw.keys():
                raise KeySetError(f"{where} ({kid}): contains private key material")
            try:
                public_key = _ALGORITHMS[alg].from_jwk(raw)
            except (PyJWTError, ValueError, TypeError, KeyError) as exc:
                raise KeySetError(f"{where} ({kid}): unusable key: {exc}") from None
            if not key_fits_algorithm(str(alg), public_key):
                raise KeySetError(f"{where} ({kid}): key type does not fit alg {alg}")
            keys[kid] = VerificationKey(kid=kid, algorithm=str(alg), public_key=public_key)
        issuer = doc.get("issuer")
        return cls(
            sequence=sequence,
            keys=MappingProxyType(keys),
            issuer=issuer if isinstance(issuer, str) and issuer else None,
        )


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = loads_strict(data)
    except (ValueError, RecursionError):
        raise TokenRejected("malformed", f"{what} is not valid JSON") from None
    if not isinstance(value, dict):
        raise TokenRejected("malformed", f"{what} is not a JSON object")
    return value


def precheck_token(token: str) -> None:
    """Checks so cheap they run before any RPC: size and the compact-JWS shape."""
    if len(token) > MAX_TOKEN_BYTES or len(token.encode("utf-8", "replace")) > MAX_TOKEN_BYTES:
        raise TokenRejected("too_large", f"token is larger than {MAX_TOKEN_BYTES} bytes")
    if token.count(".") != 2:
        raise TokenRejected("malformed", "not a compact JWS (three dot-separated parts)")


@dataclass(frozen=True)
class ParsedToken:
    header: Mapping[str, Any]
    signing_input: bytes
    payload_b64: str
    signature: bytes
    alg: str
    kid: str


def parse_token(token: str) -> ParsedToken:
    """Structure and header checks, before any key is looked up; raises TokenRejected."""
    precheck_token(token)
    header_b64, payload_b64, sig_b64 = token.split(".")
    try:
        header_raw = b64url_decode(header_b64)
        signature = b64url_decode(sig_b64)
        b64url_decode(payload_b64)
    except ValueError:
        raise TokenRejected("malformed", "a part is not base64url") from None
    header = _json_object(header_raw, "header")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise TokenRejected("malformed", "header alg is missing")
    if alg not in ALLOWED_ALGORITHMS:
        raise TokenRejected("alg_not_allowed", f"algorithm {alg[:32]!r} is not allowed")
    forbidden = [name for name in FORBIDDEN_HEADERS if name in header]
    if forbidden:
        raise TokenRejected("malformed", f"header {forbidden[0]} is not allowed")
    unknown = sorted(set(header) - ALLOWED_HEADERS)
    if unknown:
        raise TokenRejected("malformed", "unexpected header parameters")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise TokenRejected("malformed", "header typ must be JWT")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise TokenRejected("malformed", "header kid is missing")
    if not signature:
        raise TokenRejected("bad_signature", "empty signature")
    return ParsedToken(
        header=MappingProxyType(header),
        signing_input=f"{header_b64}.{payload_b64}".encode("ascii"),
        payload_b64=payload_b64,
        signature=signature,
        alg=alg,
        kid=kid,
    )


def _numeric_date(claims: Mapping[str, Any], name: str) -> float:
    value = claims[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenRejected("malformed", f"claim {name} is not a NumericDate")
    return float(value)


def _is_workload_id(text: str) -> bool:
    try:
        parse_spiffe_id(text, require_path=True)
    except PkiError:
        return False
    return True


def check_binding(
    claims: Mapping[str, Any], certificate_thumbprint: str | None, *, require_binding: bool
) -> None:
    """RFC 8705: a bound token always needs the matching certificate; ``require_binding``
    refuses an unbound token."""
    cnf = claims.get("cnf")
    if cnf is None:
        if require_binding:
            raise TokenRejected("binding_mismatch", "token is not certificate-bound")
        return
    bound = cnf.get(CNF_THUMBPRINT) if isinstance(cnf, dict) else None
    if not isinstance(bound, str) or not bound:
        raise TokenRejected("malformed", "claim cnf has no x5t#S256")
    if not certificate_thumbprint:
        raise TokenRejected("binding_mismatch", "token is certificate-bound; no certificate")
    if not hmac.compare_digest(bound.encode(), certificate_thumbprint.encode()):
        raise TokenRejected("binding_mismatch", "cnf.x5t#S256 does not match the certificate")


def verify_local(
    token: str,
    keys: KeySet,
    *,
    audience: str,
    now: float,
    issuer: str | None = None,
    expected_subject: str | None = None,
    certificate_thumbprint: str | None = None,
    require_binding: bool | None = None,
    clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
) -> VerifiedToken:
    """Verify ``token`` against ``keys`` with the signer's rules; raises :class:`TokenRejected`.

    The algorithm comes from the key; exp/iat/iss/aud/sub are required; ``nbf``/``iat`` in the
    future and ``exp`` in the past are judged with ``clock_skew``; a certificate-bound token needs
    a matching thumbprint, and ``require_binding`` (default: a thumbprint was given) refuses an
    unbound token. The issuer is checked when
    known (``issuer`` argument, else an ``issuer`` member of the JWKS document).
    """
    parsed = parse_token(token)
    key = keys.keys.get(parsed.kid)
    if key is None:
        raise TokenRejected("unknown_kid", "no such key")
    if parsed.alg != key.algorithm:
        raise TokenRejected("alg_not_allowed", "header alg is not the key's algorithm")
    try:
        valid = _ALGORITHMS[key.algorithm].verify(
            parsed.signing_input, key.public_key, parsed.signature
        )
    except Exception:  # a malformed signature can raise inside the backend: fail closed
        valid = False
    if not valid:
        raise TokenRejected("bad_signature", "signature does not verify")
    claims = _json_object(b64url_decode(parsed.payload_b64), "payload")

    missing = [name for name in REQUIRED_CLAIMS if name not in claims]
    if missing:
        raise TokenRejected("malformed", f"required claims missing: {missing}")
    exp = _numeric_date(claims, "exp")
    iat = _numeric_date(claims, "iat")
    skew = clock_skew.total_seconds()
    if exp <= iat:
        raise TokenRejected("malformed", "exp is not after iat")
    if now >= exp + skew:
        raise TokenRejected("expired", f"token expired at {int(exp)}")
    if iat > now + skew:
        raise TokenRejected("not_yet_valid", "iat is in the future")
    if "nbf" in claims and _numeric_date(claims, "nbf") > now + skew:
        raise TokenRejected("not_yet_valid", "nbf is in the future")

    iss = claims["iss"]
    expected_issuer = issuer or keys.issuer
    if not isinstance(iss, str) or not iss:
        raise TokenRejected("bad_issuer", "unexpected issuer")
    if expected_issuer is not None and not hmac.compare_digest(
        iss.encode(), expected_issuer.encode()
    ):
        raise TokenRejected("bad_issuer", "unexpected issuer")

    aud = claims["aud"]
    token_aud = [aud] if isinstance(aud, str) else aud
    if (
        not isinstance(token_aud, list)
        or not token_aud
        or not all(isinstance(a, str) for a in token_aud)
    ):
        raise TokenRejected("malformed", "claim aud is not a string or a list of strings")
    if audience not in token_aud:
        raise TokenRejected("bad_audience", "no expected audience in aud")

    sub = claims["sub"]
    if not isinstance(sub, str):
        raise TokenRejected("malformed", "claim sub is not a string")
    if not _is_workload_id(sub):
        raise TokenRejected("malformed", "claim sub is not a SPIFFE ID")
    if expected_subject and not hmac.compare_digest(sub.encode(), expected_subject.encode()):
        raise TokenRejected("bad_subject", "sub is not the expected subject")
    if require_binding is None:
        require_binding = bool(certificate_thumbprint)
    check_binding(claims, certificate_thumbprint, require_binding=require_binding)
    return VerifiedToken(
        subject=sub, claims=MappingProxyType(claims), kid=key.kid, expires_at=int(exp)
    )


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
        tls: SignerTLSSettings | None = None,
        issuer: str | None = None,
        clock_skew: timedelta = DEFAULT_CLOCK_SKEW,
        cache_entries: int = DEFAULT_CACHE_ENTRIES,
    ) -> None:
        if not address:
            raise ConfigError("signer.address: empty")
        if address.startswith("unix:") and tls is not None:
            raise ConfigError("signer.tls: only for a TCP address, not unix:")
        if not address.startswith("unix:") and tls is None:
            raise ConfigError("signer.tls: required for a TCP signer address (mTLS)")
        self.address = address
        self.timeout = timeout
        self.tls = tls
        self.issuer = issuer
        self.clock_skew = clock_skew
        self.cache = VerificationCache(cache_entries)
        # Local verifications, kept apart from remote ones: same key, same lifetime rules.
        self.local_cache = VerificationCache(cache_entries)
        self._channel: grpc.aio.Channel | None = None
        self._stub: signer_pb2_grpc.SignerStub | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._state = _WatchState()
        self._identity_error: str | None = None

    @classmethod
    def from_config(cls, cfg: SignerSettings) -> SignerClient:
        """Build a client from the gateway's ``signer`` section; cheap, no I/O."""
        return cls(
            address=cfg.address,
            timeout=cfg.timeout,
            tls=cfg.tls,
            issuer=getattr(cfg, "issuer", None),
            clock_skew=getattr(cfg, "clock_skew", None) or DEFAULT_CLOCK_SKEW,
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
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 2000),
            # gRPC servers refuse pings more often than every 5 min by default (GOAWAY)
            ("grpc.keepalive_time_ms", 300_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.enable_retries", 0),
        ]
        if self.tls is None:
            channel = grpc.aio.insecure_channel(self.address, options=options)
        else:
            creds = _channel_credentials(self.tls)
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
            channel = grpc.aio.secure_channel(self.address, creds, options=options)
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
        self._state.connected = False

    async def __aenter__(self) -> SignerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def ready(self, *, mode: VerifyMode = "remote") -> bool:
        """Remote: the key subscription is live (the signer answers). Local: a key set is held
        (the last good one is kept while the signer is away)."""
        if self._channel is None or self._identity_error is not None:
            return False
        if mode == "local":
            return self._state.keyset is not None
        return self._state.connected

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
    ) -> VerifiedToken:
        """Verify ``token`` for ``audience``; raises TokenRejected or SignerUnavailable.

        ``expected_subject``: ``sub`` must equal it. ``certificate_thumbprint``: the connection's
        ``x5t#S256``; a certificate-bound token always needs it to match, and
        ``require_binding`` (default: whether a thumbprint is given) refuses unbound tokens.
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
            token, audience, expected_subject, certificate_thumbprint, require
        )

    async def _verify_remote(
        self,
        token: str,
        audience: str,
        expected_subject: str | None,
        thumbprint: str | None,
        require_binding: bool,
    ) -> VerifiedToken:
        import grpc
        import grpc.aio
        from svidgate.signer.v1 import signer_pb2

        precheck_token(token)
        key = cache_key(token, audience, expected_subject, thumbprint, require_binding)
        cached = self.cache.get(key, now=time.time())
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
            response = await stub.Verify(request, timeout=self.timeout.total_seconds())
        except grpc.aio.AioRpcError as err:
            code = err.code()
            if code.name in _TOKEN_ERROR_CODES:
                reason, detail = _reason_from_error(err)
                raise TokenRejected(reason, detail) from None
            raise SignerUnavailable(f"signer Verify failed: {code.name}") from None
        except (asyncio.CancelledError, grpc.aio.UsageError) as err:
            if isinstance(err, asyncio.CancelledError):
                raise
            raise SignerUnavailable("signer channel is closed") from None
        try:
            claims = json.loads(response.claims_json) if response.claims_json else {}
        except ValueError:
            raise SignerUnavailable("signer returned unreadable claims") from None
        if not isinstance(claims, dict) or not response.subject or not response.kid:
            raise SignerUnavailable("signer returned an incomplete VerifyResponse")
        # Defence in depth: the binding the route asked for is checked here too.
        check_binding(claims, thumbprint, require_binding=require_binding)
        if expected_subject and response.subject != expected_subject:
            raise TokenRejected("bad_subject", "sub is not the expected subject")
        verified = VerifiedToken(
            subject=response.subject,
            claims=MappingProxyType(claims),
            kid=response.kid,
            expires_at=int(response.expires_at),
        )
        valid_until = float(response.expires_at)
        if response.key_valid_until:
            valid_until = min(valid_until, float(response.key_valid_until))
        keyset = self._state.keyset
        if keyset is None or verified.kid in keyset.keys:
            self.cache.put(key, verified, valid_until=valid_until, now=time.time())
        return verified

    async def _verify_local(
        self,
        token: str,
        audience: str,
        expected_subject: str | None,
        thumbprint: str | None,
        require_binding: bool,
    ) -> VerifiedToken:
        precheck_token(token)
        key = cache_key(token, audience, expected_subject, thumbprint, require_binding)
        now = time.time()
        cached = self.local_cache.get(key, now=now)
        current = self._state.keyset
        if cached is not None and current is not None and cached.kid in current.keys:
            # The key already pins subject, thumbprint and binding mode; check the binding
            # again anyway (cheap), so a cache hit can never weaken it.
            check_binding(cached.claims, thumbprint, require_binding=require_binding)
            return cached
        kid = parse_token(token).kid
        keyset = self._state.keyset
        if keyset is None or kid not in keyset.keys:
            keyset = await self._refetch_for_kid(kid)
        verified = verify_local(
            token,
            keyset,
            audience=audience,
            now=now,
            issuer=self.issuer,
            expected_subject=expected_subject,
            certificate_thumbprint=thumbprint,
            require_binding=require_binding,
            clock_skew=self.clock_skew,
        )
        if self._state.keyset is keyset:  # not replaced while we were refetching
            # Valid until exp (the clock skew is not extended to cached entries); an entry
            # leaves earlier when its key is removed or changed (:meth:`_install_keyset`).
            self.local_cache.put(key, verified, valid_until=float(verified.expires_at), now=now)
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
            raise SignerUnavailable(f"signer GetJWKS failed: {err.code().name}") from None
        return self._install_keyset(response.jwks_json, response.sequence)

    def _install_keyset(self, jwks_json: str, sequence: int) -> KeySet:
        try:
            keyset = KeySet.parse(jwks_json, int(sequence))
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
        if self._identity_error is not None:
            raise SignerUnavailable(self._identity_error)
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
                if self.tls is not None and self.tls.spiffe_id:
                    await self._check_signer_identity()
                keyset = await self._fetch_jwks()
                stub = self._require_stub()
                stream = stub.WatchKeys(signer_pb2.WatchKeysRequest(after_sequence=keyset.sequence))
                self._state.connected = True
                backoff = RECONNECT_BACKOFF_MIN
                async for message in stream:
                    with contextlib.suppress(SignerUnavailable):
                        self._install_keyset(message.jwks_json, message.sequence)
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

    async def _check_signer_identity(self) -> None:
        """TCP + ``spiffe_id``: handshake once with the same credentials and check the signer's
        SVID (gRPC's Python client exposes no peer certificate). Mismatch → never used."""
        tls = self.tls
        assert tls is not None and tls.spiffe_id
        host, _, port = self.address.rpartition(":")
        host = host.removeprefix("dns:").removeprefix("ipv4:").removeprefix("ipv6:")
        host = host.strip("[]")
        try:
            found = await asyncio.wait_for(
                asyncio.to_thread(_peer_spiffe_id, host, int(port), tls),
                timeout=max(self.timeout.total_seconds(), 1.0),
            )
        except (OSError, TimeoutError, ValueError) as exc:
            raise SignerUnavailable(f"signer identity check failed: {exc}") from None
        if found != tls.spiffe_id:
            self._identity_error = (
                f"signer presented {found!r}, expected {tls.spiffe_id!r}: refusing to use it"
            )
            log.error("%s", self._identity_error)
            raise SignerUnavailable(self._identity_error)
        self._identity_error = None


def _unchanged_kids(previous: KeySet | None, current: KeySet) -> set[str]:
    """Kids whose key, algorithm and issuer are the same in both sets: local verifications
    made with any other key (removed, replaced under the same kid, new issuer) are dropped."""
    if previous is None or previous.issuer != current.issuer:
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


def _channel_credentials(tls: SignerTLSSettings) -> grpc.ChannelCredentials:
    """mTLS credentials for the channel: the gateway's SVID and the signer's trust bundle."""
    import grpc

    try:
        return grpc.ssl_channel_credentials(
            root_certificates=Path(tls.bundle).read_bytes(),
            private_key=Path(tls.key).read_bytes(),
            certificate_chain=Path(tls.cert).read_bytes(),
        )
    except OSError as exc:
        raise ConfigError(f"signer.tls: cannot read {exc.filename}: {exc.strerror}") from None


def _peer_spiffe_id(host: str, port: int, tls: SignerTLSSettings) -> str:
    """Connect with mTLS (same cert, bundle and server name as the channel) and return the
    verified peer's SPIFFE ID, checked with pki's SVID rules."""
    import socket
    from datetime import UTC, datetime

    from cryptography import x509
    from svidgate.pki.bundle import BundleSet, load_bundle
    from svidgate.pki.svid import check_svid_profile, verify_x509_svid

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(tls.bundle))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    with (
        socket.create_connection((host, port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=tls.server_name) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
        chain = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in conn._sslobj.get_verified_chain()]  # type: ignore[attr-defined]
    if not der:
        raise ValueError("signer presented no certificate")
    leaf = x509.load_der_x509_certificate(der)
    spiffe_id = check_svid_profile(leaf)
    intermediates = [x509.load_der_x509_certificate(d) for d in chain[1:-1]]
    bundle = load_bundle(tls.bundle, spiffe_id.trust_domain)
    verify_x509_svid(leaf, intermediates, BundleSet.from_bundles([bundle]), now=datetime.now(UTC))
    return str(spiffe_id)
