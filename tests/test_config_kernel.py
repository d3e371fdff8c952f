"""svidgate.config: the field types, the YAML reader and the one error both services share."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, ValidationError
from svidgate.gateway.config import load_config as load_gateway
from svidgate.signer.config import load_config as load_signer

import svidgate
from svidgate.config import (
    ConfigError,
    ConfigModel,
    ConfigPath,
    Duration,
    HostPort,
    ListenAddress,
    ListOf,
    SpiffeIdField,
    SpiffePatternField,
    TrustDomainField,
    load,
    parse,
    parse_host_port,
)


class Inner(ConfigModel):
    path: ConfigPath
    wait: Duration = timedelta(seconds=1)


class Sample(ConfigModel):
    dial: HostPort | None = None
    listen: ListenAddress | None = None
    inner: Inner | None = None
    count: int = Field(default=1, ge=1)
    ids: ListOf[SpiffeIdField] = ()
    allow: ListOf[SpiffePatternField] = ()
    domains: dict[TrustDomainField, int] = Field(default_factory=dict)


def _parse(data: Any, base_dir: Path = Path("/etc/svc")) -> Sample:
    return parse(data, Sample, base_dir=base_dir, source="svc.yaml")


def _error(data: Any) -> str:
    with pytest.raises(ConfigError) as info:
        _parse(data)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("svc.yaml: ")
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8443", ("127.0.0.1", 8443)),
        ("[::1]:8443", ("::1", 8443)),
        ("[2001:db8::1]:443", ("2001:db8::1", 443)),
        ("signer.example.org:7443", ("signer.example.org", 7443)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_host_port_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(text) == expected
    assert _parse({"dial": text}).dial == text


@pytest.mark.parametrize(
    "text",
    [
        "8443",
        ":8443",
        "::1:8443",  # IPv6 without brackets is ambiguous
        "[::1]8443",
        "[not-v6]:80",
        "256.1.1.1:80",
        "1.2.3:80",
        "under_score:80",
        "-dash.example:80",
        "a..b:80",
        "host:",
        "host:65536",
        "host:-1",
        "host:+80",
        "host:\u0663",  # a non-ASCII digit
        "host:0",  # a dial target needs a real port
    ],
)
def test_host_port_refused_with_the_field(text: str) -> None:
    with pytest.raises(ValueError, match=r"HOST:PORT|IPv6|IPv4|host name"):
        parse_host_port(text)
    assert "svc.yaml: dial: " in _error({"dial": text})


def test_listen_address_allows_port_zero_but_not_more() -> None:
    assert parse_host_port("[::1]:0", any_port=True) == ("::1", 0)
    assert _parse({"listen": "127.0.0.1:0"}).listen == "127.0.0.1:0"
    assert "listen: expected HOST:PORT with a port from 0 to 65535" in _error(
        {"listen": "127.0.0.1:70000"}
    )


def test_durations() -> None:
    base = {"path": "x"}
    assert _parse({"inner": {**base, "wait": "1h30m"}}).inner == Inner(
        path=Path("/etc/svc/x"), wait=timedelta(hours=1, minutes=30)
    )
    inner = _parse({"inner": {**base, "wait": 0}}).inner
    assert inner is not None and inner.wait == timedelta(0)
    assert "inner.wait: '30 seconds' is not a duration" in _error(
        {"inner": {**base, "wait": "30 seconds"}}
    )
    assert "inner.wait: expected a Go-style duration" in _error({"inner": {**base, "wait": 30}})
    assert "inner.wait: expected a Go-style duration" in _error({"inner": {**base, "wait": True}})


def test_relative_paths_join_the_config_directory_lexically() -> None:
    def path(value: str) -> Path:
        inner = _parse({"inner": {"path": value}}, base_dir=Path("/etc/svc")).inner
        assert inner is not None
        return inner.path

    assert path("certs/a.pem") == Path("/etc/svc/certs/a.pem")
    assert path("./certs/../b.pem") == Path("/etc/svc/b.pem")
    assert path("../other/c.pem") == Path("/etc/other/c.pem")
    assert path("/abs/d.pem") == Path("/abs/d.pem")


def test_spiffe_fields_are_checked_by_pki() -> None:
    sample = _parse(
        {
            "ids": ["spiffe://example.org/a"],
            "allow": ["spiffe://example.org/ns/*"],
            "domains": {"example.org": 1},
        }
    )
    assert sample.ids == ("spiffe://example.org/a",)
    assert "ids.0: " in _error({"ids": ["spiffe://example.org"]})  # no path
    assert "allow.0: " in _error({"allow": ["spiffe://*/x"]})
    assert "domains.Not A Domain: " in _error({"domains": {"Not A Domain": 1}})


def test_every_error_is_listed_with_its_field_path() -> None:
    message = _error(
        {
            "dial": "nope",
            "count": 0,
            "inner": {"wait": "soon", "colour": "red"},
            "ids": ["spiffe://example.org/ok", "http://x/y"],
        }
    )
    for fragment in (
        "dial: expected HOST:PORT",
        "count: Input should be greater than or equal to 1",
        "inner.path: is required",
        "inner.wait: 'soon' is not a duration",
        "inner.colour: unknown key",
        "ids.1: ",
    ):
        assert fragment in message
    assert message.count("; ") == 5


def test_rules_run_after_the_schema_and_report_all_problems() -> None:
    def rules(sample: Sample) -> list[tuple[str, str]]:
        return [("count", "must be even"), ("ids", "must not be empty")]

    with pytest.raises(ConfigError) as info:
        parse({"count": 3}, Sample, base_dir=Path("/"), source="svc.yaml", rules=rules)
    assert str(info.value) == "svc.yaml: count: must be even; ids: must not be empty"
    calls: list[Sample] = []
    with pytest.raises(ConfigError, match="count: Input should be a valid integer"):
        parse({"count": "3"}, Sample, base_dir=Path("/"), source="svc.yaml", rules=calls.append)
    assert calls == []  # no rules on a document that failed the schema


def test_models_are_frozen_strict_and_closed() -> None:
    sample = _parse({"count": 2})
    with pytest.raises(ValidationError):
        sample.count = 3  # type: ignore[misc]
    assert "count: Input should be a valid integer" in _error({"count": "2"})
    assert "count: Input should be a valid integer" in _error({"count": True})
    assert "ids: Input should be a valid tuple" in _error({"ids": "spiffe://example.org/a"})
    assert "bogus: unknown key" in _error({"bogus": 1})


@pytest.mark.parametrize(
    ("data", "fragment"),
    [(None, "expected a mapping at the top level (the document is empty)"), ([1], "mapping")],
)
def test_top_level_must_be_a_mapping(data: Any, fragment: str) -> None:
    assert fragment in _error(data)


def _load_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, Sample)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


def test_yaml_problems_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text("count: 2\nids: [unclosed\n")
    assert "invalid YAML (line 3)" in _load_error(path)
    path.write_text("count: 2\ninner:\n  path: a\n  path: b\n")
    assert _load_error(path).endswith("invalid YAML (line 4): duplicate key 'path'")
    path.write_bytes(b"count: \xff\n")
    assert "cannot read config: not UTF-8 text" in _load_error(path)
    assert "cannot read config: No such file or directory" in _load_error(tmp_path / "absent")
    assert "cannot read config: Is a directory" in _load_error(tmp_path)
    path.write_text("")
    assert "expected a mapping at the top level" in _load_error(path)


def test_yaml_merge_keys_may_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "svc.yaml"
    path.write_text("inner: {<<: {path: a, wait: 1s}, wait: 2s}\n")  # a merge, not a duplicate
    sample = load(path, Sample)
    assert sample.inner == Inner(path=tmp_path / "a", wait=timedelta(seconds=2))


def test_load_resolves_against_the_file_directory(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "svc.yaml"
    path.write_text("inner: {path: run/a.sock}\n")
    here = Path.cwd()
    os.chdir(tmp_path)
    try:
        sample = load(Path("conf/svc.yaml"), Sample)
    finally:
        os.chdir(here)
    assert sample.inner is not None and sample.inner.path == tmp_path / "conf/run/a.sock"


# Both services, one rule ------------------------------------------------------------------------

GATEWAY_YAML = """
listen: 127.0.0.1:8443
tls: {cert: certs/gateway.crt, key: certs/gateway.key}
trust_domains: {example.org: {bundle: ./bundle.pem}}
signer: {address: "unix:run/signer.sock"}
"""

SIGNER_YAML = """
trust_domain: example.org
issuer: spiffe://example.org/signer
listen: {unix: run/signer.sock, tcp: "[::1]:7443"}
tls: {cert: certs/gateway.crt, key: certs/gateway.key, bundle: ./bundle.pem}
keys:
  source: vault-kv
  dir: keys
  vault:
    address: http://127.0.0.1:8200
    ca_cert: certs/../bundle.pem
    auth: {method: approle, role_id: r, secret_id_file: secret-id, token_file: token,
           jwt_file: sa/token}
