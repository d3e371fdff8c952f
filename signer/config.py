"""signer.yaml: the frozen, typed models and the signer's rules, validated once at start-up.

Field types, YAML reading and error reporting come from the config kernel
(:mod:`svidgate.config`): every error names its field path (``signer.yaml: rotation.prepare_ahead:
…``) and all of them are reported at once; relative paths, the Unix socket included, are made
absolute against the directory of the config file without resolving symlinks. The rotation
safety rule is checked here, with the numbers in the message, so a signer that could drop a
verifiable token never starts. The signer reads nothing from the environment (no Vault token
either: see :class:`VaultConfig`).
"""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field
from svidgate.pki.durations import format_duration
from svidgate.pki.spiffe_id import TrustDomain, parse_trust_domain
from svidgate.signer.jwt import REGISTERED_CLAIMS

from svidgate.config import (
    ConfigFile,
    ConfigModel,
    ConfigPath,
    Duration,
    FileMode,
    ListenAddress,
    ListOf,
    Problem,
    SpiffePatternField,
    TracingConfig,
    TrustDomainField,
    WorkloadApiConfig,
    parse_host_port,
)

Algorithm = Literal["EdDSA", "ES256", "RS256", "PS256"]


class ListenConfig(ConfigModel):
    unix: ConfigPath | None = None
    unix_mode: FileMode = 0o600
    # Accept a socket directory that other users may write to (a Kubernetes emptyDir is 0777
    # and reachable only by the pod's containers); refused by default, see server.py.
    unix_shared_dir: bool = False
    tcp: ListenAddress | None = None


class TlsConfig(ConfigModel):
    """The TCP listener's SVID and client CAs: files, or the SPIFFE Workload API (the SVID and
    the bundle of ``trust_domain``, both rotating as the agent sends them)."""

    source: Literal["files", "workload_api"] = "files"
    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    bundle: ConfigPath | None = None
    workload_api: WorkloadApiConfig = WorkloadApiConfig()


def _tls_rules(tls: TlsConfig | None) -> list[Problem]:
    if tls is None:
        return []
    files = tls.source == "files"
    problems: list[Problem] = []
    for key in ("cert", "key", "bundle"):
        if files and getattr(tls, key) is None:
            problems.append((f"tls.{key}", "required when tls.source is files"))
        if not files and getattr(tls, key) is not None:
            problems.append((f"tls.{key}", "not used with tls.source: workload_api; remove it"))
    return problems


def _extra_claim_name(value: str) -> str:
    if not value:
        raise ValueError("a claim name must not be empty")
    if value in REGISTERED_CLAIMS:
        raise ValueError(
            f"{value} is a registered claim: the signer sets it, claims_json never can"
        )
    return value


ExtraClaimName = Annotated[str, AfterValidator(_extra_claim_name)]
Audience = Annotated[str, Field(min_length=1)]


class AuthorizationConfig(ConfigModel):
    verify: ListOf[SpiffePatternField] = ()
    sign: ListOf[SpiffePatternField] = ()
    rotate: ListOf[SpiffePatternField] = ()  # Rotate and Revoke
    # Callers (over TCP) that may mint tokens for a subject other than themselves; the subject
    # must still match `sign`.
    sign_for_others: ListOf[SpiffePatternField] = ()
    # Extra claim name -> who may put it in claims_json (over TCP the caller, over the Unix
    # socket the token's subject). A claim named nowhere is refused: none by default.
    claims: dict[ExtraClaimName, ListOf[SpiffePatternField]] = Field(default_factory=dict)
    # Caller pattern -> the audiences it may mint for (same principal as `claims`). Empty: no
    # restriction; once set, a principal matching no pattern may mint for no audience.
    audiences: dict[SpiffePatternField, ListOf[Audience]] = Field(default_factory=dict)


def secret_file_problem(path: Path, mode: int) -> str | None:
    """Why a credential file with permission bits ``mode`` must not be used, or None: only its
    owner may have any access to it."""
    if not mode & 0o077:
        return None
    what = "readable" if mode & 0o044 else "accessible"
    return f"{path} is mode {mode & 0o777:04o}; must not be {what} by group or others (chmod 600)"


def _owner_only(path: Path) -> Path:
    try:
        mode = path.stat().st_mode
    except OSError:
        return path  # not there (yet): every login reads it again and reports it
    problem = secret_file_problem(path, mode)
    if problem is not None:
        raise ValueError(problem)
    return path


