"""The gateway's configuration: the frozen, typed models of ``gateway.yaml`` and their rules.

Field types, YAML reading and error reporting come from the config kernel
(:mod:`svidgate.config`): unknown keys are errors, every error names its field path, relative
paths (the signer's ``unix:`` socket path included) are made absolute against the directory of
the config file without resolving symlinks, durations are Go-style (``250ms``, ``30s``). This
module owns the models and the references between sections (:func:`_cross_check`).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, ValidationInfo, field_validator, model_validator

from svidgate.config import (
    ConfigFile,
    ConfigModel,
    ConfigPath,
    Duration,
    ListenAddress,
    ListOf,
    Problem,
    SpiffeIdField,
    SpiffePatternField,
    TracingConfig,
    TrustDomainField,
    WorkloadApiConfig,
    parse_host_port,
    resolve_path,
)

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token
_HEADER_NAME = _TOKEN


def _version_text(value: Any) -> Any:
    """YAML reads ``min_version: 1.2`` as a float; take it as the string it looks like."""
    return str(value) if isinstance(value, float) else value


class ServerTLS(ConfigModel):
    """The gateway's own SVID (server certificate) and the minimum TLS version.

    ``source: files`` reads ``cert`` + ``key``; ``source: workload_api`` takes the SVID from the
    SPIFFE Workload API (``workload_api``, which trust domains with ``source: workload_api``
    use too) and rotates it as the agent does."""

    source: Literal["files", "workload_api"] = "files"
    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    workload_api: WorkloadApiConfig = WorkloadApiConfig()
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_version_text)] = "1.2"


class TrustDomainConfig(ConfigModel):
    """A trust domain's bundle: a file (``bundle``) or the Workload API (``source``)."""

    source: Literal["file", "workload_api"] = "file"
    bundle: ConfigPath | None = None


class SignerTLS(ConfigModel):
    """mTLS to a signer reached over TCP: the gateway's SVID, the bundle, the signer's ID.

    ``spiffe_id`` is the signer's identity, verified on every connection that carries RPCs
    (gateway/signer_channel.py). ``server_name`` is only the SNI sent; it authenticates nothing.
    """

    cert: ConfigPath
    key: ConfigPath
    bundle: ConfigPath
    spiffe_id: SpiffeIdField
    server_name: str | None = Field(default=None, min_length=1)


class SignerCacheConfig(ConfigModel):
    """The bounds of each verification cache (remote and local have one each)."""

    max_entries: int = Field(default=10_000, ge=1)
    max_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    max_token_bytes: int = Field(default=4096, ge=0)  # longer tokens: verified, not cached


