"""Config model: unknown keys, field paths, relative paths, durations, cross references."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from svidgate.gateway.config import load_config
from svidgate.gateway.errors import ConfigError


def _doc() -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:8443",
        "workers": 2,
        "admin_listen": "127.0.0.1:9901",
        "tls": {"cert": "gateway.crt", "key": "gateway.key", "min_version": "1.2"},
        "trust_domains": {"example.org": {"bundle": "bundle.pem"}},
        "signer": {"address": "unix:run/signer.sock", "timeout": "250ms"},
        "upstreams": {
            "orders": {
                "url": "https://127.0.0.1:9000",
                "tls": {
                    "cert": "gateway.crt",
                    "key": "gateway.key",
                    "bundle": "bundle.pem",
                    "spiffe_id": "spiffe://example.org/orders",
                },
                "timeouts": {"connect": "1s", "read": "30s"},
            }
        },
        "routes": [
            {
                "name": "orders-read",
                "match": {"path_prefix": "/orders", "methods": ["GET", "HEAD"]},
                "upstream": "orders",
                "allow": ["spiffe://example.org/ns/shop/sa/*"],
                "jwt": {
                    "required": True,
                    "audience": "orders",
                    "bind": "subject",
                    "verify": "remote",
                },
            }
        ],
        "identity_headers": {
            "xfcc": True,
            "client_cert": False,
            "claims": {"sub": "X-Svidgate-Subject"},
        },
    }


def _write(tmp_path: Path, doc: dict[str, Any]) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_documented_example_loads(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, _doc()))
    assert cfg.tls.cert == tmp_path / "gateway.crt"
    assert cfg.signer is not None
    assert cfg.signer.address == f"unix:{tmp_path}/run/signer.sock"
    assert cfg.signer.timeout == timedelta(milliseconds=250)
    assert cfg.upstreams["orders"].timeouts.read == timedelta(seconds=30)
    assert cfg.routes[0].match.methods == ("GET", "HEAD")
    assert cfg.needs_signer


def _error(tmp_path: Path, doc: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, doc))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_unknown_key_names_field(tmp_path: Path) -> None:
    doc = _doc()
    doc["routes"][0]["match"]["prefix"] = "/x"
    assert "routes.0.match.prefix: unknown key" in _error(tmp_path, doc)


def test_bad_duration_names_field(tmp_path: Path) -> None:
    doc = _doc()
    doc["upstreams"]["orders"]["timeouts"]["read"] = "30 seconds"
    assert "upstreams.orders.timeouts.read" in _error(tmp_path, doc)


def test_bad_pattern_names_field(tmp_path: Path) -> None:
    doc = _doc()
    doc["routes"][0]["allow"] = ["spiffe://example.org/ok", "spiffe://*/x"]
    assert "routes.0.allow.1" in _error(tmp_path, doc)


def test_unknown_upstream(tmp_path: Path) -> None:
    doc = _doc()
    doc["routes"][0]["upstream"] = "nope"
    assert "routes.0.upstream: unknown upstream 'nope'" in _error(tmp_path, doc)


def test_jwt_route_needs_signer(tmp_path: Path) -> None:
    doc = _doc()
    del doc["signer"]
    assert "routes.0.jwt" in _error(tmp_path, doc)


def test_bad_bind_value(tmp_path: Path) -> None:
    doc = _doc()
    doc["routes"][0]["jwt"]["bind"] = "both"
    assert "routes.0.jwt.bind" in _error(tmp_path, doc)


def test_non_canonical_prefix(tmp_path: Path) -> None:
    doc = _doc()
    doc["routes"][0]["match"]["path_prefix"] = "/a/../b"
    assert "routes.0.match.path_prefix" in _error(tmp_path, doc)


def test_bad_listen(tmp_path: Path) -> None:
    doc = _doc()
    doc["listen"] = "8443"
    assert "listen:" in _error(tmp_path, doc)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
