"""Private nginx instances for the benchmark: the shared upstream and the mTLS reference proxy.

Each instance has its own prefix directory, config, pid file and logs under the run's work
directory; the system nginx (/etc/nginx) is never read or touched.
"""

from __future__ import annotations

from pathlib import Path

from bench.procs import Service, pinned

BODY = "ok\n"

_COMMON = """\
daemon off;
master_process on;
worker_processes {workers};
worker_rlimit_nofile 16384;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    default_type text/plain;
    server_tokens off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    keepalive_requests 100000000;
    keepalive_timeout 300s;
{body}
}}
"""

_UPSTREAM = """\
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{ return 200 "{body}"; }}
    }}
"""

# The reference: TLS 1.3 only, ECDSA P-256 certificate, client certificate required and verified
# against the trust bundle, no session resumption (the gateway refuses it too), keep-alive pool
# to the upstream. It forwards the client certificate's fingerprint so that it does a little
# identity work per request, as the gateway does with XFCC.
_PROXY = """\
    upstream bench_upstream {{
        server 127.0.0.1:{upstream_port};
        keepalive 256;
        keepalive_requests 100000000;
    }}
    server {{
        listen 127.0.0.1:{port} ssl reuseport backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_client_certificate {bundle};
        ssl_verify_client on;
        ssl_verify_depth 3;
        ssl_protocols TLSv1.3;
        ssl_ecdh_curve X25519:prime256v1;
        ssl_session_tickets off;
        ssl_session_cache off;
        location / {{
            proxy_pass http://bench_upstream;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Client-Cert-Sha1 $ssl_client_fingerprint;
        }}
    }}
"""


def _write(prefix: Path, workers: int, body: str) -> Path:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "tmp").mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(_COMMON.format(workers=workers, prefix=prefix, body=body))
    return conf


def write_upstream_conf(prefix: Path, *, port: int, workers: int = 1) -> Path:
    body = _UPSTREAM.format(port=port, body=BODY.replace("\n", "\\n"))
    return _write(prefix, workers, body)


def write_proxy_conf(
    prefix: Path,
    *,
    port: int,
    upstream_port: int,
    workers: int,
    cert: Path,
    key: Path,
    bundle: Path,
) -> Path:
    body = _PROXY.format(
        port=port,
        upstream_port=upstream_port,
        cert=cert,
        key=key,
        bundle=bundle,
    )
    return _write(prefix, workers, body)


def start(name: str, prefix: Path, conf: Path, *, cpus: str, port: int) -> Service:
    # `-e` keeps nginx from opening the system error log before it reads our config.
    cmd = ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    check = Service.start(f"{name} (config test)", [*cmd, "-t", "-q"], log=prefix / "test.log")
    if check.proc.wait(timeout=30) != 0:
        raise_from_log(name, check)
    svc = Service.start(name, pinned(cmd, cpus), log=prefix / "stdout.log")
    svc.wait_port(port)
    return svc


def raise_from_log(name: str, svc: Service) -> None:
    from bench.procs import BenchError

    raise BenchError(f"{name}: nginx rejected its config:\n{svc.tail()}")