class SignerClientConfig(ConfigModel):
    """The ``signer`` section: ``unix:PATH`` (stored absolute) or ``HOST:PORT`` with ``tls``."""

    address: str
    timeout: Duration = timedelta(milliseconds=250)
    tls: SignerTLS | None = None
    # expected ``iss`` for verify: local (None: the issuer the signer publishes with its keys)
    issuer: str | None = None
    clock_skew: Duration = timedelta(seconds=30)
    max_ttl: Duration | None = None  # verify: local: stricter than the signer's pushed max_ttl
    cache: SignerCacheConfig = SignerCacheConfig()

    @field_validator("address")
    @classmethod
    def _address(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("unix:"):
            raw = value[len("unix:") :]
            if not raw:
                raise ValueError("expected unix:PATH with a non-empty path")
            return "unix:" + str(resolve_path(raw, info))
        parse_host_port(value)
        return value

    @property
    def is_unix(self) -> bool:
        return self.address.startswith("unix:")


class UpstreamTLS(ConfigModel):
    """Upstream mTLS: the gateway's SVID as client cert, the bundle, the upstream's pinned ID."""

    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    # None: the trust_domains bundle of spiffe_id's trust domain (files or Workload API)
    bundle: ConfigPath | None = None
    spiffe_id: SpiffeIdField


class UpstreamTimeouts(ConfigModel):
    connect: Duration = timedelta(seconds=1)
    read: Duration = timedelta(seconds=30)
    # a client that does not read its response for this long is cut and the upstream
    # connection is closed (freed), never pooled
    write: Duration = timedelta(seconds=30)


class CircuitBreakerConfig(ConfigModel):
    """Open after ``failures`` consecutive failures; let one probe through after ``reset``."""

    failures: int = Field(default=5, ge=1)
    reset: Duration = timedelta(seconds=10)


class UpstreamConfig(ConfigModel):
    url: str
    tls: UpstreamTLS | None = None
    # h2: HTTP/2 to the upstream (TLS with ALPN h2, or h2c with prior knowledge for http://)
    protocol: Literal["http1", "h2"] = "http1"
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    retries: int = Field(default=1, ge=0, le=5)
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()
    max_connections: int = Field(default=256, ge=1)  # in use at once, per worker
    queue_timeout: Duration = timedelta(seconds=1)  # waiting longer for a connection: 503

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        m = re.fullmatch(r"(https?)://([^/?#@]+)", value.rstrip("/"))
        if m is None:
            raise ValueError(
                f"expected http(s)://HOST:PORT without path, query or credentials, got {value!r}"
            )
        return value.rstrip("/")


class RouteMatch(ConfigModel):
    path_prefix: str
    methods: ListOf[str] | None = None
    # ASCII case-insensitive prefix match; None: ``routing.case_insensitive_prefix`` decides
    case_insensitive_prefix: bool | None = None

    @field_validator("path_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"/([A-Za-z0-9\-._~!$&'()*+,=:@]+/?)*", value) or "//" in value:
            raise ValueError(
                f"expected a canonical path starting with '/' (no '//', ';', '%', '.' segments), "
                f"got {value!r}"
            )
        if any(seg in (".", "..") for seg in value.split("/")):
            raise ValueError(f"dot segments are not allowed in a path prefix: {value!r}")
        return value.rstrip("/") or "/"

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("list at least one method, or omit 'methods' to allow all")
        out = []
        for method in value:
            if not _TOKEN.fullmatch(method):
                raise ValueError(f"not an HTTP method: {method!r}")
            out.append(method.upper())
        return tuple(dict.fromkeys(out))


SIGNER_ISSUER = "signer"  # the implicit jwt_issuers name of the sidecar signer


class JwtBundleSource(ConfigModel):
    """Where an issuer's JWT bundle comes from: exactly one of ``source: workload_api``,
    ``file`` or ``url`` (gateway/jwt_issuers.py)."""

    source: Literal["workload_api"] | None = None
    socket: str | None = Field(default=None, min_length=1)  # default: $SPIFFE_ENDPOINT_SOCKET
    file: ConfigPath | None = None
    url: str | None = None
    ca: ConfigPath | None = None
    refresh: Duration = timedelta(minutes=5)
    refetch_min_interval: Duration = timedelta(seconds=30)
    timeout: Duration = timedelta(seconds=5)

    @model_validator(mode="after")
    def _one_source(self) -> JwtBundleSource:
        chosen = [name for name in ("source", "file", "url") if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(
                "expected exactly one of {source: workload_api}, {file: PATH} or "
                f"{{url: https://…, ca: PATH}}, got {chosen or 'none'}"
            )
        if self.socket is not None and self.source is None:
            raise ValueError("socket is only for source: workload_api")
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme != "https" or not parts.hostname or parts.fragment:
                raise ValueError(f"url must be an https:// URL with a host, got {self.url!r}")
            if self.ca is None:
                raise ValueError("url needs ca (the CA bundle that the server's certificate pins)")
        elif self.ca is not None:
            raise ValueError("ca is only for url")
        for name in ("refresh", "refetch_min_interval", "timeout"):
            if getattr(self, name) <= timedelta(0):
                raise ValueError(f"{name} must be longer than 0s")
        return self


class JwtIssuerConfig(ConfigModel):
    """Another issuer of JWT-SVIDs: its trust domain, where its keys come from, its ``iss``."""

    trust_domain: TrustDomainField
    bundle: JwtBundleSource
    issuer: str | None = Field(default=None, min_length=1)  # None: iss is not checked
    max_ttl: Duration = timedelta(hours=1)
    clock_skew: Duration = timedelta(seconds=30)


class JwtConfig(ConfigModel):
    required: bool = True
    audience: str = Field(min_length=1)
    bind: Literal["subject", "certificate", "none"] = "subject"
    verify: Literal["remote", "local"] = "remote"
    forward: bool = False  # pass the verified Authorization header upstream (default: strip it)
    # which issuers' tokens the route accepts: `signer` and names of jwt_issuers
    issuers: ListOf[Annotated[str, Field(min_length=1)]] = (SIGNER_ISSUER,)

    @property
    def uses_signer(self) -> bool:
        return SIGNER_ISSUER in self.issuers


class RouteRateLimit(ConfigModel):
    """``routes[].rate_limit``: a token bucket of ``burst`` tokens refilled at
    ``requests_per_second``, one bucket per caller (``key: identity``) or per route."""

    requests_per_second: float = Field(gt=0, allow_inf_nan=False)
    burst: int = Field(ge=1)
    key: Literal["identity", "route"] = "identity"


class RouteConfig(ConfigModel):
    name: str = Field(min_length=1)
    match: RouteMatch
    upstream: str
    allow: ListOf[SpiffePatternField] = ()
    jwt: JwtConfig | None = None
    # routes without jwt.required: pass the client's `Authorization: Bearer` upstream unverified
    # (default: strip it; other schemes always pass)
    forward_authorization: bool = False
    max_body_bytes: int | None = Field(default=None, ge=1)  # None: limits.max_body_bytes
    preserve_host: bool = False  # send the client's Host upstream (default: the upstream's)
    websocket: bool = False  # relay `Upgrade: websocket` (after policy and JWT)
    rate_limit: RouteRateLimit | None = None  # checked after policy, before the JWT

    @property
    def requires_jwt(self) -> bool:
        return self.jwt is not None and self.jwt.required


class IdentityHeaders(ConfigModel):
    xfcc: bool = True
    client_cert: bool = False
    claims: dict[str, str] = Field(default_factory=dict)

    @field_validator("claims")
    @classmethod
    def _claims(cls, value: dict[str, str]) -> dict[str, str]:
        for claim, header in value.items():
            if not _HEADER_NAME.fullmatch(header):
                raise ValueError(f"claim {claim!r}: not a valid header name: {header!r}")
        return value


class RoutingConfig(ConfigModel):
    """Defaults for how every route matches; a route's own ``match`` keys override them."""

    case_insensitive_prefix: bool = False


class AuditConfig(ConfigModel):
    """Which authorization decisions go to the audit log; denials are always logged."""

    allow: bool = True


class H2Limits(ConfigModel):
    """Limits of downstream HTTP/2, advertised in the server's SETTINGS and enforced."""

    max_concurrent_streams: int = Field(default=100, ge=1)
    max_header_list_bytes: int = Field(default=16384, ge=1)


class LimitsConfig(ConfigModel):
    """What one peer may hold on one worker (DESIGN.md "Limits"); every value positive."""

    max_connections: int = Field(default=4096, ge=1)
    max_connections_per_identity: int = Field(default=512, ge=1)
    handshake_timeout: Duration = timedelta(seconds=5)
    header_timeout: Duration = timedelta(seconds=10)
    idle_timeout: Duration = timedelta(seconds=60)
    max_header_bytes: int = Field(default=16384, ge=256)
    max_headers: int = Field(default=100, ge=1)
    max_body_bytes: int = Field(default=10 * 1024 * 1024, ge=1)
    body_timeout: Duration = timedelta(seconds=30)
    h2: H2Limits = H2Limits()

    @field_validator("handshake_timeout", "header_timeout", "idle_timeout", "body_timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0s")
        return value


class RedisConfig(ConfigModel):
    """``rate_limits.redis``: the shared bucket store (``redis://`` or ``rediss://``)."""

    url: str = "redis://127.0.0.1:6379/0"
    timeout: Duration = timedelta(milliseconds=50)  # one bucket update, connect included
    max_connections: int = Field(default=16, ge=1)  # per worker

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.fullmatch(r"rediss?://[^\s/?#]+(/\d+)?", value):
            # the value is not echoed: it may hold a password
            raise ValueError("expected redis://[:PASSWORD@]HOST:PORT[/DB] or rediss://…")
        return value

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be longer than 0s")
        return value


class RateLimitsConfig(ConfigModel):
    """``rate_limits``: where the routes' buckets live and what happens when Redis fails."""

    backend: Literal["local", "redis"] = "local"
    redis: RedisConfig = RedisConfig()
    # local: fall back to per-worker buckets (logged once per outage) | deny: 503 | allow
    on_backend_error: Literal["local", "deny", "allow"] = "local"
    max_keys: int = Field(default=100_000, ge=1)  # local buckets per worker (LRU beyond)


class GatewayConfig(ConfigModel):
    """The whole of ``gateway.yaml``."""

    listen: ListenAddress
    workers: int = Field(default=1, ge=1, le=256)
    admin_listen: ListenAddress | None = None
    tls: ServerTLS
    trust_domains: dict[TrustDomainField, TrustDomainConfig] = Field(min_length=1)
    signer: SignerClientConfig | None = None
    jwt_issuers: dict[str, JwtIssuerConfig] = Field(default_factory=dict)
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    routes: ListOf[RouteConfig] = ()
    routing: RoutingConfig = RoutingConfig()
    identity_headers: IdentityHeaders = IdentityHeaders()
    limits: LimitsConfig = LimitsConfig()
    http2: bool = True  # offer ALPN h2 next to http/1.1 (false: http/1.1 only)
    rate_limits: RateLimitsConfig = RateLimitsConfig()
    # Additions beyond the documented keys (all optional):
    drain_timeout: Duration = timedelta(seconds=10)
    reload_interval: Duration = timedelta(seconds=2)  # file-change polling; 0s disables it
    access_log: bool = True
    audit: AuditConfig = AuditConfig()
    tracing: TracingConfig | None = None  # spans over OTLP; traceparent is propagated anyway

    @property
    def needs_signer(self) -> bool:
        return any(r.requires_jwt and r.jwt is not None and r.jwt.uses_signer for r in self.routes)

    @property
    def uses_workload_api(self) -> bool:
        return self.tls.source == "workload_api" or any(
            td.source == "workload_api" for td in self.trust_domains.values()
        )


def _check_sources(cfg: GatewayConfig) -> list[Problem]:
    """Files vs the Workload API: each source with exactly the keys it uses."""
    problems: list[Problem] = []
    files = cfg.tls.source == "files"
    for key in ("cert", "key"):
        if files and getattr(cfg.tls, key) is None:
            problems.append((f"tls.{key}", "required when tls.source is files"))
        if not files and getattr(cfg.tls, key) is not None:
            problems.append((f"tls.{key}", "not used with tls.source: workload_api; remove it"))
    for name, td in cfg.trust_domains.items():
        if td.source == "file" and td.bundle is None:
            problems.append((f"trust_domains.{name}.bundle", "required (or source: workload_api)"))
        if td.source == "workload_api" and td.bundle is not None:
            problems.append((f"trust_domains.{name}.bundle", "not used with source: workload_api"))
    for name, up in cfg.upstreams.items():
        if up.tls is None or up.tls.bundle is not None:
            continue
        domain = up.tls.spiffe_id.split("/")[2]
        if domain not in cfg.trust_domains:
            problems.append(
                (f"upstreams.{name}.tls.bundle", f"required: {domain} is not in trust_domains")
            )
    return problems


def _cross_check(cfg: GatewayConfig) -> list[Problem]:
    """References between sections, reported with their field paths."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for i, route in enumerate(cfg.routes):
        if route.name in seen:
            problems.append((f"routes.{i}.name", f"duplicate route name {route.name!r}"))
        seen.add(route.name)
        if route.upstream not in cfg.upstreams:
            problems.append((f"routes.{i}.upstream", f"unknown upstream {route.upstream!r}"))
        if route.jwt is not None:
            problems += _issuer_problems(cfg, route.jwt, f"routes.{i}.jwt")
        if (
            route.requires_jwt
            and route.jwt is not None
            and route.jwt.uses_signer
            and cfg.signer is None
        ):
            problems.append((f"routes.{i}.jwt", "the route requires a JWT but 'signer' is not set"))
        if route.requires_jwt and route.forward_authorization:
            problems.append(
                (
                    f"routes.{i}.forward_authorization",
                    "only for routes without a JWT; a JWT route passes its token with jwt.forward",
                )
            )
    if SIGNER_ISSUER in cfg.jwt_issuers:
        problems.append(
            (f"jwt_issuers.{SIGNER_ISSUER}", "the name 'signer' is the sidecar signer's (implicit)")
        )
    if cfg.signer is not None and not cfg.signer.is_unix and cfg.signer.tls is None:
        problems.append(("signer.tls", "a TCP signer address needs tls (cert, key, bundle)"))
    return problems + _check_sources(cfg)


def _issuer_problems(cfg: GatewayConfig, jwt: JwtConfig, where: str) -> list[Problem]:
    """A route's ``jwt.issuers``: known names, listed once, and never two that a token could
    not tell apart (no ``issuer`` and the same trust domain)."""
    problems: list[Problem] = []
    if not jwt.issuers:
        problems.append((f"{where}.issuers", "list at least one issuer (default: [signer])"))
    if len(set(jwt.issuers)) != len(jwt.issuers):
        problems.append((f"{where}.issuers", "an issuer is listed twice"))
    by_domain: dict[str, str] = {}
    for name in jwt.issuers:
        if name == SIGNER_ISSUER:
            continue
        issuer = cfg.jwt_issuers.get(name)
        if issuer is None:
            problems.append((f"{where}.issuers", f"unknown issuer {name!r} (not in jwt_issuers)"))
        elif issuer.issuer is None:
            other = by_domain.setdefault(issuer.trust_domain, name)
            if other != name:
                problems.append(
                    (
                        f"{where}.issuers",
                        f"{other!r} and {name!r} share trust domain {issuer.trust_domain} and "
                        f"neither sets issuer: a token could not tell them apart",
                    )
                )
    return problems


GATEWAY_YAML = ConfigFile(GatewayConfig, "gateway.yaml", rules=_cross_check)
parse_config = GATEWAY_YAML.parse  # (data, *, base_dir, source=None) -> GatewayConfig
load_config = GATEWAY_YAML.load  # (path) -> GatewayConfig; raises svidgate.config.ConfigError
