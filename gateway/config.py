"""The gateway's configuration: one frozen, typed model of ``gateway.yaml``.

Loaded and validated once (and again on every reload): unknown keys are errors, every error
names its field path, relative paths (Unix socket paths included) are resolved against the
directory of the config file, durations are Go-style (``250ms``, ``30s``).
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from svidgate.gateway.errors import ConfigError
from svidgate.pki.durations import parse_duration
from svidgate.pki.errors import PkiError
from svidgate.pki.matchers import parse_id_pattern
from svidgate.pki.spiffe_id import parse_spiffe_id, parse_trust_domain

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # RFC 9110 token
_HEADER_NAME = _TOKEN


def _duration(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except PkiError as exc:
            raise ValueError(str(exc)) from None
    raise ValueError("expected a Go-style duration string such as '250ms', '30s' or '1h30m'")


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        value = Path(base) / value
    return Path(value).absolute()


def _pattern(value: str) -> str:
    try:
        parse_id_pattern(value)
    except PkiError as exc:
        raise ValueError(str(exc)) from None
    return value


def _spiffe_id(value: str) -> str:
    try:
        parse_spiffe_id(value, require_path=True)
    except PkiError as exc:
        raise ValueError(str(exc)) from None
    return value


def _host_port(value: str) -> str:
    parse_host_port(value)
    return value


def parse_host_port(value: str) -> tuple[str, int]:
    """Split ``host:port`` / ``[v6]:port``; raises ValueError naming the expected form."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:8443), got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    return host, int(port)