# A Vault credential file (token_file, secret_id_file), checked again at every login. jwt_file
# is not: Kubernetes projects service-account tokens 0644 unless told otherwise.
SecretFile = Annotated[ConfigPath, AfterValidator(_owner_only)]


class VaultAuthConfig(ConfigModel):
    method: Literal["token", "approle", "kubernetes"] = "token"
    token_file: SecretFile | None = None  # required for method token
    role_id: str | None = None
    secret_id_file: SecretFile | None = None
    role: str | None = None
    jwt_file: ConfigPath = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    mount: str | None = None  # auth mount path; defaults to the method name


class VaultConfig(ConfigModel):
    address: str
    # plain http:// to a host that is not loopback (the token would travel in clear)
    allow_plaintext: bool = False
    # the only proxy the client uses (HTTP(S)_PROXY from the environment never is)
    proxy: str | None = None
    auth: VaultAuthConfig = VaultAuthConfig()
    namespace: str | None = None
    ca_cert: ConfigPath | None = None
    timeout: Duration = timedelta(seconds=5)
    kv_mount: str = "secret"
    kv_path: str = "svidgate/signing-keys"
    transit_mount: str = "transit"
    transit_key: str = "svidgate-jwt"


def is_loopback_host(host: str) -> bool:
    """``localhost`` or an address in 127.0.0.0/8 or ::1."""
    if host.lower().removesuffix(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_problem(text: str) -> str | None:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        return f"{text!r} is not a URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{text!r}: expected an https:// (or http://) URL with a host"
    return None


def vault_problems(vault: VaultConfig) -> list[Problem]:
    """The rules of ``keys.vault`` (paths relative to it): auth fields per method, the
    plaintext rule for the address and the proxy, a positive timeout."""
    problems: list[Problem] = []
    auth = vault.auth
    if auth.method == "token" and auth.token_file is None:
        problems.append(
            (
                "auth.token_file",
                "is required for method token (no token is taken from the environment)",
            )
        )
    if auth.method == "approle":
        if not auth.role_id:
            problems.append(("auth.role_id", "is required for approle"))
        if auth.secret_id_file is None:
            problems.append(("auth.secret_id_file", "is required for approle"))
    if auth.method == "kubernetes" and not auth.role:
        problems.append(("auth.role", "is required for kubernetes"))
    if vault.timeout <= timedelta(0):
        problems.append(("timeout", "must be > 0"))
    bad_urls = [
        (name, problem)
        for name, url in (("address", vault.address), ("proxy", vault.proxy))
        if url is not None and (problem := _url_problem(url)) is not None
    ]
    return problems + (bad_urls or _plaintext_problems(vault))


def _plaintext_problems(vault: VaultConfig) -> list[Problem]:
    """The token crosses the network in clear only to loopback, or where the operator says so."""
    parts = urlsplit(vault.address)
    if parts.scheme != "http" or vault.allow_plaintext:
        return []
    fix = "use https://, or set keys.vault.allow_plaintext: true"
    if not is_loopback_host(parts.hostname or ""):
        return [
            (
                "address",
                f"{vault.address} would send the Vault token in clear to a host "
                f"that is not loopback: {fix}",
            )
        ]
    if vault.proxy is not None:
        return [
            (
                "proxy",
                f"the Vault token would cross the proxy in clear (the address is http://): {fix}",
            )
        ]
    return []


class KeysConfig(ConfigModel):
    source: Literal["file", "vault-kv", "vault-transit"] = "file"
    algorithm: Algorithm = "ES256"
    dir: ConfigPath | None = None
    vault: VaultConfig | None = None


class TokensConfig(ConfigModel):
    default_ttl: Duration = timedelta(minutes=5)
    max_ttl: Duration = timedelta(minutes=15)
    clock_skew: Duration = timedelta(seconds=30)


class RotationConfig(ConfigModel):
    period: Duration = timedelta(hours=24)
    prepare_ahead: Duration = timedelta(minutes=10)
    poll_interval: Duration = timedelta(seconds=10)
    # How long a retired key stays verifiable; default (and minimum) is
    # tokens.max_ttl + tokens.clock_skew + rotation.poll_interval.
    retain_retired: Duration | None = None


Count = Annotated[int, Field(ge=1)]


class LimitsConfig(ConfigModel):
    """Resource bounds (docs/operations.md "Signer limits"); defaults fit a 256 Mi pod."""

    handshake_timeout: Duration = timedelta(seconds=5)
    connection_idle: Duration = timedelta(minutes=5)
    connection_age: Duration = timedelta(hours=1)
    connection_age_grace: Duration = timedelta(seconds=30)
    tcp_connections: Count = 2048
    rpcs: Count = 1024
    streams_per_connection: Count = 256
    claims_bytes: Annotated[int, Field(ge=0, le=8192)] = 4096
    audiences: Annotated[int, Field(ge=1, le=64)] = 16
    audience_bytes: Annotated[int, Field(ge=1, le=512)] = 256
    sign_concurrency: Count = 16
    sign_queue: Annotated[int, Field(ge=0)] = 64
    watch_streams: Count = 512
    watch_streams_per_caller: Count = 128
    watch_streams_per_connection: Count = 4
    diagnostic_streams: Count = 64
    diagnostic_streams_per_caller: Count = 8


def _public_url(value: str) -> str:
    """An http(s) URL with a host and no query, fragment or credentials; kept without its
    trailing slash (``jwks_uri`` is this + ``/keys``)."""
    problem = _url_problem(value)
    if problem is not None:
        raise ValueError(problem)
    parts = urlsplit(value)
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"{value!r}: expected a URL without query, fragment or credentials")
    return value.rstrip("/")


