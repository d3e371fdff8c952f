"""The demo echo upstream of `svidgate up`: an mTLS aiohttp server that answers every request
with the identity it received (the caller's certificate and the identity headers), as JSON.

It only serves callers whose SVID carries an allowed SPIFFE ID (the gateway), so the demo also
shows the gateway → upstream leg of zero trust. Run: ``python -m svidgate.demo_upstream``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Headers an upstream behind svidgate learns the caller from (lower-case).
IDENTITY_HEADERS = ("x-forwarded-client-cert", "client-cert", "x-spiffe-id")
CLAIM_HEADER_PREFIX = "x-svidgate-"


def server_context(cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    """TLS ≥ 1.2 server context that requires a client certificate chaining to ``bundle``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(str(cert), str(key))
    ctx.load_verify_locations(cafile=str(bundle))
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


def peer_spiffe_id(peercert: dict[str, Any] | None) -> str | None:
    """The single ``spiffe://`` URI SAN of a verified peer (``None`` if absent or ambiguous)."""
    if not peercert:
        return None
    uris = [v for k, v in peercert.get("subjectAltName", ()) if k == "URI"]
    if len(uris) != 1 or not uris[0].startswith("spiffe://"):
        return None
    return str(uris[0])


def build_app(name: str, allow: Sequence[str]) -> Any:
    from aiohttp import web

    async def echo(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        ssl_obj = transport.get_extra_info("ssl_object") if transport is not None else None
        peer = peer_spiffe_id(ssl_obj.getpeercert() if ssl_obj is not None else None)
        if peer is None or (allow and peer not in allow):
            return web.json_response(
                {"error": "forbidden", "upstream": name, "peer": peer}, status=403
            )
        headers = {
            k.lower(): v
            for k, v in request.headers.items()
            if k.lower() in IDENTITY_HEADERS or k.lower().startswith(CLAIM_HEADER_PREFIX)
        }
        body = await request.read()
        return web.json_response(
            {
                "upstream": name,
                "peer": peer,
                "method": request.method,
                "path": request.raw_path,
                "identity_headers": headers,
                "authorization_forwarded": "authorization" in {k.lower() for k in request.headers},
                "body_bytes": len(body),
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def serve(host: str, port: int, ctx: ssl.SSLContext, app: Any) -> None:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ctx, reuse_address=True)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"demo upstream listening on https://{host}:{port}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="svidgate-demo-upstream", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:9000", help="HOST:PORT")
    parser.add_argument("--cert", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--name", default="echo")
    parser.add_argument(
        "--allow", action="append", default=[], help="allowed caller SPIFFE ID (repeatable)"
    )
    args = parser.parse_args(argv)
    host, _, port = str(args.listen).rpartition(":")
    ctx = server_context(args.cert, args.key, args.bundle)
    app = build_app(args.name, tuple(args.allow))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(host.strip("[]"), int(port), ctx, app))
    return 0


if __name__ == "__main__":
    sys.exit(main())
