"""Admin listener (/healthz, /readyz, /metrics) and the `svidgate gateway check|explain` CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from gateway_harness import (
    OPS_ID,
    WEB_ID,
    Echo,
    Harness,
    LabPki,
    gateway_config,
    write_config,
)

SVIDGATE = [sys.executable, "-m", "svidgate.cli"]


async def _get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}{path}") as resp,
    ):
        return resp.status, await resp.text()


async def test_healthz_readyz_metrics(gw: Harness, echo: Echo) -> None:
    assert (await _get(gw.server.admin_port, "/healthz"))[0] == 200
    status, body = await _get(gw.server.admin_port, "/readyz")
    assert status == 200 and '"ready"' in body
    await gw.request("GET", "/orders/1")
    await gw.request("GET", "/admin/1")
    status, text = await _get(gw.server.admin_port, "/metrics")
    assert status == 200
    ok = 'svidgate_gateway_requests_total{code="200",method="GET",route="orders-read"} 1.0'
    assert ok in text
    assert 'svidgate_gateway_requests_total{code="403",method="GET",route="admin"} 1.0' in text
    assert (
        'svidgate_gateway_decisions_total{decision="deny",reason="identity_not_allowed"} 1.0'
        in text
    )
    assert 'svidgate_gateway_upstream_seconds_count{upstream="echo"} 1.0' in text
    assert "svidgate_gateway_certificate_expiry_timestamp_seconds" in text


async def test_readyz_503_while_draining(gw: Harness, echo: Echo) -> None:
    gw.server.app.draining = True
    status, body = await _get(gw.server.admin_port, "/readyz")
    assert status == 503 and "draining" in body


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SVIDGATE, *args], check=False, capture_output=True, text=True, timeout=60
    )


def _config(test_pki: LabPki) -> Path:
    return write_config(test_pki, gateway_config(test_pki, 9))


def test_check_prints_route_table(test_pki: LabPki) -> None:
    result = _cli("gateway", "check", "--config", str(_config(test_pki)))
    assert result.returncode == 0, result.stderr
    assert "gateway id:    spiffe://example.org/gateway" in result.stdout
    assert "orders-read: GET,HEAD /orders -> echo" in result.stdout
    assert "allow spiffe://example.org/ns/shop/sa/*" in result.stdout


def test_explain_allow(test_pki: LabPki) -> None:
    result = _cli(
        "gateway", "explain", "--config", str(_config(test_pki)),
        "--spiffe-id", WEB_ID, "--method", "GET", "--path", "/orders/./1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "canonical path /orders/1" in result.stdout
    assert "route:    orders-read" in result.stdout
    assert "ALLOW by rule spiffe://example.org/ns/shop/sa/*" in result.stdout


def test_explain_deny_identity(test_pki: LabPki) -> None:
    result = _cli(
        "gateway", "explain", "--config", str(_config(test_pki)),
        "--spiffe-id", WEB_ID, "--path", "/admin/x",
    )  # fmt: skip
    assert result.returncode == 3
    assert "DENY (403 identity_not_allowed" in result.stdout
    assert "spiffe://example.org/ops/**" in result.stdout


def test_explain_deny_method(test_pki: LabPki) -> None:
    result = _cli(
        "gateway", "explain", "--config", str(_config(test_pki)),
        "--spiffe-id", OPS_ID, "--method", "delete", "--path", "/orders/1",
    )  # fmt: skip
    assert result.returncode == 3
    assert "DENY (403 method_not_allowed: DELETE is not in GET,HEAD)" in result.stdout


def test_explain_bad_path(test_pki: LabPki) -> None:
    result = _cli(
        "gateway", "explain", "--config", str(_config(test_pki)),
        "--spiffe-id", WEB_ID, "--path", "/x%2F..%2Fadmin",
    )  # fmt: skip
    assert result.returncode == 3
    assert "DENY (400 bad_path" in result.stdout


def test_explain_bad_spiffe_id_one_line(test_pki: LabPki) -> None:
    result = _cli(
        "gateway", "explain", "--config", str(_config(test_pki)),
        "--spiffe-id", "spiffe://Example.org/x", "--path", "/",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("svidgate: error:")


def test_bad_config_one_stderr_line_naming_field(test_pki: LabPki) -> None:
    doc = gateway_config(test_pki, 9)
    doc["routes"][1]["match"]["methods"] = ["GET", "NOT A METHOD"]
    path = test_pki.dir / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    for command in ("check", "serve"):
        result = _cli("gateway", command, "--config", str(path))
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1, result.stderr
        assert "routes.1.match.methods" in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_certificate_one_line(test_pki: LabPki) -> None:
    doc = gateway_config(test_pki, 9)
    doc["tls"]["cert"] = "absent.crt"
    path = test_pki.dir / "missing.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = _cli("gateway", "check", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "absent.crt" in result.stderr


def test_check_offline_reads_no_certificate_key_or_bundle(tmp_path: Path) -> None:
    """The config names files that do not exist: --offline validates schema and policy only."""
    doc = gateway_config_without_files()
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = _cli("gateway", "check", "--offline", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"config:        {path} OK (offline: certificates, keys and bundles not read)"
    )
    assert "trust domains: example.org" in lines
    assert "listen:        [::1]:8443 (workers 1); admin 127.0.0.1:9901" in lines
    assert "  orders-read: GET,HEAD /orders -> echo (https://127.0.0.1:9000)" in lines
    assert "      allow spiffe://example.org/ns/shop/sa/*" in lines
    assert "      jwt audience=orders bind=subject verify=remote" in lines
    # the same file without --offline fails on the first missing file it reads
    online = _cli("gateway", "check", "--config", str(path))
    assert online.returncode == 2
    assert online.stderr.count("\n") == 1 and "cannot read bundle" in online.stderr


def test_check_offline_still_names_bad_fields(tmp_path: Path) -> None:
    doc = gateway_config_without_files()
    doc["routes"][0]["allow"] = ["spiffe://*/x"]
    doc["listen"] = "8443"
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = _cli("gateway", "check", "--offline", "--config", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"svidgate: error: {path}: ")
    assert "routes.0.allow.0: " in lines[0] and "listen: expected HOST:PORT" in lines[0]


def gateway_config_without_files() -> dict[str, Any]:
    return {
        "listen": "[::1]:8443",
        "admin_listen": "127.0.0.1:9901",
        "tls": {"cert": "no-such-gateway.crt", "key": "no-such-gateway.key"},
        "trust_domains": {"example.org": {"bundle": "/nonexistent/bundle.pem"}},
        "signer": {"address": "unix:run/signer.sock"},
        "upstreams": {
            "echo": {
                "url": "https://127.0.0.1:9000",
                "tls": {"bundle": "absent.pem", "spiffe_id": "spiffe://example.org/echo"},
            }
        },
        "routes": [
            {
                "name": "orders-read",
                "match": {"path_prefix": "/orders", "methods": ["GET", "HEAD"]},
                "upstream": "echo",
                "allow": ["spiffe://example.org/ns/shop/sa/*"],
                "jwt": {"audience": "orders"},
            }
        ],
    }
