"""signer.yaml validation: field paths in errors, the safety rule with its numbers, paths."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from svidgate.signer.config import load_config, parse_config

from svidgate.config import ConfigError

BASE: dict[str, Any] = {
    "trust_domain": "example.org",
    "issuer": "spiffe://example.org/signer",
    "listen": {"unix": "run/signer.sock"},
    "keys": {"source": "file", "algorithm": "ES256", "dir": "keys/"},
}


def cfg(**overrides: Any) -> dict[str, Any]:
    data = {**BASE}
    for dotted, value in overrides.items():
        node = data
        parts = dotted.split("__")
        for part in parts[:-1]:
            node[part] = dict(node.get(part, {}))
            node = node[part]
        node[parts[-1]] = value
    return data


def test_design_example_loads_and_resolves_paths(tmp_path: Path) -> None:
    text = """
trust_domain: example.org
issuer: spiffe://example.org/signer
listen:
  unix: run/signer.sock
  tcp: 127.0.0.1:7443
tls: {cert: signer.crt, key: signer.key, bundle: bundle.pem}
authorization:
  verify: ["spiffe://example.org/gateway"]
  sign:   ["spiffe://example.org/**"]
  rotate: ["spiffe://example.org/admin"]
keys:
  source: vault-kv
  algorithm: ES256
  dir: keys/
  vault:
    address: http://127.0.0.1:8200
    auth: {method: token, token_file: vault-token}
    kv_mount: secret
    kv_path: svidgate/signing-keys
    transit_mount: transit
    transit_key: svidgate-jwt
