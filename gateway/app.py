"""The request pipeline, in the documented order, and the per-connection identity check.

The data plane is :class:`~svidgate.gateway.listener.Listener` → the HTTP/1.1 core
(:mod:`svidgate.gateway.http1`: framing, limits, timeouts) → :meth:`GatewayApp.handle`.
Per connection (:meth:`GatewayApp.identify`, called by the listener after the TLS handshake,
before any HTTP byte is parsed): re-verify the client's SVID against its own trust domain
(or find the same presented chain already verified in this generation), compute its identity
once, and close the connection at the certificate's notAfter. A reload that changes trust
(bundles, trust domains) re-checks every open connection's stored chain: a background sweep
closes idle ones that no longer verify, a request on one not yet swept is checked first, and a
refused connection answers 403 ``trust_revoked`` and closes (in-flight requests get up to
``drain_timeout`` to finish).
Per request (:meth:`GatewayApp.handle`; the core already refused malformed heads, CONNECT /
TRACE, a missing or repeated Host and a mismatched absolute-form target): canonical path →
policy (:meth:`Policy.authorize`: default deny, every decision audited) → JWT (when the route
requires it) → header hygiene → forward. Every :class:`GatewayError` becomes a response through
the one table in ``gateway.errors``. The metrics and the access line are built from what the
pipeline learned (:class:`_Exchange`) and the :class:`ForwardOutcome` the proxy returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime
from functools import lru_cache
from json.encoder import encode_basestring_ascii
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from multidict import CIMultiDict
from svidgate.gateway.admin import Metrics
from svidgate.gateway.config import SIGNER_ISSUER, JwtConfig
from svidgate.gateway.credentials import GatewayState, StateHolder
from svidgate.gateway.errors import (
    Forbidden,
    GatewayError,
    RateLimited,
    TokenRejected,
    response_spec,
)
from svidgate.gateway.handshake import handshake_failure_reason, refusal_reason
from svidgate.gateway.headers import identity_header_names, strip_bearer, upstream_request_headers
from svidgate.gateway.http1 import (
    Admission,
    Body,
    BodyError,
    BodyTooLarge,
    ConnectionInfo,
    H1Connection,
    Refused,
    Request,
    Responder,
    ResponseError,
)
from svidgate.gateway.http2 import H2ServerConnection
from svidgate.gateway.identity import PeerIdentity, VerifiedChainCache
from svidgate.gateway.jwt_issuers import JwtIssuers
from svidgate.gateway.logs import HandshakeLog, log_access
from svidgate.gateway.policy import Decision, PolicyDenial
from svidgate.gateway.proxy import ForwardOutcome, Upstream
from svidgate.gateway.proxy_h2 import H2Upstream
from svidgate.gateway.ratelimit import RateLimiter
from svidgate.gateway.routes import Route, parse_target
from svidgate.gateway.tls import peer_chain_der, verify_peer
from svidgate.gateway.trace import RequestTrace
from svidgate.pki.errors import PkiError

from svidgate.logs import emit, send

if TYPE_CHECKING:
    from svidgate.gateway.listener import Listener
    from svidgate.gateway.signer_client import SignerClient

    from svidgate.tracing import Tracing

log = logging.getLogger("svidgate.gateway")
audit_log = logging.getLogger("svidgate.audit")

_BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *$")
_SWEEP_BATCH = 64  # connections re-checked between two yields to the event loop
SERVER_HEADER = "svidgate"  # the gateway's own responses name no software version


@lru_cache(maxsize=1024)
def _authorization_head(outcome: str, reason: str) -> str:
    head = '{"event":"authorization","decision":'
    return f'{head}{_json_str(outcome)},"reason":{_json_str(reason)},"spiffe_id":'


@lru_cache(maxsize=1024)
def _authorization_mid(route: str | None, rule: str | None) -> str:
    return f',"route":{_json_opt(route)},"rule":{_json_opt(rule)},"method":'


def _json_str(text: str) -> str:
    return encode_basestring_ascii(text)


def _json_opt(text: str | None) -> str:
    return "null" if text is None else _json_str(text)


def authorization_line(
    *,
    outcome: str,
    reason: str,
    spiffe_id: str,
    route: str | None,
    rule: str | None,
    method: str,
    path: str,
) -> str:
    """The audit line of one decision, byte for byte what ``emit`` writes for the same
    fields, built from cached fragments (the fields repeat; only the path really varies)."""
    return (
        f"{_authorization_head(outcome, reason)}{_json_str(spiffe_id)}"
        f'{_authorization_mid(route, rule)}{_json_str(method)},"path":{_json_str(path)}}}'
    )


class Peer:
    """One verified client connection: its identity, the chain it presented (kept for the
    re-check after a trust change), the state generation it was last verified against, how
    many of its requests are in the pipeline, whether a re-check refused it, and its transport
    (to close it when refused)."""

    __slots__ = ("busy", "chain", "checked", "identity", "revoked", "transport")

    def __init__(
        self,
        identity: PeerIdentity,
        chain: tuple[bytes, ...],
        checked: int,
        transport: asyncio.BaseTransport,
    ) -> None:
        self.identity = identity
        self.chain = chain
        self.checked = checked
        self.busy = 0
        self.revoked = False
        self.transport = transport


class _Exchange:
    """What the pipeline learned about one request, as it learned it: for the error response,
    the metrics and the access line (the request object carries no gateway state)."""

    __slots__ = ("error", "outcome", "path", "request_id", "route", "started", "trace")

    def __init__(self, trace: RequestTrace) -> None:
        self.started = time.perf_counter()
        self.trace = trace  # propagated trace context; spans when tracing is on
        self.path: str | None = None  # canonical path, once parsed
        self.route: str | None = None  # route name, once policy found one
        self.outcome: ForwardOutcome | None = None  # once forwarded
        self.error: str | None = None  # reason code of a failed request
        self.request_id: str | None = None  # the X-Request-Id sent upstream, once forwarded


class GatewayApp:
    """The request handler and the state it reads (holder, upstream pools, signer client)."""

    def __init__(
        self, holder: StateHolder, metrics: Metrics, signer: SignerClient | None = None
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.signer = signer
        self.tracing: Tracing | None = None  # set by the server when `tracing:` is configured
        self.peers: dict[asyncio.BaseTransport, Peer] = {}  # open, admitted connections
        self.listener: Listener[Peer] | None = None  # set by the server once listening
        self.chains = VerifiedChainCache()
        self.handshakes = HandshakeLog()  # failed handshakes and refused identities, rate-limited
        # Generation of the last state that changed trust: a connection verified before it is
        # re-checked (by the sweep, or first thing on its next request).
        self.trust_generation = holder.current.generation
        self.trust_sweep: asyncio.Task[None] | None = None  # the re-check of the last change
        self.upstreams: dict[str, Upstream] = {}
        self.draining = False
        self._retired: set[asyncio.Task[None]] = set()
        self._owned = identity_header_names(())
        self.limiter = self._limiter(holder.current)
        cfg = holder.current.config
        self.jwt_issuers = JwtIssuers(cfg.jwt_issuers, poll=cfg.reload_interval)
        holder.listeners.append(self._on_reload)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._install(self.holder.current)
        await self.jwt_issuers.start()
        if self.signer is not None:
            await self.signer.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()
        self.upstreams = {}
        for task in list(self._retired):
            task.cancel()
        if self.trust_sweep is not None:
            self.trust_sweep.cancel()
        if self.signer is not None:
            await self.signer.close()
        await self.limiter.close()
        await self.jwt_issuers.close()

    def _limiter(self, state: GatewayState) -> RateLimiter:
        count = self.metrics.rate_limit_backend_errors.inc
        return RateLimiter.from_config(state.config.rate_limits, on_backend_error=count)

    def _install(self, state: GatewayState) -> None:
        cfg = state.config
        self.upstreams = {
            name: (H2Upstream if up.protocol == "h2" else Upstream)(
                name, up, state.upstream_contexts[name]
            )
            for name, up in cfg.upstreams.items()
        }
        self._owned = identity_header_names(cfg.identity_headers.claims.values())
        self.metrics.cert_expiry.set(state.cert_not_after.timestamp())
        if state.config.rate_limits != self.limiter.cfg:  # new buckets; the old store closes
            old, self.limiter = self.limiter, self._limiter(state)
            task = asyncio.get_running_loop().create_task(old.close())
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    def _on_reload(self, old: GatewayState, new: GatewayState) -> None:
        previous = self.upstreams
        self.chains.clear()  # bundles may have changed: every chain is verified again
        self._install(new)
        if new.trust != old.trust:
            self.trust_generation = new.generation
            if self.trust_sweep is not None:
                self.trust_sweep.cancel()
            self.trust_sweep = asyncio.get_running_loop().create_task(self._trust_sweep())
        if new.config.signer != old.config.signer:
            log.warning("signer settings changed: they take effect after a restart")
        self._spawn(self.jwt_issuers.reconfigure(new.config.jwt_issuers))
        grace = max((u.cfg.timeouts.read.total_seconds() for u in previous.values()), default=0.0)

        async def retire() -> None:
            await asyncio.sleep(grace + 1.0)
            for upstream in previous.values():
                await upstream.close()

        self._spawn(retire())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run reload work in the background; close() cancels what is still running."""
        task = asyncio.get_running_loop().create_task(work)
        self._retired.add(task)
        task.add_done_callback(self._retired.discard)

    def readiness(self) -> tuple[bool, str]:
        """Ready only when serving, with usable credentials and (if needed) a usable signer."""
        if self.draining:
            return False, "draining"
        state = self.holder.current
        if datetime.now(UTC) >= state.cert_not_after:
            return False, "certificate_expired"
        jwts = [r.jwt for r in state.config.routes if r.jwt is not None and r.jwt.required]
        unready = self.jwt_issuers.unready(name for jwt in jwts for name in jwt.issuers)
        if unready is not None:
            return False, f"jwt_issuer_not_ready:{unready}"
        modes = {jwt.verify for jwt in jwts if jwt.uses_signer}
        if modes:
            if self.signer is None:
                return False, "signer_not_configured"
            for mode in sorted(modes):
                if not self.signer.ready(mode=mode):
                    return False, f"signer_not_ready:{mode}"
        return True, "ok"

    def identify(self, transport: asyncio.BaseTransport) -> Admission[Peer]:
        """The listener's identity check, right after the TLS handshake: nothing reaches HTTP
        parsing before the peer's SVID is re-verified against the bundle of its own trust
        domain (or the same chain is found verified in this generation). A refusal is audited
        and raised as :class:`Refused`; the core closes the connection at the certificate's
        notAfter (``expires_in``)."""
        state = self.holder.current
        ssl_object = transport.get_extra_info("ssl_object")
        now = datetime.now(UTC)
        try:
            if ssl_object is None:
                raise PkiError("not a TLS connection")
            ders = peer_chain_der(ssl_object)
            if ders:
                identity = self.chains.identify(
                    ders,
                    generation=state.generation,
                    bundles=state.bundles,
                    gateway_id=state.gateway_id,
                    now=now,
                )
            else:  # a resumed session (or no certificate): never cached, fails closed
                identity = PeerIdentity.from_svid(
                    verify_peer(ssl_object, state.bundles, now=now), state.gateway_id
                )
        except PkiError as exc:
            self.metrics.connections_rejected.inc()
            reason = refusal_reason(exc)
            self.metrics.handshake_failure(reason).inc()
            peername = transport.get_extra_info("peername")
            self._handshake_failure(peername, reason, str(exc))
            raise Refused(str(exc)) from None
        lifetime = max((identity.not_after - now).total_seconds(), 0.0)
        # A resumed session has no presented chain: its leaf alone is what was verified.
        chain = tuple(ders) if ders else (identity.leaf_der,)
        peer = Peer(identity, chain, state.generation, transport)
        self.peers[transport] = peer
        return Admission(peer, identity.id_text, lifetime)

    def handshake_failed(self, peer: object, exc: BaseException) -> None:
        """The listener's hook for a failed TLS handshake."""
        detail = getattr(exc, "verify_message", None) or getattr(exc, "reason", None)
        self._handshake_failure(peer, handshake_failure_reason(exc), detail or type(exc).__name__)

    def _handshake_failure(self, peer: object, reason: str, detail: str) -> None:
        """Every failed handshake and every identity refused right after one, with its reason
        word (gateway.handshake): one rate-limited log line."""
        self.handshakes.failed(peer, reason, detail)

    def connection_closed(self, peer: Peer) -> None:
        """An admitted connection ended (or was refused by the per-identity cap): forget it."""
        self.peers.pop(peer.transport, None)

    # -- the pipeline ---------------------------------------------------------------------------

    async def handle(
        self, conn: ConnectionInfo[Peer], request: Request, body: Body, responder: Responder
    ) -> None:
        """The core's handler for one request: the pipeline, then the access line and
        metrics. Every failure before the response is committed is answered here."""
        client = conn.peername[0] if conn.peername else None
        exchange = _Exchange(RequestTrace.begin(self.tracing, request, client))
        state = self.holder.current
        peer = conn.peer
        status = 500
        try:
            outcome = await self._checked_pipeline(
                conn, request, body, responder, state=state, exchange=exchange
            )
            exchange.outcome = outcome
            exchange.error = outcome.error
            status = outcome.status
        except GatewayError as err:
            if peer.revoked:
                _close_after_response(peer.transport)  # answer, then close: it is done
            status = self._error_response(responder, err, exchange.route)
            exchange.error = err.reason
        except BodyError as err:
            # The client's body failed (stalled 408, too large 413, malformed 400, cut): its
            # own fault, answered by the core's table and never counted against the upstream.
            status = err.status
            exchange.error = err.reason
            if not responder.started:
                with contextlib.suppress(ResponseError):
                    responder.simple(err.status, err.body(), err.headers)
            elif not responder.done:
                responder.abort()
        except ResponseError as exc:
            # The client went away or stopped reading (write timeout): the connection is cut.
            # 499 (client closed request) is only for logs and metrics.
            log.info(
                "client disconnected during %s (route %s): %s",
                request.method,
                exchange.route or "-",
                type(exc).__name__,
            )
            status = 499
            exchange.error = "client_disconnected"
        except Exception:
            # Never after a committed response: forward owns one to its end (only the client
            # going away is raised past it), so an error response can always be sent here.
            log.exception("unexpected error while handling a request")
            status = self._error_response(responder, GatewayError("internal"), exchange.route)
            exchange.error = "internal"
        self._record(conn, request, exchange, status, state.config.access_log)

    async def _checked_pipeline(
        self,
        conn: ConnectionInfo[Peer],
        request: Request,
        body: Body,
        responder: Responder,
        *,
        state: GatewayState,
        exchange: _Exchange,
    ) -> ForwardOutcome:
        """The pipeline for a connection whose chain verifies under the current trust: one
        verified before the last trust change is re-checked here first (fail closed)."""
        peer = conn.peer
        if peer.checked < self.trust_generation and not peer.revoked:
            self._recheck(peer.transport, peer, state, datetime.now(UTC), close_now=False)
        if peer.revoked:
            raise Forbidden("trust_revoked", "the certificate no longer verifies after a reload")
        peer.busy += 1
        try:
            return await self._pipeline(
                conn,
                request,
                body,
                responder,
                state=state,
                identity=peer.identity,
                exchange=exchange,
            )
        finally:
            peer.busy -= 1

    # -- trust changes reach open connections -----------------------------------------------

    def _recheck(
        self,
        transport: asyncio.BaseTransport,
        peer: Peer,
        state: GatewayState,
        now: datetime,
        *,
        close_now: bool,
    ) -> None:
        """Verify the connection's stored chain against ``state``'s bundles at ``now``; on
        failure mark it revoked (and, from the sweep, close it: at once when idle, after its
        in-flight request, or ``drain_timeout``, when busy)."""
        try:
            peer.identity = self.chains.identify(
                peer.chain,
                generation=state.generation,
                bundles=state.bundles,
                gateway_id=state.gateway_id,
                now=now,
            )
        except PkiError as exc:
            peer.revoked = True
            self.metrics.connections_rejected.inc()
            emit(
                audit_log,
                "connection",
                urgent=True,
                decision="deny",
                reason=f"trust re-check after reload: {exc}",
                peer=transport.get_extra_info("peername"),
                spiffe_id=peer.identity.id_text,
            )
            if close_now:
                grace = state.config.drain_timeout.total_seconds()
                _close_connection(transport, grace=grace)
            return
        peer.checked = state.generation

    async def _trust_sweep(self) -> None:
        """Re-check every open connection verified before the last trust change; off the hot
        path: in batches, yielding to the event loop between them. O(open connections), and
        identical chains are verified once (the chain cache)."""
        state = self.holder.current
        closed = checked = 0
        now = datetime.now(UTC)
        for index, (transport, peer) in enumerate(list(self.peers.items())):
            if index and index % _SWEEP_BATCH == 0:
                await asyncio.sleep(0)
                state, now = self.holder.current, datetime.now(UTC)
            if peer.revoked or peer.checked >= self.trust_generation:
                continue  # already refused, or checked by its own request meanwhile
            if transport.is_closing():
                continue
            checked += 1
            self._recheck(transport, peer, state, now, close_now=True)
            closed += peer.revoked
        log.info(
            "trust changed (generation %d): re-checked %d open connections, closed %d",
            state.generation,
            checked,
            closed,
        )

    def _record(
        self,
        conn: ConnectionInfo[Peer],
        request: Request,
        exchange: _Exchange,
        status: int,
        access: bool,
    ) -> None:
        """Metrics for every request; the access line when ``access_log`` is on."""
        route = exchange.route or "-"
        outcome = exchange.outcome
        exchange.trace.finish(status, exchange.route, exchange.error)
        self.metrics.count_request(
            route, request.method, status, time.perf_counter() - exchange.started
        )
        if outcome is not None:
            self.metrics.upstream_seconds(outcome.upstream).observe(outcome.upstream_seconds)
        if access:
            identity = conn.peer.identity
            log_access(
                request_id=exchange.request_id,
                client=conn.peername[0] if conn.peername else None,
                method=request.method,
                path=exchange.path or "-",
                status=status,
                route=route,
                spiffe_id=identity.id_text,
                upstream=outcome.upstream if outcome is not None else None,
                bytes_in=outcome.bytes_in if outcome is not None else None,
                bytes_out=outcome.bytes_out if outcome is not None else None,
                error=exchange.error,
                duration_ms=round((time.perf_counter() - exchange.started) * 1000, 3),
                trace_id=exchange.trace.trace_id,
            )

    async def _pipeline(
        self,
        conn: ConnectionInfo[Peer],
        request: Request,
        body: Body,
        responder: Responder,
        *,
        state: GatewayState,
        identity: PeerIdentity,
        exchange: _Exchange,
    ) -> ForwardOutcome:
        method = request.method
        raw = request.path if request.query is None else f"{request.path}?{request.query}"
        target = parse_target(raw)
        exchange.path = target.path
        route = self._authorize(state, identity, method, target.path, exchange)
        if route.rate_limit is not None:  # after policy, before the JWT reaches the signer
            try:
                await self.limiter.admit(route.name, route.rate_limit, identity.id_text)
            except RateLimited:
                self.metrics.rate_limited_count(route.name).inc()
                raise
        incoming = _header_dict(request)
        claims: Mapping[str, Any] | None = None
        if route.jwt is not None:
            span = exchange.trace.child("jwt_verify", mode=route.jwt.verify)
            try:
                claims = await self._check_jwt(
                    incoming, route.jwt, identity, target.query, exchange.trace.rpc_metadata(span)
                )
            except GatewayError as err:
                exchange.trace.end(span, error=err.reason)
                if not isinstance(err, TokenRejected):
                    raise
                self.metrics.decision_count("deny", f"token:{err.reason}").inc()
                emit(
                    audit_log,
                    "token",
                    urgent=True,
                    decision="deny",
                    reason=err.reason,
                    spiffe_id=identity.id_text,
                    route=route.name,
                )
                raise
            exchange.trace.end(span)
        _limit_body(request, body, route.max_body_bytes or state.config.limits.max_body_bytes)
        ih = state.config.identity_headers
        client_address = str(conn.peername[0]) if conn.peername else None
        headers = upstream_request_headers(
            incoming,
            identity,
            owned=self._owned,
            xfcc=ih.xfcc,
            client_cert=ih.client_cert,
            claim_headers=ih.claims,
            claims=claims,
            client_address=client_address,
            preserve_host=route.preserve_host,
        )
        exchange.request_id = headers["X-Request-Id"]
        if route.jwt is not None:
            if not route.jwt.forward:
                # The bearer token was verified here; like Envoy's jwt_authn it is not passed
                # on unless the route says so (`jwt.forward: true`).
                headers.popall("Authorization", None)
        elif not route.forward_authorization:
            # No JWT route: a bearer token was not verified here (it may be bound to another
            # client's certificate), so it is not passed on; other schemes (Basic, …) are.
            strip_bearer(headers)
        upstream = self.upstreams[route.upstream]
        span = exchange.trace.child("upstream", kind="client", upstream=route.upstream)
        exchange.trace.propagate(headers, span)
        try:
            if route.websocket and _wants_websocket(request):
                idle = self.listener.limits.idle_timeout if self.listener is not None else 60.0
                outcome = await upstream.tunnel(request, responder, target.forward(), headers, idle)
            else:
                outcome = await upstream.forward(
                    request, body, responder, target.forward(), headers
                )
        except BaseException as exc:
            exchange.trace.end(span, error=type(exc).__name__)
            raise
        exchange.trace.end(
            span, error=outcome.error, **{"http.response.status_code": outcome.status}
        )
        return outcome

    def _authorize(
        self,
        state: GatewayState,
        identity: PeerIdentity,
        method: str,
        path: str,
        exchange: _Exchange,
    ) -> Route:
        """Policy (default deny) through :meth:`Policy.authorize`; every decision is audited, a
        denial is raised on as the typed error the one table maps to 403 / 404."""
        log_allow = state.config.audit.allow
        span = exchange.trace.child("policy")
        try:
            decision = state.policy.authorize(identity.spiffe_id, method, path)
        except PolicyDenial as denial:
            exchange.trace.end(span, decision="deny", reason=denial.decision.reason)
            self._audit(denial.decision, identity, method, path, log_allow=log_allow)
            if denial.decision.route is not None:
                exchange.route = denial.decision.route.name
            raise
        exchange.trace.end(span, decision="allow", reason=decision.reason)
        self._audit(decision, identity, method, path, log_allow=log_allow)
        assert decision.route is not None  # an allowing decision always names its route
        exchange.route = decision.route.name
        return decision.route

    async def _check_jwt(
        self,
        incoming: CIMultiDict[str],
        jwt: JwtConfig,
        identity: PeerIdentity,
        query: str | None,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> Mapping[str, Any]:
        if query and any(k == "access_token" for k, _ in parse_qsl(query, True)):
            raise TokenRejected("token_in_query", "send the token in the Authorization header")
        values = incoming.getall("Authorization", [])
        if not values:
            raise TokenRejected("missing_token")
        if len(values) > 1:
            raise TokenRejected("multiple_tokens")
        match = _BEARER.fullmatch(values[0])
        if match is None:
            raise TokenRejected("malformed_authorization", "expected 'Bearer <token>'")
        raw = match.group(1)
        if self.jwt_issuers:
            signer_issuer = self.signer.known_issuer if self.signer is not None else None
            name = self.jwt_issuers.select(raw, jwt.issuers, signer_issuer)
            if name != SIGNER_ISSUER:
                verified = await self.jwt_issuers.verify(
                    name,
                    raw,
                    audience=jwt.audience,
                    now=datetime.now(UTC),
                    expected_subject=identity.id_text if jwt.bind == "subject" else None,
                    certificate_thumbprint=identity.x5t_s256,
                    require_binding=jwt.bind == "certificate",
                )
                return verified.claims
        if self.signer is None:
            raise TokenRejected("no_signer")
        started = time.perf_counter()
        try:
            token = await self.signer.verify(
                raw,
                audience=jwt.audience,
                mode=jwt.verify,
                expected_subject=identity.id_text if jwt.bind == "subject" else None,
                # Always given: a certificate-bound token (cnf.x5t#S256) must match this
                # connection on every JWT route; only `bind: certificate` refuses unbound ones.
                certificate_thumbprint=identity.x5t_s256,
                require_binding=jwt.bind == "certificate",
                metadata=metadata,
            )
        finally:
            self.metrics.signer_seconds(jwt.verify).observe(time.perf_counter() - started)
        return token.claims

    def _audit(
        self,
        decision: Decision,
        identity: PeerIdentity,
        method: str,
        path: str,
        *,
        log_allow: bool = True,
    ) -> None:
        """Count every decision; log every denial, and allowances unless ``audit.allow`` is off."""
        outcome = "allow" if decision.allowed else "deny"
        self.metrics.decision_count(outcome, decision.reason).inc()
        if (decision.allowed and not log_allow) or not audit_log.isEnabledFor(logging.INFO):
            return
        route = decision.route.name if decision.route is not None else None
        send(
            audit_log,
            authorization_line(
                outcome=outcome,
                reason=decision.reason,
                spiffe_id=identity.id_text,
                route=route,
                rule=decision.rule,
                method=method,
                path=path,
            ),
            urgent=not decision.allowed,
        )

    @staticmethod
    def _error_response(responder: Responder, err: GatewayError, route: str | None) -> int:
        """Answer ``err`` through the one table (unless a response already started: then the
        connection is cut); returns the status for the logs."""
        spec = response_spec(err)
        if responder.started:
            if not responder.done:
                responder.abort()
            return spec.status
        doc = {"error": spec.error, "route": route, "reason": err.reason}
        extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in spec.headers]
        with contextlib.suppress(ResponseError):
            responder.simple(spec.status, doc, extra)
        return spec.status


