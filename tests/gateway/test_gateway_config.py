"""Config model: unknown keys, field paths, relative paths, durations, cross references."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from svidgate.gateway.config import load_config

from svidgate.config import ConfigError


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


def test_every_error_is_reported_with_its_field_path(tmp_path: Path) -> None:
    doc = _doc()
    doc["listen"] = "8443"
    doc["workers"] = 0
    doc["routes"][0]["match"]["path_prefix"] = "orders"
    doc["upstreams"]["orders"]["timeouts"]["read"] = "soon"
    doc["identity_headers"]["colour"] = "red"
    message = _error(tmp_path, doc)
    assert message.startswith(f"{tmp_path / 'gateway.yaml'}: ")
    for fragment in (
        "listen: expected HOST:PORT",
        "workers: Input should be greater than or equal to 1",
        "routes.0.match.path_prefix: expected a canonical path starting with '/'",
        "upstreams.orders.timeouts.read: 'soon' is not a duration",
        "identity_headers.colour: unknown key",
    ):
        assert fragment in message
    assert message.count("; ") == 4


def test_cross_references_are_all_reported(tmp_path: Path) -> None:
    doc = _doc()
    doc["routes"].append({**doc["routes"][0], "upstream": "nope"})
    doc["signer"] = {"address": "127.0.0.1:7443"}
    message = _error(tmp_path, doc)
    assert "routes.1.name: duplicate route name 'orders-read'" in message
    assert "routes.1.upstream: unknown upstream 'nope'" in message
    assert "signer.tls: a TCP signer address needs tls" in message


@pytest.mark.parametrize("address", ["[::1]:8443", "[2001:db8::10]:443", "gw.internal:8443"])
def test_listeners_take_ipv6_and_names(tmp_path: Path, address: str) -> None:
    doc = {**_doc(), "listen": address, "admin_listen": address.replace("443", "901")}
    cfg = load_config(_write(tmp_path, doc))
    assert cfg.listen == address


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("listen", "::1:8443"),
        ("admin_listen", "[::1]:65536"),
        ("admin_listen", "[zz]:9901"),
    ],
)
def test_bad_listeners_name_the_field(tmp_path: Path, field: str, value: str) -> None:
    assert f"{field}: " in _error(tmp_path, {**_doc(), field: value})


def test_signer_address_forms(tmp_path: Path) -> None:
    tls = {"cert": "gateway.crt", "key": "gateway.key", "bundle": "bundle.pem"}
    tls["spiffe_id"] = "spiffe://example.org/signer"
    doc = {**_doc(), "signer": {"address": "[::1]:7443", "tls": tls}}
    cfg = load_config(_write(tmp_path, doc))
    assert cfg.signer is not None and cfg.signer.address == "[::1]:7443"
    assert cfg.signer.tls is not None and cfg.signer.tls.bundle == tmp_path / "bundle.pem"
    doc["signer"] = {"address": "127.0.0.1:0", "tls": tls}  # a dial target needs a real port
    assert "signer.address: expected HOST:PORT with a port from 1 to 65535" in _error(tmp_path, doc)
    doc["signer"] = {"address": "unix:"}
    assert "signer.address: expected unix:PATH with a non-empty path" in _error(tmp_path, doc)


def test_unix_signer_socket_is_resolved_like_every_path(tmp_path: Path) -> None:
    doc = {**_doc(), "signer": {"address": "unix:../run/./signer.sock"}}
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    cfg = load_config(path)
    assert cfg.signer is not None and cfg.signer.address == f"unix:{tmp_path}/run/signer.sock"
    assert cfg.tls.cert == tmp_path / "etc" / "gateway.crt"


def test_values_are_not_coerced(tmp_path: Path) -> None:
    assert "workers: Input should be a valid integer" in _error(
        tmp_path, {**_doc(), "workers": "2"}
    )
    doc = _doc()
    doc["identity_headers"]["xfcc"] = "yes please"
    assert "identity_headers.xfcc: Input should be a valid boolean" in _error(tmp_path, doc)


def test_min_version_written_as_a_number(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_doc()).replace("min_version: '1.2'", "min_version: 1.3"))
    assert load_config(path).tls.min_version == "1.3"


def test_trust_domain_keys_are_checked(tmp_path: Path) -> None:
    doc = {**_doc(), "trust_domains": {"Example.ORG": {"bundle": "b.pem"}}}
    assert "trust_domains.Example.ORG: " in _error(tmp_path, doc)


def test_duplicate_yaml_key_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, _doc())
    path.write_text(path.read_text() + "workers: 3\n")
    with pytest.raises(ConfigError, match=r"invalid YAML \(line \d+\): duplicate key 'workers'"):
        load_config(path)


def test_tracing_keys(tmp_path: Path) -> None:
    tracing = {"otlp_endpoint": "http://127.0.0.1:4317", "sample_ratio": 0.25}
    cfg = load_config(_write(tmp_path, {**_doc(), "tracing": tracing}))
    assert cfg.tracing is not None and cfg.tracing.sample_ratio == 0.25
    assert load_config(_write(tmp_path, _doc())).tracing is None  # off by default
    bad_endpoint = {"otlp_endpoint": "127.0.0.1:4317"}
    assert "tracing.otlp_endpoint: " in _error(tmp_path, {**_doc(), "tracing": bad_endpoint})
    bad_ratio = {**tracing, "sample_ratio": 1.5}
    assert "tracing.sample_ratio: " in _error(tmp_path, {**_doc(), "tracing": bad_ratio})