tokens: {default_ttl: 5m, max_ttl: 15m, clock_skew: 30s}
rotation: {period: 24h, prepare_ahead: 10m, poll_interval: 10s}
"""
    path = tmp_path / "signer.yaml"
    path.write_text(text)
    c = load_config(path)
    assert c.listen.unix == tmp_path / "run/signer.sock"
    assert c.listen.unix_mode == 0o600
    assert c.tls is not None and c.tls.bundle == tmp_path / "bundle.pem"
    assert c.keys.vault is not None and c.keys.vault.auth.token_file == tmp_path / "vault-token"
    assert c.tokens.max_ttl == timedelta(minutes=15)
    assert c.retain_retired == timedelta(minutes=15, seconds=40)
    assert c.tcp_address() == ("127.0.0.1", 7443)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"rotation__prepare_ahead": "5s"},
            "signer.yaml: rotation.prepare_ahead: must be >= rotation.poll_interval (10s)",
        ),
        (
            {"rotation__retain_retired": "10m"},
            "rotation.retain_retired: must be >= tokens.max_ttl + tokens.clock_skew + "
            "rotation.poll_interval (15m + 30s + 10s = 15m40s), got 10m",
        ),
        ({"rotation__period": "5m"}, "rotation.period: must be > rotation.prepare_ahead"),
        ({"tokens__default_ttl": "1h"}, "tokens.default_ttl: must be between 1s and"),
        ({"tokens__max_ttl": "forever"}, "signer.yaml: tokens.max_ttl: 'forever' is not a"),
        ({"listen__bogus": 1}, "signer.yaml: listen.bogus: unknown key"),
        ({"colour": "red"}, "signer.yaml: colour: unknown key"),
        ({"keys__source": "hsm"}, "signer.yaml: keys.source:"),
        ({"keys__algorithm": "HS256"}, "signer.yaml: keys.algorithm:"),
        ({"keys__dir": None}, "signer.yaml: keys.dir: is required when keys.source is file"),
        ({"listen__tcp": "127.0.0.1:7443"}, "signer.yaml: tls: is required"),
        ({"listen__unix_mode": "0999"}, "signer.yaml: listen.unix_mode: "),
        ({"authorization__sign": ["spiffe://example.org/a*"]}, "authorization.sign.0:"),
        ({"trust_domain": "Not A Domain"}, "signer.yaml: trust_domain:"),
        (
            {
                "keys__source": "vault-kv",
                "keys__vault": {"address": "http://x", "auth": {"method": "approle"}},
            },
            "signer.yaml: keys.vault.auth.role_id: is required for approle",
        ),
    ],
)
def test_errors_name_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(cfg(**overrides), base_dir=Path("/etc/svidgate"))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "signer.yaml"
    bad.write_text("trust_domain: [\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(bad)
    bad.write_text(yaml.safe_dump(["a"]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def _message(**overrides: Any) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(cfg(**overrides), base_dir=Path("/etc/svidgate"))
    message = str(info.value)
    assert "\n" not in message and message.startswith("signer.yaml: ")
    return message


def test_every_schema_error_is_reported_at_once() -> None:
    message = _message(
        tokens__max_ttl="forever",
        colour="red",
        keys__algorithm="HS256",
        listen__tcp="::1:7443",
        authorization__sign=["spiffe://example.org/a*"],
    )
    for fragment in (
        "tokens.max_ttl: 'forever' is not a duration",
        "colour: unknown key",
        "keys.algorithm: Input should be",
        "listen.tcp: ",
        "authorization.sign.0: ",
    ):
        assert fragment in message
    assert message.count("; ") == 4


def test_every_rule_violation_is_reported_at_once() -> None:
    message = _message(
        rotation__prepare_ahead="5s",
        tokens__default_ttl="1h",
        keys__dir=None,
        listen__tcp="127.0.0.1:7443",
    )
    assert message.startswith("signer.yaml: rotation.prepare_ahead: must be >= ")  # rule first
    for fragment in (
        "tokens.default_ttl: must be between 1s and",
        "keys.dir: is required when keys.source is file",
        "tls: is required when listen.tcp is set",
    ):
        assert fragment in message


@pytest.mark.parametrize(
    ("tcp", "address"),
    [
        ("[::1]:7443", ("::1", 7443)),
        ("[fd00::5]:0", ("fd00::5", 0)),
        ("signer.internal:7443", ("signer.internal", 7443)),
    ],
)
def test_tcp_listener_takes_ipv6(tcp: str, address: tuple[str, int]) -> None:
    tls = {"cert": "s.crt", "key": "s.key", "bundle": "b.pem"}
    c = parse_config(cfg(listen__tcp=tcp, tls=tls), base_dir=Path("/etc/svidgate"))
    assert c.listen.tcp == tcp
    assert c.tcp_address() == address


@pytest.mark.parametrize("tcp", ["::1:7443", "[::1]:65536", "7443", "[::1]"])
def test_bad_tcp_listener_names_the_field(tcp: str) -> None:
    assert "signer.yaml: listen.tcp: " in _message(listen__tcp=tcp)


def test_every_file_path_resolves_against_the_config_directory(tmp_path: Path) -> None:
    data = cfg(
        listen__unix="../run/./signer.sock",
        tls={"cert": "tls/s.crt", "key": "tls/s.key", "bundle": "b.pem"},
        keys__dir="./keys",
        keys__vault={
            "address": "http://127.0.0.1:8200",
            "ca_cert": "vault-ca.pem",
            "auth": {"token_file": "t", "secret_id_file": "s/id", "jwt_file": "sa/token"},
        },
    )
    path = tmp_path / "etc" / "signer.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    c = load_config(path)
    etc = tmp_path / "etc"
    assert c.listen.unix == tmp_path / "run" / "signer.sock"
    assert c.tls is not None
    assert (c.tls.cert, c.tls.key, c.tls.bundle) == (
        etc / "tls/s.crt",
        etc / "tls/s.key",
        etc / "b.pem",
    )
    assert c.keys.dir == etc / "keys"
    vault = c.keys.vault
    assert vault is not None and vault.ca_cert == etc / "vault-ca.pem"
    assert vault.auth.token_file == etc / "t"
    assert vault.auth.secret_id_file == etc / "s/id"
    assert vault.auth.jwt_file == etc / "sa/token"


def test_duplicate_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signer.yaml"
    path.write_text(yaml.safe_dump(BASE) + "issuer: spiffe://example.org/other\n")
    with pytest.raises(ConfigError, match=r"invalid YAML \(line \d+\): duplicate key 'issuer'"):
        load_config(path)


def test_values_are_not_coerced() -> None:
    assert "listen.unix_mode: must be an octal file mode" in _message(listen__unix_mode=True)
    assert "issuer: Input should be a valid string" in _message(issuer=7)
    assert "tokens.max_ttl: expected a Go-style duration" in _message(tokens__max_ttl=900)