class DiscoveryTlsConfig(ConfigModel):
    """The discovery listener's server certificate (HTTPS; no client certificates asked)."""

    cert: ConfigPath
    key: ConfigPath


class DiscoveryConfig(ConfigModel):
    """OpenID Connect discovery and the SPIFFE bundle over HTTP(S) (signer/discovery.py)."""

    listen: ListenAddress
    public_url: Annotated[str, AfterValidator(_public_url)]
    tls: DiscoveryTlsConfig | None = None
    max_connections: Count = 256


class SignerConfig(ConfigModel):
    trust_domain: TrustDomainField
    issuer: str = Field(min_length=1)
    listen: ListenConfig
    tls: TlsConfig | None = None
    authorization: AuthorizationConfig = AuthorizationConfig()
    keys: KeysConfig = KeysConfig()
    tokens: TokensConfig = TokensConfig()
    rotation: RotationConfig = RotationConfig()
    limits: LimitsConfig = LimitsConfig()
    # plain HTTP /healthz, /readyz, /metrics (loopback or pod-local; never the Internet)
    admin_listen: ListenAddress | None = None
    tracing: TracingConfig | None = None  # spans of RPCs over OTLP, parents from the caller
    discovery: DiscoveryConfig | None = None

    @property
    def td(self) -> TrustDomain:
        return parse_trust_domain(self.trust_domain)

    @property
    def retain_retired(self) -> timedelta:
        """How long a retired key stays in the JWKS after its last signature."""
        if self.rotation.retain_retired is not None:
            return self.rotation.retain_retired
        return self.minimum_retention

    @property
    def vault_timeout(self) -> timedelta:
        """How long one Vault request may take (0 for the file source)."""
        vault = self.keys.vault
        if not self.keys.source.startswith("vault-") or vault is None:
            return timedelta(0)
        return vault.timeout

    @property
    def key_propagation(self) -> timedelta:
        """The longest a new key may take to reach every replica, in any replica's clock:
        rotation.poll_interval + tokens.clock_skew + keys.vault.timeout."""
        return self.rotation.poll_interval + self.tokens.clock_skew + self.vault_timeout

    @property
    def minimum_retention(self) -> timedelta:
        return self.tokens.max_ttl + self.tokens.clock_skew + self.rotation.poll_interval

    def tcp_address(self) -> tuple[str, int] | None:
        if self.listen.tcp is None:
            return None
        return parse_host_port(self.listen.tcp, any_port=True)


def _fmt(value: timedelta) -> str:
    return format_duration(value)


def _propagation_problem(cfg: SignerConfig) -> str:
    """The extended safety rule's message: the terms by field name, with the numbers."""
    rot, terms = cfg.rotation, ["rotation.poll_interval", "tokens.clock_skew"]
    values = [rot.poll_interval, cfg.tokens.clock_skew]
    if cfg.keys.source.startswith("vault-"):
        terms.append("keys.vault.timeout")
        values.append(cfg.vault_timeout)
    return (
        f"must be >= {' + '.join(terms)} ({' + '.join(_fmt(v) for v in values)} = "
        f"{_fmt(cfg.key_propagation)}) so every replica sees a key before it signs, despite "
        f"clock skew and Vault latency (got {_fmt(rot.prepare_ahead)})"
    )


