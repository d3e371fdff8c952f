"""OpenID Connect discovery and the SPIFFE bundle: the signer's published keys over HTTP(S).

Three read-only documents, all derived from the one published key set (``KeyStore.jwks_json``,
the text ``GetJWKS``/``WatchKeys`` send), so a rotation or a revocation shows here as soon as the
store publishes it, within one ``rotation.poll_interval``:

- ``/.well-known/openid-configuration``: ``issuer`` (signer.yaml ``issuer``), ``jwks_uri``
  (``discovery.public_url`` + ``/keys``), ``id_token_signing_alg_values_supported`` and the
  minimal members OpenID Connect Discovery requires;
- ``/keys``: the JWKS exactly as published (``use: sig``);
- ``/bundle``: the same keys as a SPIFFE bundle (``use: jwt-svid``, ``spiffe_sequence`` = the key
  set's sequence, ``spiffe_refresh_hint`` = the poll interval in seconds).

Every answer has an ``ETag`` (``If-None-Match`` gets 304) and ``Cache-Control: max-age`` no
longer than the poll interval. Only GET and HEAD (405 otherwise), unknown paths 404, both with a
short JSON body. The listener is bounded: at most ``discovery.max_connections`` open connections
(more are closed at once), a TLS handshake timeout, an idle keep-alive timeout, small request
line and header limits, and no request body is ever read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import ssl
from typing import Any, Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from svidgate.pki.jose import loads_strict
from svidgate.signer.config import DiscoveryConfig, SignerConfig
from svidgate.signer.keystore import KeyStore

from svidgate.config import ConfigError, parse_host_port

log = logging.getLogger("svidgate.signer.discovery")

OPENID_CONFIGURATION: Final = "/.well-known/openid-configuration"
KEYS: Final = "/keys"
BUNDLE: Final = "/bundle"
HANDSHAKE_TIMEOUT: Final = 5.0
KEEPALIVE_TIMEOUT: Final = 15.0
MAX_LINE: Final = 4096  # request line and each header line
MAX_HEADERS: Final = 32
SHUTDOWN_GRACE: Final = 2.0
ALLOWED_METHODS: Final = ("GET", "HEAD")


class _BoundedServer(web.Server):
    """aiohttp's low-level server with a cap on open connections: one more is closed at once."""

    def __init__(self, handler: Any, *, max_connections: int, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.refused = 0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if len(self.connections) > self.max_connections:
            self.refused += 1
            transport.abort()


def _json_body(document: dict[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def bundle_document(jwks: dict[str, Any], sequence: int, refresh_hint: int) -> dict[str, Any]:
    """A published JWKS as a SPIFFE bundle (JWT authorities only): each key with
    ``use: jwt-svid``, plus ``spiffe_sequence`` and ``spiffe_refresh_hint``."""
    keys = [{**key, "use": "jwt-svid"} for key in jwks.get("keys", ())]
    return {
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint,
    }


def openid_configuration(
    cfg: SignerConfig, public_url: str, jwks: dict[str, Any]
) -> dict[str, Any]:
    """The OpenID Provider metadata a third-party verifier needs (issuer and keys)."""
    algorithms = sorted(
        {cfg.keys.algorithm} | {k["alg"] for k in jwks.get("keys", ()) if "alg" in k}
    )
    return {
        "issuer": cfg.issuer,
        "jwks_uri": f"{public_url}{KEYS}",
        "id_token_signing_alg_values_supported": algorithms,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
    }


class _Documents:
    """The three documents of one published key set (rebuilt when its sequence changes)."""

    def __init__(self, cfg: SignerConfig, discovery: DiscoveryConfig, store: KeyStore) -> None:
        self.cfg = cfg
        self.discovery = discovery
        self.store = store
        self._sequence: int | None = None
        self._bodies: dict[str, tuple[bytes, str]] = {}
        seconds = int(cfg.rotation.poll_interval.total_seconds())
        self.max_age = max(0, seconds)
        self.refresh_hint = max(1, seconds)

    def get(self, path: str) -> tuple[bytes, str] | None:
        """(body, etag) of ``path`` for the key set published now, or None (no such path)."""
        sequence, text = self.store.sequence, self.store.jwks_json
        if sequence != self._sequence:
            self._bodies = self._build(sequence, text)
            self._sequence = sequence
        return self._bodies.get(path)

    def _build(self, sequence: int, text: str) -> dict[str, tuple[bytes, str]]:
        jwks = loads_strict(text)
        bodies = {
            OPENID_CONFIGURATION: _json_body(
                openid_configuration(self.cfg, self.discovery.public_url, jwks)
            ),
            KEYS: text.encode(),
            BUNDLE: _json_body(bundle_document(jwks, sequence, self.refresh_hint)),
        }
        return {path: (body, _etag(body)) for path, body in bodies.items()}


def _etag(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _error(status: int, error: str, **headers: str) -> web.Response:
    return web.Response(
        status=status,
        body=_json_body({"error": error}),
        content_type="application/json",
        headers=headers,
    )


class DiscoveryServer:
    """The discovery listener: start after the key store, stop before it."""

    def __init__(self, cfg: SignerConfig, store: KeyStore) -> None:
        assert cfg.discovery is not None
        self.discovery = cfg.discovery
        self.documents = _Documents(cfg, cfg.discovery, store)
        self.store = store
        self.port: int | None = None
        self._server: _BoundedServer | None = None
        self._listener: asyncio.Server | None = None

    def _ssl_context(self) -> ssl.SSLContext | None:
        tls = self.discovery.tls
        if tls is None:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"discovery.tls: cannot load cert/key ({exc})") from None
        return ctx

    async def start(self) -> None:
        host, port = parse_host_port(self.discovery.listen, any_port=True)
        server = _BoundedServer(
            self._handle,
            max_connections=self.discovery.max_connections,
            keepalive_timeout=KEEPALIVE_TIMEOUT,
            max_line_size=MAX_LINE,
            max_field_size=MAX_LINE,
            max_headers=MAX_HEADERS,
            access_log=None,
        )
        ssl_ctx = self._ssl_context()
        try:
            listener = await asyncio.get_running_loop().create_server(
                server,
                host,
                port,
                ssl=ssl_ctx,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT if ssl_ctx is not None else None,
                backlog=128,
            )
        except OSError as exc:
            raise ConfigError(
                f"discovery.listen: cannot listen on {self.discovery.listen} ({exc.strerror})"
            ) from None
        self._server, self._listener = server, listener
        self.port = listener.sockets[0].getsockname()[1]
        scheme = "https" if ssl_ctx is not None else "http"
        log.info("discovery listening on %s://%s:%d", scheme, host, self.port)

    async def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        server, self._server = self._server, None
        if server is not None:
            with contextlib.suppress(Exception):
                await server.shutdown(SHUTDOWN_GRACE)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.method not in ALLOWED_METHODS:
            return _error(405, "method_not_allowed", Allow=", ".join(ALLOWED_METHODS))
        if not self.store.can_verify:
            return _error(503, "not_ready", **{"Retry-After": "1"})
        found = self.documents.get(request.path)
        if found is None:
            return _error(404, "not_found")
        body, etag = found
        headers = {
            "ETag": etag,
            "Cache-Control": f"public, max-age={self.documents.max_age}",
        }
        if etag in _etags(request.headers.get("If-None-Match", "")):
            return web.Response(status=304, headers=headers)
        return web.Response(body=body, content_type="application/json", headers=headers)


def _etags(header: str) -> set[str]:
    """The entity tags of an If-None-Match header (weak ones compared by their opaque part)."""
    return {tag.strip().removeprefix("W/") for tag in header.split(",") if tag.strip()}