"""


def _write_both(directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "gateway.yaml").write_text(GATEWAY_YAML)
    (directory / "signer.yaml").write_text(SIGNER_YAML)
    return directory / "gateway.yaml", directory / "signer.yaml"


def _check_both(conf: Path, gateway_path: Path, signer_path: Path) -> None:
    gw, sg = load_gateway(gateway_path), load_signer(signer_path)
    assert gw.signer is not None and sg.tls is not None and sg.keys.vault is not None
    assert gw.signer.address == f"unix:{conf}/run/signer.sock"
    assert sg.listen.unix == conf / "run/signer.sock"
    assert gw.tls.cert == sg.tls.cert == conf / "certs/gateway.crt"
    assert gw.tls.key == sg.tls.key == conf / "certs/gateway.key"
    assert gw.trust_domains["example.org"].bundle == sg.tls.bundle == conf / "bundle.pem"
    auth = sg.keys.vault.auth
    assert sg.keys.dir == conf / "keys"
    assert sg.keys.vault.ca_cert == conf / "bundle.pem"
    assert auth.secret_id_file == conf / "secret-id"
    assert auth.token_file == conf / "token"
    assert auth.jwt_file == conf / "sa/token"
    assert sg.tcp_address() == ("::1", 7443)


def test_both_services_resolve_relative_paths_the_same_way(tmp_path: Path) -> None:
    _check_both(tmp_path / "etc", *_write_both(tmp_path / "etc"))


def test_a_symlinked_config_directory_is_not_resolved(tmp_path: Path) -> None:
    real = tmp_path / "real"
    _write_both(real)
    (tmp_path / "conf").symlink_to(real)
    conf = tmp_path / "conf"
    _check_both(conf, conf / "gateway.yaml", conf / "signer.yaml")


def test_a_configmap_mount_keeps_following_the_mount_path(tmp_path: Path) -> None:
    """Kubernetes: conf/signer.yaml -> ..data/signer.yaml, ..data -> ..2024_01; an update swaps
    ..data. Paths must name conf/…, not the timestamped directory current at start-up."""
    conf = tmp_path / "conf"
    _write_both(conf / "..2024_01")
    (conf / "..data").symlink_to("..2024_01")
    for name in ("gateway.yaml", "signer.yaml"):
        (conf / name).symlink_to(f"..data/{name}")
    _check_both(conf, conf / "gateway.yaml", conf / "signer.yaml")


# Import hygiene ---------------------------------------------------------------------------------


def _imports_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return set(done.stdout.split())


def test_the_umbrella_package_stays_light() -> None:
    loaded = _imports_after("import svidgate")
    assert not {"pydantic", "yaml", "grpc", "aiohttp", "cryptography"} & loaded


def test_the_kernel_imports_neither_service() -> None:
    loaded = _imports_after("import svidgate.config")
    assert not {m for m in loaded if m.startswith(("svidgate.gateway", "svidgate.signer"))}


def test_the_fallback_version_matches_the_distribution() -> None:
    assert svidgate.__version__ == version("svidgate")
