"""signer.yaml: one frozen, typed model, validated once at start-up.

Every error names its field path (``signer.yaml: rotation.prepare_ahead: …``). Relative paths,
the Unix socket included, are resolved against the directory of the config file. The rotation
safety rule is checked here, with the numbers in the message, so a signer that could drop a
verifiable token never starts. The environment is read in one place: :func:`environment_token`.
"""

from __future__ import annotations

import os
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
)
from svidgate.pki.durations import format_duration, parse_duration
from svidgate.pki.errors import PkiError
from svidgate.pki.matchers import IdMatcher, parse_id_pattern
from svidgate.pki.spiffe_id import TrustDomain, parse_trust_domain
from svidgate.signer.errors import ConfigError

VAULT_TOKEN_ENV = "VAULT_TOKEN"  # noqa: S105 (a variable name, not a secret)


def environment_token() -> str | None:
    """The Vault token from the environment (the only place the signer reads os.environ)."""
    value = os.environ.get(VAULT_TOKEN_ENV, "").strip()
    return value or None


def _duration(value: Any) -> timedelta:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int) and value == 0:
        return timedelta(0)
    try:
        return parse_duration(value)
    except PkiError as exc:
        raise ValueError(str(exc)) from None


def _resolve(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if base is not None and not value.is_absolute():
        return Path(base) / value
    return value


def _pattern(value: str) -> str:
    try:
        parse_id_pattern(value)
    except PkiError as exc:
        raise ValueError(str(exc)) from None
    return value


def _mode(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError("must be an octal file mode like '0600'") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
        raise ValueError("must be an octal file mode like '0600'")
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]
ConfigPath = Annotated[Path, AfterValidator(_resolve)]
Pattern = Annotated[str, AfterValidator(_pattern)]
FileMode = Annotated[int, BeforeValidator(_mode)]
Algorithm = Literal["EdDSA", "ES256", "RS256", "PS256"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Model):
    unix: ConfigPath | None = None
    unix_mode: FileMode = 0o600
    tcp: str | None = None


class TlsConfig(_Model):
    cert: ConfigPath
    key: ConfigPath
    bundle: ConfigPath


class AuthorizationConfig(_Model):
    verify: tuple[Pattern, ...] = ()
    sign: tuple[Pattern, ...] = ()
    rotate: tuple[Pattern, ...] = ()
    # Callers (over TCP) that may mint tokens for a subject other than themselves; the subject
    # must still match `sign`.
    sign_for_others: tuple[Pattern, ...] = ()

    def matcher(self, rpc: Literal["verify", "sign", "rotate", "sign_for_others"]) -> IdMatcher:
        return IdMatcher.parse(getattr(self, rpc))


class VaultAuthConfig(_Model):
    method: Literal["token", "approle", "kubernetes"] = "token"
    token_file: ConfigPath | None = None
    role_id: str | None = None
    secret_id_file: ConfigPath | None = None
    role: str | None = None
    jwt_file: ConfigPath = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
    mount: str | None = None  # auth mount path; defaults to the method name


class VaultConfig(_Model):
    address: str
    auth: VaultAuthConfig = VaultAuthConfig()
    namespace: str | None = None
    ca_cert: ConfigPath | None = None
    timeout: Duration = timedelta(seconds=5)
    kv_mount: str = "secret"
    kv_path: str = "svidgate/signing-keys"
    transit_mount: str = "transit"
    transit_key: str = "svidgate-jwt"


class KeysConfig(_Model):
    source: Literal["file", "vault-kv", "vault-transit"] = "file"
    algorithm: Algorithm = "ES256"
    dir: ConfigPath | None = None
    vault: VaultConfig | None = None


class TokensConfig(_Model):
    default_ttl: Duration = timedelta(minutes=5)
    max_ttl: Duration = timedelta(minutes=15)
    clock_skew: Duration = timedelta(seconds=30)


class RotationConfig(_Model):
    period: Duration = timedelta(hours=24)
    prepare_ahead: Duration = timedelta(minutes=10)
    poll_interval: Duration = timedelta(seconds=10)
    # How long a retired key stays verifiable; default (and minimum) is
    # tokens.max_ttl + tokens.clock_skew + rotation.poll_interval.
    retain_retired: Duration | None = None


class SignerConfig(_Model):
    trust_domain: str
    issuer: str = Field(min_length=1)
    listen: ListenConfig
    tls: TlsConfig | None = None
    authorization: AuthorizationConfig = AuthorizationConfig()
    keys: KeysConfig = KeysConfig()
    tokens: TokensConfig = TokensConfig()
    rotation: RotationConfig = RotationConfig()

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
    def minimum_retention(self) -> timedelta:
        return self.tokens.max_ttl + self.tokens.clock_skew + self.rotation.poll_interval

    def tcp_address(self) -> tuple[str, int] | None:
        if self.listen.tcp is None:
            return None
        return parse_host_port(self.listen.tcp)


def parse_host_port(text: str) -> tuple[str, int]:
    """``127.0.0.1:7443`` / ``[::1]:7443`` → (host, port); port 0 = any free port."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def _fmt(value: timedelta) -> str:
    return format_duration(value)


def _rules(cfg: SignerConfig) -> list[tuple[str, str]]:
    """Cross-field rules, the rotation safety rule first. Returns (field path, message)."""
    problems: list[tuple[str, str]] = []
    rot, tok = cfg.rotation, cfg.tokens
    try:
        parse_trust_domain(cfg.trust_domain)
    except PkiError as exc:
        problems.append(("trust_domain", str(exc)))
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
    if cfg.listen.tcp is not None:
        try:
            parse_host_port(cfg.listen.tcp)
        except ValueError as exc:
            problems.append(("listen.tcp", str(exc)))
        if cfg.tls is None:
            problems.append(("tls", "is required when listen.tcp is set (mTLS)"))
    keys = cfg.keys
    if keys.source == "file" and keys.dir is None:
        problems.append(("keys.dir", "is required when keys.source is file"))
    if keys.source.startswith("vault-"):
        if keys.vault is None:
            problems.append(("keys.vault", f"is required when keys.source is {keys.source}"))
        else:
            auth = keys.vault.auth
            if auth.method == "approle":
                if not auth.role_id:
                    problems.append(("keys.vault.auth.role_id", "is required for approle"))
                if auth.secret_id_file is None:
                    problems.append(("keys.vault.auth.secret_id_file", "is required for approle"))
            if auth.method == "kubernetes" and not auth.role:
                problems.append(("keys.vault.auth.role", "is required for kubernetes"))
    return problems


def parse_config(data: Any, *, base_dir: Path, name: str = "signer.yaml") -> SignerConfig:
    """Validate a decoded YAML document; raises :class:`ConfigError` naming the field path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: must be a mapping at the top level")
    try:
        cfg = SignerConfig.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        err = exc.errors()[0]
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "is required"
        raise ConfigError(f"{name}: {path}: {msg}") from None
    problems = _rules(cfg)
    if problems:
        path, msg = problems[0]
        raise ConfigError(f"{name}: {path}: {msg}")
    return cfg


def load_config(path: str | Path) -> SignerConfig:
    """Read and validate signer.yaml; relative paths resolve against its directory."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: invalid YAML: {str(exc).splitlines()[0]}") from None
    return parse_config(data, base_dir=file.resolve().parent, name=str(file))