def _header_dict(request: Request) -> CIMultiDict[str]:
    """The request's headers as text (latin-1, the client's order); the core lower-cased the
    names, they go upstream in the conventional spelling (``x-request-id`` → ``X-Request-Id``)."""
    return CIMultiDict((_spelling(k), v.decode("latin-1")) for k, v in request.headers)


@lru_cache(maxsize=1024)
def _spelling(name: bytes) -> str:
    return "-".join(part[:1].upper() + part[1:] for part in name.decode("latin-1").split("-"))


def _wants_websocket(request: Request) -> bool:
    """An HTTP/1.1 GET without a body asking ``Connection: Upgrade`` + ``Upgrade: websocket``."""
    if request.method != "GET" or request.version != (1, 1) or request.has_body:
        return False
    upgrade = b",".join(request.header_values(b"upgrade")).lower()
    connection = b",".join(request.header_values(b"connection")).lower()
    tokens = {t.strip() for t in connection.split(b",")}
    return b"upgrade" in tokens and b"websocket" in {t.strip() for t in upgrade.split(b",")}


def _limit_body(request: Request, body: Body, limit: int) -> None:
    """The body limit of this request; a declared Content-Length over it is refused (413)
    before any upstream connection is taken."""
    if not request.has_body:
        return
    body.set_limit(limit)
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge("body_too_large")


def _connection_of(
    transport: asyncio.BaseTransport,
) -> H1Connection[Any] | H2ServerConnection[Any] | None:
    protocol = transport.get_protocol()
    return protocol if isinstance(protocol, H1Connection | H2ServerConnection) else None


def _close_after_response(transport: asyncio.BaseTransport) -> None:
    """No further request on this connection: it closes after the response in flight."""
    conn = _connection_of(transport)
    if conn is not None:
        conn.shutdown()
    else:
        transport.close()


def _close_connection(transport: asyncio.BaseTransport, *, grace: float) -> None:
    """Close a refused connection: an idle one at once; a busy one once its in-flight request
    has finished (the core reads no further request and closes after the response), or after
    ``grace`` seconds (``drain_timeout``) if it has not."""
    conn = _connection_of(transport)
    if conn is None:
        transport.close()
        return
    conn.shutdown()
    asyncio.get_running_loop().call_later(grace, conn.abort)  # a no-op once closed
