"""The config kernel shared by ``gateway.yaml`` and ``signer.yaml``: field types, YAML, errors.

Each service keeps only its models and its cross-field rules; this module owns what they have in
common, so a duration, a path or an address means the same thing in both files:

- :data:`Duration`: Go-style (``250ms``, ``1h30m``, a bare ``0``), by :mod:`svidgate.pki.durations`.
- :data:`ConfigPath`: a relative path is joined to the directory of the config file and made
  absolute *without resolving symlinks* (``os.path.normpath(base / path)``). Kubernetes mounts a
  ConfigMap or Secret as ``dir/file -> ..data/file`` with ``..data -> ..2024_06_01_…``, and an
  update swaps the ``..data`` link: hot reload must keep following ``dir/file``, not pin the
  timestamped directory that was current at start-up. The config file's own directory is taken
  the same way (``os.path.abspath``, never ``resolve()``).
- :data:`SpiffeIdField`, :data:`SpiffePatternField`, :data:`TrustDomainField`: checked by
  :mod:`svidgate.pki` (the one place that knows the SPIFFE rules).
- :data:`HostPort` (a dial target, port 1-65535) and :data:`ListenAddress` (port 0-65535, 0 = any
  free port): ``HOST:PORT`` with an IPv4 address, a DNS name or ``[IPv6]``; one parser,
  :func:`parse_host_port`, returns ``(host, port)`` with the brackets removed.
- :data:`FileMode`: an octal file mode (``'0600'``, or YAML 1.1's ``0600``); :data:`ListOf`: a
  YAML list stored as a tuple.
- :class:`ConfigModel`: frozen, strict (no type coercion), unknown keys are errors.
- :func:`load` / :func:`parse`, or :class:`ConfigFile` (a model bound to its rules): safe YAML
  (duplicate keys refused), validation, then the service's rules; one :class:`ConfigError` whose
  one-line message lists *every* error with its field path:
  ``gateway.yaml: routes.0.match.path_prefix: …; listen: …``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    ValidationInfo,
)
from pydantic_core import ErrorDetails

from svidgate.pki.durations import parse_duration
from svidgate.pki.errors import PkiError
from svidgate.pki.matchers import parse_id_pattern
from svidgate.pki.spiffe_id import parse_spiffe_id, parse_trust_domain

__all__ = [
    "ConfigError",
    "ConfigFile",
    "ConfigModel",
    "ConfigPath",
    "Duration",
    "FileMode",
    "HostPort",
    "ListOf",
    "ListenAddress",
    "Problem",
    "SpiffeIdField",
    "SpiffePatternField",
    "TrustDomainField",
    "WorkloadApiConfig",
    "load",
    "parse",
    "parse_host_port",
    "resolve_path",
]


class ConfigError(Exception):
    """A config file is unreadable or invalid; ``str(err)`` is one line naming each field path."""


Problem = tuple[str, str]  # (field path, message), e.g. ("rotation.period", "must be > …")
M = TypeVar("M", bound="ConfigModel")
T = TypeVar("T")


def _duration(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value == 0:
        return timedelta(0)  # YAML reads a bare 0 as an integer
    if not isinstance(value, str):
        raise ValueError("expected a Go-style duration string such as '250ms', '30s' or '1h30m'")
    try:
        return parse_duration(value)
    except PkiError as exc:
        raise ValueError(str(exc)) from None


def resolve_path(value: str | Path, info: ValidationInfo) -> Path:
    """``value`` made absolute against the config file's directory (symlinks left alone)."""
    base = (info.context or {}).get("base_dir")
    base_dir = Path(base) if base is not None else Path.cwd()
    return Path(os.path.normpath(base_dir / value))


def _pki_checked(check: Callable[[str], object]) -> Callable[[str], str]:
    def validate(value: str) -> str:
        try:
            check(value)
        except PkiError as exc:
            raise ValueError(str(exc)) from None
        return value

    return validate


def _trust_domain(value: str) -> str:
    try:
        return parse_trust_domain(value).name
    except PkiError as exc:
        raise ValueError(str(exc)) from None


_PORT = re.compile(r"[0-9]{1,5}")
_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
_DOTTED_NUMBERS = re.compile(r"[0-9.]+")


