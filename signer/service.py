"""The gRPC servicer: thin. Identify and authorize the caller, decode, call the key store,
encode. One table (:data:`STATUS_TABLE`) maps signer errors and token verification errors
(:class:`~svidgate.pki.jwt_svid.JwtSvidError`) to gRPC status codes; a failed RPC's message is
``reason: detail`` and the reason is also in trailing metadata ``svidgate-reason``. Python's own
errors for values a caller sent (ValueError, OverflowError, RecursionError) are
``invalid_argument``, noted in one WARNING line at most every 10 s and never with a traceback;
anything else unmapped is INTERNAL with a generic message and a logged traceback.

Bounds (:mod:`svidgate.signer.limits`): Sign checks sizes and the TTL before any parsing,
signing or Transit call, then waits for a :class:`~svidgate.signer.limits.SignGate` slot;
WatchKeys streams and the diagnostic streams (health ``Watch``, reflection) hold
:class:`~svidgate.signer.limits.StreamSlots`. Over TCP, health and reflection answer only callers
that one of ``authorization.verify``/``sign``/``rotate`` admits (:class:`GuardedHealth`,
:class:`GuardedReflection`); Unix callers are trusted as for every RPC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal, NoReturn

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from svidgate.pki.errors import PkiError
from svidgate.pki.jose import b64url_encode
from svidgate.pki.jwt_svid import JwtSvidError
from svidgate.pki.matchers import IdMatcher
from svidgate.pki.spiffe_id import SpiffeId, parse_spiffe_id
from svidgate.pki.svid import check_svid_profile
from svidgate.signer.config import SignerConfig
from svidgate.signer.errors import (
    AudienceNotAllowedError,
    ClaimNotAllowedError,
    InvalidRequestError,
    KeyNotFoundError,
    KeySourceError,
    NotReadyError,
    PermissionDeniedError,
    RevokeRefusedError,
    RotationPendingError,
    SignerError,
    SigningUnavailableError,
    SourceCapacityError,
    SourceConflictError,
)
from svidgate.signer.jwt import check_audiences, check_claims_size, parse_extra_claims
from svidgate.signer.keystore import KeyStore
from svidgate.signer.limits import LimitExceededError, SignGate, StreamSlots
from svidgate.signer.mint_policy import MintPolicy
from svidgate.signer.v1 import REASON_METADATA_KEY, signer_pb2, signer_pb2_grpc

from svidgate.logs import emit

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger("svidgate.signer.rpc")
token_log = logging.getLogger("svidgate.signer.tokens")
_THUMBPRINT = re.compile(r"^[A-Za-z0-9_-]{43}$")

# (error type, status code, reason); the first matching row wins. JwtSvidError carries its reason.
STATUS_TABLE: tuple[tuple[type[Exception], grpc.StatusCode, str], ...] = (
    (JwtSvidError, grpc.StatusCode.UNAUTHENTICATED, ""),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    (ClaimNotAllowedError, grpc.StatusCode.PERMISSION_DENIED, "claim_not_allowed"),
    (AudienceNotAllowedError, grpc.StatusCode.PERMISSION_DENIED, "audience_not_allowed"),
    (PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED, "permission_denied"),
    (SigningUnavailableError, grpc.StatusCode.UNAVAILABLE, "signing_unavailable"),
    (NotReadyError, grpc.StatusCode.UNAVAILABLE, "not_ready"),
    (KeyNotFoundError, grpc.StatusCode.NOT_FOUND, "not_found"),
    (RevokeRefusedError, grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition"),
    (RotationPendingError, grpc.StatusCode.FAILED_PRECONDITION, "rotation_pending"),
    (SourceCapacityError, grpc.StatusCode.FAILED_PRECONDITION, "kv_max_versions"),
    (SourceConflictError, grpc.StatusCode.ABORTED, "conflict"),
    (KeySourceError, grpc.StatusCode.UNAVAILABLE, "source_unavailable"),
    (LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED, "limit_exceeded"),
    # what Python raises on a caller's values (a TTL past timedelta, a float that is no number,
    # nesting past the recursion limit): the request is at fault, not the signer
    (OverflowError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    (RecursionError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
)
_PYTHON_INPUT_ERRORS = (OverflowError, RecursionError, ValueError)
PYTHON_ERROR_LOG_INTERVAL = 10.0  # seconds between two "refused on ValueError" lines


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str, str] | None:
    """(code, reason, message) for a mapped error; None for anything else (INTERNAL)."""
    for kind, code, reason in STATUS_TABLE:
        if isinstance(exc, kind):
            if isinstance(exc, JwtSvidError):
                return code, exc.reason, str(exc)
            return code, reason, f"{reason}: {exc}"
    return None


@dataclass(frozen=True, slots=True)
class Caller:
    transport: Literal["unix", "tcp"]
    spiffe_id: SpiffeId | None = None
    thumbprint: str | None = None
    connection: str | None = None  # the TCP peer address: one per connection

    @property
    def key(self) -> str:
        """The identity limits count per caller: the SPIFFE ID, or ``unix``."""
        return str(self.spiffe_id) if self.spiffe_id is not None else "unix"


class _PeerCache:
    """Parsed peer leaves by PEM: the SVID profile is checked once per certificate."""

    def __init__(self, limit: int = 1024) -> None:
        self._items: dict[bytes, tuple[SpiffeId, str]] = {}
        self._limit = limit

    def get(self, pem: bytes) -> tuple[SpiffeId, str]:
        found = self._items.get(pem)
        if found is None:
            try:
                leaf = x509.load_pem_x509_certificate(pem)
                spiffe_id = check_svid_profile(leaf)
            except (ValueError, PkiError) as exc:
                raise PermissionDeniedError(
                    f"peer certificate is not an X.509-SVID ({exc})"
                ) from None
            digest = hashlib.sha256(leaf.public_bytes(Encoding.DER)).digest()
            found = (spiffe_id, b64url_encode(digest))
            if len(self._items) >= self._limit:
                self._items.clear()
            self._items[pem] = found
        return found


class SignerService(signer_pb2_grpc.SignerServicer):
    def __init__(self, store: KeyStore, cfg: SignerConfig) -> None:
        self.store = store
        self.cfg = cfg
        auth = cfg.authorization
        self.may_verify = IdMatcher.parse(auth.verify)
        self.may_sign = IdMatcher.parse(auth.sign)
        self.may_rotate = IdMatcher.parse(auth.rotate)
        self.may_sign_for_others = IdMatcher.parse(auth.sign_for_others)
        self.mint_policy = MintPolicy.from_config(auth)
        self._peers = _PeerCache()
        self.trust_domain = cfg.td
        limits = cfg.limits
        self.sign_gate = SignGate(limits.sign_concurrency, limits.sign_queue)
        self.watch_slots = StreamSlots(
            "watch_streams",
            limits.watch_streams,
            limits.watch_streams_per_caller,
            limits.watch_streams_per_connection,
        )
        self.diagnostic_slots = StreamSlots(
            "diagnostic_streams", limits.diagnostic_streams, limits.diagnostic_streams_per_caller
        )
        self._python_error_logged = -PYTHON_ERROR_LOG_INTERVAL

    # -- caller identity ----------------------------------------------------------------------

    def _caller(self, context: Context) -> Caller:
        peer = context.peer()
        if peer.startswith("unix:"):
            return Caller("unix")
        auth = context.auth_context()
        pems = list(auth.get("x509_pem_cert") or ())
        if not pems:
            raise PermissionDeniedError("no client certificate")
        spiffe_id, thumbprint = self._peers.get(pems[0])
        peer_ids = list(auth.get("peer_spiffe_id") or ())
        if peer_ids and peer_ids[0].decode() != str(spiffe_id):
            raise PermissionDeniedError("peer SPIFFE ID mismatch")
        # tls.bundle is the bundle of the signer's own trust domain: grpc checked the chain
        # against it, so only IDs of that trust domain are vouched for (no cross-domain callers)
        if spiffe_id.trust_domain != self.trust_domain:
            raise PermissionDeniedError(f"{spiffe_id} is not in trust domain {self.trust_domain}")
        return Caller("tcp", spiffe_id, thumbprint, peer)

    def authorize_diagnostics(self, context: Context, rpc: str) -> Caller:
        """Health and reflection: every Unix caller; over TCP, a caller that some
        ``authorization`` list admits (an unknown certificate learns nothing)."""
        caller = self._caller(context)
        if caller.spiffe_id is not None and not any(
            matcher.match(caller.spiffe_id) is not None
            for matcher in (self.may_verify, self.may_sign, self.may_rotate)
        ):
            raise PermissionDeniedError(f"{caller.spiffe_id} may not call {rpc}")
        return caller

    @staticmethod
    def _authorize(caller: Caller, matcher: IdMatcher, rpc: str) -> None:
        if caller.transport == "unix":
            return
        assert caller.spiffe_id is not None
        if matcher.match(caller.spiffe_id) is None:
            raise PermissionDeniedError(f"{caller.spiffe_id} may not call {rpc}")

    async def fail(self, context: Context, exc: Exception) -> NoReturn:
        """Abort the RPC with the status :data:`STATUS_TABLE` gives ``exc``."""
        await self._fail(context, exc)

    async def _fail(self, context: Context, exc: Exception) -> NoReturn:
        mapped = status_for(exc)
        if mapped is not None:
            code, reason, message = mapped
            if isinstance(exc, _PYTHON_INPUT_ERRORS) and not isinstance(
                exc, SignerError | PkiError
            ):
                self._note_python_error(exc)
        else:
            if isinstance(exc, SignerError):
                log.error("unmapped signer error %s", type(exc).__name__)
            else:
                log.exception("unexpected error in RPC")
            code, reason, message = grpc.StatusCode.INTERNAL, "internal", "internal: internal error"
        await context.abort(code, message, trailing_metadata=((REASON_METADATA_KEY, reason),))
        raise AssertionError("unreachable")  # abort raises

    def _note_python_error(self, exc: Exception) -> None:
        """One WARNING line (no traceback) at most every 10 s: a caller's value that only
        Python refused shows up without flooding the log."""
        now = time.monotonic()
        if now - self._python_error_logged >= PYTHON_ERROR_LOG_INTERVAL:
            self._python_error_logged = now
            log.warning("request refused as invalid_argument on %s", type(exc).__name__)

    # -- RPCs ---------------------------------------------------------------------------------

    async def Sign(
        self, request: signer_pb2.SignRequest, context: Context
    ) -> signer_pb2.SignResponse:
        try:
            caller = self._caller(context)
            limits = self.cfg.limits
            # sizes and numbers first: nothing is parsed, signed or sent to Transit before
            check_audiences(
                request.audience, max_count=limits.audiences, max_bytes=limits.audience_bytes
            )
            check_claims_size(request.claims_json, limits.claims_bytes)
            ttl = self._ttl(request.ttl_seconds)
            subject, thumbprint = self._sign_subject(caller, request)
            async with self.sign_gate.slot():
                extra = parse_extra_claims(request.claims_json, max_bytes=limits.claims_bytes)
                # over TCP the caller vouches for what it asks; over the Unix socket the caller
                # is the local workload, so the token's subject is what the policy is checked
                # against
                principal = caller.spiffe_id if caller.spiffe_id is not None else subject
                self.mint_policy.check(principal, extra.keys(), request.audience)
                signed = await self.store.sign(
                    subject=str(subject),
                    audience=list(request.audience),
                    ttl=ttl,
                    extra=extra,
                    thumbprint=thumbprint,
                )
        except Exception as exc:
            await self._fail(context, exc)
        # the audit of every issued token: never the token itself
        emit(
            token_log,
            "token_issued",
            subject=str(subject),
            audience=list(request.audience),
            kid=signed.kid,
            jti=signed.jti,
            expiry=signed.expires_at,
            caller=caller.key,
        )
        return signer_pb2.SignResponse(
            token=signed.token, kid=signed.kid, expires_at=signed.expires_at
        )

    def _ttl(self, seconds: int) -> timedelta | None:
        """``ttl_seconds`` as asked (0: the default), capped at ``tokens.max_ttl`` before it
        becomes a timedelta, so no int64 overflows."""
        if seconds < 0:
            raise InvalidRequestError("ttl_seconds must not be negative")
        if seconds == 0:
            return None
        cap = self.cfg.tokens.max_ttl
        return min(cap, timedelta(seconds=min(seconds, math.ceil(cap.total_seconds()))))

    def _sign_subject(
        self, caller: Caller, request: signer_pb2.SignRequest
    ) -> tuple[SpiffeId, str | None]:
        """Who the token is for, and the thumbprint to bind (or None)."""
        wanted = request.subject
        given = request.certificate_thumbprint
        if given and not _THUMBPRINT.match(given):
            raise InvalidRequestError("certificate_thumbprint is not a base64url SHA-256")
        if caller.transport == "unix":
            if not wanted:
                raise InvalidRequestError("subject is required over the Unix socket")
            subject = self._parse_subject(wanted)
            if self.may_sign.match(subject) is None:
                raise PermissionDeniedError(f"subject {subject} is not in authorization.sign")
            if request.bind_certificate and not given:
                raise InvalidRequestError("bind_certificate needs certificate_thumbprint here")
            return subject, (given or None) if request.bind_certificate else None
        assert caller.spiffe_id is not None
        self._authorize(caller, self.may_sign, "Sign")
        subject = self._parse_subject(wanted) if wanted else caller.spiffe_id
        for_others = self.may_sign_for_others.match(caller.spiffe_id) is not None
        if subject != caller.spiffe_id:
            if not for_others:
                raise PermissionDeniedError(f"{caller.spiffe_id} may only mint for itself")
            if self.may_sign.match(subject) is None:
                raise PermissionDeniedError(f"subject {subject} is not in authorization.sign")
        if given and not for_others:
            raise PermissionDeniedError("only sign_for_others callers may bind other certificates")
        if not request.bind_certificate:
            return subject, None
        return subject, given or caller.thumbprint

    @staticmethod
    def _parse_subject(text: str) -> SpiffeId:
        try:
            return parse_spiffe_id(text, require_path=True)
        except PkiError as exc:
            raise InvalidRequestError(f"subject: {exc}") from None

    async def Verify(
        self, request: signer_pb2.VerifyRequest, context: Context
    ) -> signer_pb2.VerifyResponse:
        try:
            self._authorize(self._caller(context), self.may_verify, "Verify")
            if request.certificate_thumbprint and not _THUMBPRINT.match(
                request.certificate_thumbprint
            ):
                raise InvalidRequestError("certificate_thumbprint is not a base64url SHA-256")
            result = self.store.verify(
                request.token,
                audiences=list(request.audience),
                expected_subject=request.expected_subject,
                thumbprint=request.certificate_thumbprint,
                require_binding=request.require_binding,
            )
        except Exception as exc:
            await self._fail(context, exc)
        token = result.token
        return signer_pb2.VerifyResponse(
            claims_json=json.dumps(dict(token.claims), separators=(",", ":")),
            kid=token.kid,
            subject=token.subject,
            expires_at=token.expires_at,
            key_valid_until=result.key_valid_until,
        )

    async def GetJWKS(
        self, request: signer_pb2.GetJWKSRequest, context: Context
    ) -> signer_pb2.JWKS:
        try:
            self._authorize(self._caller(context), self.may_verify, "GetJWKS")
            if not self.store.can_verify:
                raise NotReadyError("no keys loaded yet")
        except Exception as exc:
            await self._fail(context, exc)
        return self._jwks(self.store.sequence, self.store.jwks_json)

    async def WatchKeys(
        self, request: signer_pb2.WatchKeysRequest, context: Context
    ) -> AsyncIterator[signer_pb2.JWKS]:
        try:
            caller = self._caller(context)
            self._authorize(caller, self.may_verify, "WatchKeys")
            slot = self.watch_slots.acquire(caller.key, caller.connection)
        except Exception as exc:
            await self._fail(context, exc)
        try:
            async for sequence, text in self.store.watch(request.after_sequence):
                yield self._jwks(sequence, text)
        finally:
            slot.release()

    def _jwks(self, sequence: int, text: str) -> signer_pb2.JWKS:
        """A key set as pushed: the keys plus the token rules a local verifier must apply."""
        tokens = self.cfg.tokens
        return signer_pb2.JWKS(
            jwks_json=text,
            sequence=sequence,
            max_ttl_seconds=int(tokens.max_ttl.total_seconds()),
            clock_skew_seconds=int(tokens.clock_skew.total_seconds()),
        )

    async def Rotate(
        self, request: signer_pb2.RotateRequest, context: Context
    ) -> signer_pb2.RotateResponse:
        try:
            caller = self._caller(context)
            self._authorize(caller, self.may_rotate, "Rotate")
            prepared, active = await self.store.rotate()
            log.info("rotation requested by %s: prepared %s", caller.spiffe_id or "unix", prepared)
        except Exception as exc:
            await self._fail(context, exc)
        return signer_pb2.RotateResponse(prepared_kid=prepared, active_kid=active)

    async def Revoke(
        self, request: signer_pb2.RevokeRequest, context: Context
    ) -> signer_pb2.RevokeResponse:
        try:
            caller = self._caller(context)
            self._authorize(caller, self.may_rotate, "Revoke")
            if not _THUMBPRINT.match(request.kid):
                raise InvalidRequestError("kid is not a key id (RFC 7638 thumbprint)")
            revoked, active = await self.store.revoke(request.kid)
            log.info("revocation requested by %s: revoked %s", caller.spiffe_id or "unix", revoked)
        except Exception as exc:
            await self._fail(context, exc)
        return signer_pb2.RevokeResponse(revoked_kid=revoked, active_kid=active)


# grpc_health and grpc_reflection carry no types: their asyncio servicers are Any to mypy
_AioHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]
_AioReflectionServicer: Any = reflection.aio.ReflectionServicer  # type: ignore[attr-defined]


class GuardedHealth(_AioHealthServicer):  # type: ignore[misc]
    """grpc.health.v1 behind :meth:`SignerService.authorize_diagnostics`; ``Watch`` streams hold
    a diagnostic stream slot."""

    def __init__(self, service: SignerService) -> None:
        super().__init__()
        self._service = service

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        try:
            self._service.authorize_diagnostics(context, "Health.Check")
        except Exception as exc:
            await self._service.fail(context, exc)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        service = self._service
        try:
            caller = service.authorize_diagnostics(context, "Health.Watch")
            slot = service.diagnostic_slots.acquire(caller.key, None)
        except Exception as exc:
            await service.fail(context, exc)
        try:
            await super().Watch(request, context)
        finally:
            slot.release()


class GuardedReflection(_AioReflectionServicer):  # type: ignore[misc]
    """Server reflection behind :meth:`SignerService.authorize_diagnostics`, one diagnostic
    stream slot per stream."""

    def __init__(self, service: SignerService, service_names: tuple[str, ...]) -> None:
        super().__init__(service_names)
        self._service = service

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: Context,
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        service = self._service
        try:
            caller = service.authorize_diagnostics(context, "ServerReflection")
            slot = service.diagnostic_slots.acquire(caller.key, None)
        except Exception as exc:
            await service.fail(context, exc)
        try:
            async for reply in super().ServerReflectionInfo(request_iterator, context):
                yield reply
        finally:
            slot.release()