Duration = Annotated[timedelta, BeforeValidator(_duration)]
FilePath = Annotated[Path, AfterValidator(_resolve)]
Pattern = Annotated[str, AfterValidator(_pattern)]
SpiffeIdText = Annotated[str, AfterValidator(_spiffe_id)]
HostPort = Annotated[str, AfterValidator(_host_port)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class ServerTLS(_Model):
    """The gateway's own SVID (server certificate) and the minimum TLS version."""

    cert: FilePath
    key: FilePath
    min_version: Literal["1.2", "1.3"] = "1.2"


class TrustDomainConfig(_Model):
    bundle: FilePath


class SignerTLS(_Model):
    """mTLS to a signer reached over TCP: the gateway's SVID, the bundle, the signer's ID."""

    cert: FilePath
    key: FilePath
    bundle: FilePath
    spiffe_id: SpiffeIdText | None = None
    server_name: str = "localhost"


class SignerConfig(_Model):
    """Where the signer sidecar listens: ``unix:PATH`` (stored absolute) or ``HOST:PORT``."""

    address: str
    timeout: Duration = timedelta(milliseconds=250)
    tls: SignerTLS | None = None
    issuer: str | None = None  # expected ``iss`` for verify: local (None: not checked)
    clock_skew: Duration = timedelta(seconds=30)
    max_ttl: Duration | None = None  # verify: local: stricter than the signer's pushed max_ttl

    @field_validator("address")
    @classmethod
    def _address(cls, value: str, info: ValidationInfo) -> str:
        if value.startswith("unix:"):
            raw = value[len("unix:") :]
            if not raw:
                raise ValueError("expected unix:PATH with a non-empty path")
            return "unix:" + str(_resolve(Path(raw), info))
        parse_host_port(value)
        return value

    @property
    def is_unix(self) -> bool:
        return self.address.startswith("unix:")


class UpstreamTLS(_Model):
    """Upstream mTLS: the gateway's SVID as client cert, the bundle, the upstream's pinned ID."""

    cert: FilePath | None = None
    key: FilePath | None = None
    bundle: FilePath
    spiffe_id: SpiffeIdText


class UpstreamTimeouts(_Model):
    connect: Duration = timedelta(seconds=1)
    read: Duration = timedelta(seconds=30)


class CircuitBreakerConfig(_Model):
    """Open after ``failures`` consecutive failures; let one probe through after ``reset``."""

    failures: int = Field(default=5, ge=1)
    reset: Duration = timedelta(seconds=10)


class UpstreamConfig(_Model):
    url: str
    tls: UpstreamTLS | None = None
    timeouts: UpstreamTimeouts = UpstreamTimeouts()
    retries: int = Field(default=1, ge=0, le=5)
    circuit_breaker: CircuitBreakerConfig = CircuitBreakerConfig()

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        m = re.fullmatch(r"(https?)://([^/?#@]+)", value.rstrip("/"))
        if m is None:
            raise ValueError(
                f"expected http(s)://HOST:PORT without path, query or credentials, got {value!r}"
            )
        return value.rstrip("/")


class RouteMatch(_Model):
    path_prefix: str
    methods: tuple[str, ...] | None = None

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


class JwtConfig(_Model):
    required: bool = True
    audience: str = Field(min_length=1)
    bind: Literal["subject", "certificate", "none"] = "subject"
    verify: Literal["remote", "local"] = "remote"
    forward: bool = False  # pass the verified Authorization header upstream (default: strip it)


class RouteConfig(_Model):
    name: str = Field(min_length=1)
    match: RouteMatch
    upstream: str
    allow: tuple[Pattern, ...] = ()
    jwt: JwtConfig | None = None


class IdentityHeaders(_Model):
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


class AuditConfig(_Model):
    """Which authorization decisions go to the audit log; denials are always logged."""

    allow: bool = True


class GatewayConfig(_Model):
    """The whole of ``gateway.yaml``."""

    listen: HostPort
    workers: int = Field(default=1, ge=1, le=256)
    admin_listen: HostPort | None = None
    tls: ServerTLS
    trust_domains: dict[str, TrustDomainConfig] = Field(min_length=1)
    signer: SignerConfig | None = None
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)
    routes: tuple[RouteConfig, ...] = ()
    identity_headers: IdentityHeaders = IdentityHeaders()
    # Additions beyond the documented keys (all optional):
    drain_timeout: Duration = timedelta(seconds=10)
    reload_interval: Duration = timedelta(seconds=2)  # file-change polling; 0s disables it
    access_log: bool = True
    audit: AuditConfig = AuditConfig()

    @field_validator("trust_domains")
    @classmethod
    def _trust_domains(cls, value: dict[str, TrustDomainConfig]) -> dict[str, TrustDomainConfig]:
        out = {}
        for name, td in value.items():
            try:
                out[parse_trust_domain(name).name] = td
            except PkiError as exc:
                raise ValueError(f"{name!r}: {exc}") from None
        return out

    @property
    def needs_signer(self) -> bool:
        return any(r.jwt is not None and r.jwt.required for r in self.routes)


def _cross_check(cfg: GatewayConfig) -> list[str]:
    """References between sections, reported with their field paths."""
    errors: list[str] = []
    seen: set[str] = set()
    for i, route in enumerate(cfg.routes):
        if route.name in seen:
            errors.append(f"routes.{i}.name: duplicate route name {route.name!r}")
        seen.add(route.name)
        if route.upstream not in cfg.upstreams:
            errors.append(f"routes.{i}.upstream: unknown upstream {route.upstream!r}")
        if route.jwt is not None and route.jwt.required and cfg.signer is None:
            errors.append(f"routes.{i}.jwt: the route requires a JWT but 'signer' is not set")
    if cfg.signer is not None and not cfg.signer.is_unix and cfg.signer.tls is None:
        errors.append("signer.tls: a TCP signer address needs tls (cert, key, bundle)")
    return errors


def _format_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def parse_config(data: Any, *, base_dir: Path, source: str = "gateway.yaml") -> GatewayConfig:
    """Validate an already-parsed YAML document; raises :class:`ConfigError` (one line)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        cfg = GatewayConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_validation_error(exc)}") from None
    errors = _cross_check(cfg)
    if errors:
        raise ConfigError(f"{source}: {'; '.join(errors)}")
    return cfg


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate ``gateway.yaml``; relative paths resolve against its directory."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path}: invalid YAML{where}") from None
    return parse_config(data, base_dir=path.absolute().parent, source=str(path))