def _rules(cfg: SignerConfig) -> list[Problem]:
    """Cross-field rules, the rotation safety rule first. Returns (field path, message)."""
    problems: list[Problem] = []
    rot, tok = cfg.rotation, cfg.tokens
    if rot.poll_interval <= timedelta(0):
        problems.append(("rotation.poll_interval", "must be > 0"))
    if rot.prepare_ahead < rot.poll_interval:
        problems.append(
            (
                "rotation.prepare_ahead",
                f"must be >= rotation.poll_interval ({_fmt(rot.poll_interval)}) so every "
                f"replica sees a key before it signs (got {_fmt(rot.prepare_ahead)})",
            )
        )
    elif rot.prepare_ahead < cfg.key_propagation:
        problems.append(("rotation.prepare_ahead", _propagation_problem(cfg)))
    if rot.period <= rot.prepare_ahead:
        problems.append(
            (
                "rotation.period",
                f"must be > rotation.prepare_ahead ({_fmt(rot.prepare_ahead)}), "
                f"got {_fmt(rot.period)}",
            )
        )
    if rot.retain_retired is not None and rot.retain_retired < cfg.minimum_retention:
        problems.append(
            (
                "rotation.retain_retired",
                f"must be >= tokens.max_ttl + tokens.clock_skew + rotation.poll_interval "
                f"({_fmt(tok.max_ttl)} + {_fmt(tok.clock_skew)} + {_fmt(rot.poll_interval)} = "
                f"{_fmt(cfg.minimum_retention)}), got {_fmt(rot.retain_retired)}",
            )
        )
    if tok.max_ttl < timedelta(seconds=1):
        problems.append(("tokens.max_ttl", "must be >= 1s"))
    if not timedelta(seconds=1) <= tok.default_ttl <= tok.max_ttl:
        problems.append(
            (
                "tokens.default_ttl",
                f"must be between 1s and tokens.max_ttl ({_fmt(tok.max_ttl)}), "
                f"got {_fmt(tok.default_ttl)}",
            )
        )
    if cfg.listen.unix is None and cfg.listen.tcp is None:
        problems.append(("listen", "needs unix and/or tcp"))
    if cfg.listen.tcp is not None and cfg.tls is None:
        problems.append(("tls", "is required when listen.tcp is set (mTLS)"))
    problems += _tls_rules(cfg.tls)
    problems += _unix_mode_rule(cfg.listen.unix_mode)
    problems += _limits_rules(cfg.limits)
    keys = cfg.keys
    if keys.source == "file" and keys.dir is None:
        problems.append(("keys.dir", "is required when keys.source is file"))
    if keys.source.startswith("vault-"):
        if keys.vault is None:
            problems.append(("keys.vault", f"is required when keys.source is {keys.source}"))
        else:
            problems += [(f"keys.vault.{path}", msg) for path, msg in vault_problems(keys.vault)]
    return problems


def _unix_mode_rule(mode: int) -> list[Problem]:
    """Every caller of the socket is trusted with every RPC: the owner must be able to connect,
    a group may (0660, when configured), other users never; no setuid/setgid/sticky bits."""
    if mode & ~0o770 or (mode & 0o600) != 0o600:
        return [
            (
                "listen.unix_mode",
                f"must give the owner read/write and nothing to other users, e.g. 0600, or "
                f"0660 for a group (got {mode:04o}): every socket caller may sign and rotate",
            )
        ]
    return []


def _limits_rules(limits: LimitsConfig) -> list[Problem]:
    problems: list[Problem] = []
    for name in ("handshake_timeout", "connection_idle", "connection_age"):
        value: timedelta = getattr(limits, name)
        if value < timedelta(milliseconds=1):
            problems.append((f"limits.{name}", f"must be >= 1ms, got {_fmt(value)}"))
    if limits.watch_streams_per_caller > limits.watch_streams:
        problems.append(("limits.watch_streams_per_caller", "must be <= limits.watch_streams"))
    if limits.diagnostic_streams_per_caller > limits.diagnostic_streams:
        problems.append(
            ("limits.diagnostic_streams_per_caller", "must be <= limits.diagnostic_streams")
        )
    return problems


SIGNER_YAML = ConfigFile(SignerConfig, "signer.yaml", rules=_rules)
parse_config = SIGNER_YAML.parse  # (data, *, base_dir, source=None) -> SignerConfig
load_config = SIGNER_YAML.load  # (path) -> SignerConfig; raises svidgate.config.ConfigError
