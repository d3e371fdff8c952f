"""signer.yaml validation: field paths in errors, the safety rule with its numbers, paths."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from svidgate.signer.config import load_config, parse_config
from svidgate.signer.errors import ConfigError

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