def _check_host(host: str, text: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
    if ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:8443")
    if _DOTTED_NUMBERS.fullmatch(host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv4 address") from None
    name = host.removesuffix(".")
    if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{text!r}: {host!r} is not a host name or IP address")
    return host


def parse_host_port(text: str, *, any_port: bool = False) -> tuple[str, int]:
    """``127.0.0.1:8443`` / ``[::1]:8443`` / ``signer.local:7443`` → ``(host, port)``.

    The port is 1-65535; with ``any_port`` also 0 (bind to any free port). IPv6 hosts come back
    without brackets. Raises ValueError naming the expected form.
    """
    host, sep, port = text.rpartition(":")
    lowest = 0 if any_port else 1
    if not sep or not host or not _PORT.fullmatch(port) or not lowest <= int(port) <= 65535:
        raise ValueError(
            f"expected HOST:PORT with a port from {lowest} to 65535 (e.g. 127.0.0.1:8443 or "
            f"[::1]:8443), got {text!r}"
        )
    return _check_host(host, text), int(port)


def _mode(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise ValueError("must be an octal file mode like '0600'") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
        raise ValueError("must be an octal file mode like '0600'")
    return value


def _host_port(value: str) -> str:
    parse_host_port(value)
    return value


def _listen_address(value: str) -> str:
    parse_host_port(value, any_port=True)
    return value


Duration = Annotated[timedelta, BeforeValidator(_duration)]
ConfigPath = Annotated[Path, Strict(False), AfterValidator(resolve_path)]
SpiffeIdField = Annotated[
    str, AfterValidator(_pki_checked(lambda v: parse_spiffe_id(v, require_path=True)))
]
SpiffePatternField = Annotated[str, AfterValidator(_pki_checked(parse_id_pattern))]
TrustDomainField = Annotated[str, AfterValidator(_trust_domain)]
HostPort = Annotated[str, AfterValidator(_host_port)]
ListenAddress = Annotated[str, AfterValidator(_listen_address)]
ListOf = Annotated[tuple[T, ...], Strict(False)]  # a YAML list, stored as a tuple
FileMode = Annotated[int, BeforeValidator(_mode)]


class ConfigModel(BaseModel):
    """Base of every config model: frozen, no coercion between types, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (the last would win)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Hashable] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        if isinstance(key, Hashable):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _read_yaml(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read config: not UTF-8 text") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}: invalid YAML{where}: {problem}") from None


def _describe(err: ErrorDetails) -> Problem:
    loc = ".".join(str(part) for part in err["loc"] if part != "[key]") or "(top level)"
    if err["type"] == "extra_forbidden":
        return loc, "unknown key"
    if err["type"] == "missing":
        return loc, "is required"
    return loc, err["msg"].removeprefix("Value error, ")


def _fail(source: str, problems: Iterable[Problem]) -> ConfigError:
    return ConfigError(f"{source}: " + "; ".join(f"{path}: {msg}" for path, msg in problems))


def parse(
    data: Any,
    model: type[M],
    *,
    base_dir: Path,
    source: str,
    rules: Callable[[M], list[Problem]] | None = None,
) -> M:
    """Validate a decoded YAML document, then ``rules``; raise one :class:`ConfigError`."""
    if not isinstance(data, dict):
        empty = " (the document is empty)" if data is None else ""
        raise ConfigError(f"{source}: expected a mapping at the top level{empty}")
    try:
        cfg = model.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise _fail(source, map(_describe, exc.errors(include_url=False))) from None
    problems = rules(cfg) if rules is not None else []
    if problems:
        raise _fail(source, problems)
    return cfg


def load(
    path: str | Path, model: type[M], *, rules: Callable[[M], list[Problem]] | None = None
) -> M:
    """Read ``path`` and :func:`parse` it; relative paths resolve against its directory."""
    file = Path(path)
    base_dir = Path(os.path.abspath(file)).parent
    return parse(_read_yaml(file), model, base_dir=base_dir, source=str(file), rules=rules)


@dataclass(frozen=True, slots=True)
class ConfigFile(Generic[M]):
    """One kind of config file: its top-level model, its cross-field rules and its usual name."""

    model: type[M]
    name: str
    rules: Callable[[M], list[Problem]] | None = None

    def parse(self, data: Any, *, base_dir: Path, source: str | None = None) -> M:
        """Validate a decoded YAML document (see :func:`parse`); ``source`` defaults to the name."""
        return parse(
            data, self.model, base_dir=base_dir, source=source or self.name, rules=self.rules
        )

    def load(self, path: str | Path) -> M:
        """Read and validate the file at ``path`` (see :func:`load`)."""
        return load(path, self.model, rules=self.rules)


def _otlp_endpoint(value: str) -> str:
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ValueError("must be http://HOST:PORT (plain) or https://HOST:PORT (TLS)")
    parse_host_port(rest.rstrip("/"))
    return value


class TracingConfig(ConfigModel):
    """``tracing:`` (gateway.yaml and signer.yaml): spans exported over OTLP/gRPC to
    ``otlp_endpoint``; ``sample_ratio`` of new traces are sampled (a caller's sampled flag is
    followed). Needs the ``svidgate[otel]`` extra."""

    otlp_endpoint: Annotated[str, AfterValidator(_otlp_endpoint)]
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)


def _workload_socket(value: str | None) -> str | None:
    if value is None:
        return None
    if value.startswith("unix:") and value[len("unix:") :].startswith("/"):
        return value
    raise ValueError(f"expected unix:///ABSOLUTE/PATH (the agent's socket), got {value!r}")


class WorkloadApiConfig(ConfigModel):
    """Where the SPIFFE Workload API is (``unix:///path``; None: ``$SPIFFE_ENDPOINT_SOCKET``)
    and how long start-up waits for the first SVID and bundles (then it fails)."""

    socket: Annotated[str | None, AfterValidator(_workload_socket)] = None
    timeout: Duration = timedelta(seconds=10)
