"""`svidgate signer serve|check|sign|rotate|revoke --config signer.yaml`.

``check`` validates signer.yaml (the rotation safety rule included) and prints the key source
and the rotation plan without contacting Vault or reading a key file.

``sign``, ``rotate`` and ``revoke`` talk to the running signer over its configured Unix socket
(or, without one, over TCP with the config's TLS material as the client certificate) and fail
with one clear line when it is not running. ``sign`` prints only the JWT on stdout; when the
token lives shorter than ``--ttl`` asked (capped at ``tokens.max_ttl``), one warning line on
stderr gives the TTL it got (the exit code stays 0).
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from svidgate.signer.errors import SignerError

if TYPE_CHECKING:
    import grpc
    from svidgate.signer.config import SignerConfig

RPC_TIMEOUT = 10.0


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``signer`` with its ``serve``, ``check``, ``sign``, ``rotate`` and ``revoke``
    subcommands."""
    parser = sub.add_parser("signer", help="the JWT signer sidecar (gRPC)")
    commands = parser.add_subparsers(dest="signer_command", metavar="COMMAND")
    commands.required = True

    serve = commands.add_parser("serve", help="run the signer")
    serve.add_argument("--config", required=True, help="signer.yaml")
    serve.set_defaults(handler=_serve)

    check = commands.add_parser(
        "check", help="validate signer.yaml; print the key source and the rotation plan"
    )
    check.add_argument("--config", required=True, help="signer.yaml")
    check.set_defaults(handler=_check)

    sign = commands.add_parser("sign", help="mint a JWT with the running signer (prints it)")
    sign.add_argument("--config", required=True, help="signer.yaml")
    sign.add_argument("--subject", required=True, help="SPIFFE ID for the sub claim")
    sign.add_argument("--audience", required=True, action="append", help="aud (repeatable)")
    sign.add_argument("--ttl", help="token lifetime, e.g. 5m (default: tokens.default_ttl)")
    sign.set_defaults(handler=_sign)

    rotate = commands.add_parser("rotate", help="start a rotation now (prepared → active)")
    rotate.add_argument("--config", required=True, help="signer.yaml")
    rotate.set_defaults(handler=_rotate)

    revoke = commands.add_parser(
        "revoke", help="drop a key now (compromise): gone from the key source, the JWKS, gateways"
    )
    revoke.add_argument("--config", required=True, help="signer.yaml")
    revoke.add_argument("--kid", required=True, help="the key id to revoke")
    revoke.set_defaults(handler=_revoke)


def _serve(args: argparse.Namespace) -> int:
    from svidgate.signer.config import load_config
    from svidgate.signer.server import run

    return run(load_config(args.config))


def _check(args: argparse.Namespace) -> int:
    from svidgate.pki.durations import format_duration as fmt
    from svidgate.signer.config import load_config

    cfg = load_config(args.config)
    listen = cfg.listen
    unix = f"unix {listen.unix} (mode {listen.unix_mode:04o})" if listen.unix else "unix -"
    tcp = f"tcp {listen.tcp} (mTLS)" if listen.tcp else "tcp -"
    rot, tok = cfg.rotation, cfg.tokens
    print(f"config:    {args.config} OK")
    print(f"issuer:    {cfg.issuer} (trust domain {cfg.trust_domain})")
    print(f"listen:    {unix}; {tcp}")
    print(f"keys:      {_key_source(cfg)}, algorithm {cfg.keys.algorithm}")
    print(
        f"rotation:  period {fmt(rot.period)}, prepare_ahead {fmt(rot.prepare_ahead)}, "
        f"poll_interval {fmt(rot.poll_interval)}"
    )
    print(
        f"retention: retain_retired {fmt(cfg.retain_retired)} (at least max_ttl "
        f"{fmt(tok.max_ttl)} + clock_skew {fmt(tok.clock_skew)} + poll_interval "
        f"{fmt(rot.poll_interval)} = {fmt(cfg.minimum_retention)})"
    )
    print(
        f"tokens:    default_ttl {fmt(tok.default_ttl)}, max_ttl {fmt(tok.max_ttl)}, "
        f"clock_skew {fmt(tok.clock_skew)}"
    )
    return 0


def _key_source(cfg: SignerConfig) -> str:
    """Where the keys come from, as configured (nothing is contacted or read)."""
    keys = cfg.keys
    if keys.source == "file" or keys.vault is None:
        return f"file {keys.dir}"
    vault = keys.vault
    if keys.source == "vault-kv":
        where = f"kv {vault.kv_mount}/{vault.kv_path}"
    else:
        where = f"transit {vault.transit_mount}/{vault.transit_key}"
    namespace = f", namespace {vault.namespace}" if vault.namespace else ""
    return f"{keys.source} at {vault.address}{namespace}, {where} (auth {vault.auth.method})"


def _channel(cfg: SignerConfig) -> tuple[grpc.Channel, str]:
    import grpc

    if cfg.listen.unix is not None:
        if not cfg.listen.unix.exists():
            raise SignerError(f"the signer is not running (no socket at {cfg.listen.unix})")
        target = f"unix:{cfg.listen.unix}"
        return grpc.insecure_channel(target), target
    address = cfg.tcp_address()
    assert address is not None and cfg.tls is not None
    if cfg.tls.cert is None or cfg.tls.key is None or cfg.tls.bundle is None:
        raise SignerError("over TCP, the CLI needs tls.cert, tls.key and tls.bundle files")
    try:
        creds = grpc.ssl_channel_credentials(
            root_certificates=cfg.tls.bundle.read_bytes(),
            private_key=cfg.tls.key.read_bytes(),
            certificate_chain=cfg.tls.cert.read_bytes(),
        )
    except OSError as exc:
        raise SignerError(f"tls: cannot read {exc.filename}: {exc.strerror}") from None
    host, port = address
    target = f"{host}:{port}"
    options = [("grpc.ssl_target_name_override", "localhost")]
    return grpc.secure_channel(target, creds, options=options), target


def _call(cfg: SignerConfig, method: str, request: Any) -> Any:
    import grpc
    from svidgate.signer.v1 import signer_pb2_grpc

    channel, target = _channel(cfg)
    with channel:
        stub = signer_pb2_grpc.SignerStub(channel)  # type: ignore[no-untyped-call]
        try:
            return getattr(stub, method)(request, timeout=RPC_TIMEOUT)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            detail = (exc.details() if isinstance(exc, grpc.Call) else None) or ""
            reasons = ("signing_unavailable", "not_ready", "source_unavailable")
            if code == grpc.StatusCode.UNAVAILABLE and not detail.startswith(reasons):
                raise SignerError(f"the signer at {target} is not reachable") from None
            raise SignerError(f"{method} failed: {detail or code}") from None


def _sign(args: argparse.Namespace) -> int:
    from svidgate.pki.durations import parse_duration
    from svidgate.pki.errors import PkiError
    from svidgate.signer.config import load_config
    from svidgate.signer.v1 import signer_pb2

    cfg = load_config(args.config)
    ttl = 0
    if args.ttl:
        try:
            ttl = int(parse_duration(args.ttl).total_seconds())
        except PkiError as exc:
            raise SignerError(f"--ttl: {exc}") from None
        if ttl < 1:
            raise SignerError("--ttl: must be at least 1s")
    request = signer_pb2.SignRequest(subject=args.subject, audience=args.audience, ttl_seconds=ttl)
    reply = _call(cfg, "Sign", request)
    print(reply.token)
    if ttl:
        warning = ttl_warning(
            args.ttl, timedelta(seconds=ttl), _lifetime(reply.token), cfg.tokens.max_ttl
        )
        if warning:
            print(f"svidgate: warning: {warning}", file=sys.stderr)
    return 0


def _lifetime(token: str) -> timedelta | None:
    """``exp - iat`` of the token the signer just minted (read, not verified: only for the
    warning), or None when it does not parse."""
    from svidgate.pki.jose import b64url_decode, loads_strict

    try:
        claims = loads_strict(b64url_decode(token.split(".")[1]))
        return timedelta(seconds=int(claims["exp"]) - int(claims["iat"]))
    except (ValueError, IndexError, KeyError, TypeError):
        return None


def ttl_warning(
    asked: str, wanted: timedelta, got: timedelta | None, max_ttl: timedelta
) -> str | None:
    """One line when the token lives shorter than ``--ttl`` asked, else None."""
    from svidgate.pki.durations import format_duration as fmt

    if got is None or got >= wanted:
        return None
    why = (
        f"capped at tokens.max_ttl ({fmt(max_ttl)})"
        if wanted > max_ttl
        else "shortened to the active key's remaining verification window"
    )
    return f"--ttl {asked} {why}: the token's TTL is {fmt(got)}"


def _rotate(args: argparse.Namespace) -> int:
    from svidgate.signer.config import load_config
    from svidgate.signer.v1 import signer_pb2

    reply = _call(load_config(args.config), "Rotate", signer_pb2.RotateRequest())
    print(f"prepared {reply.prepared_kid} (active {reply.active_kid})")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    from svidgate.signer.config import load_config
    from svidgate.signer.v1 import signer_pb2

    reply = _call(load_config(args.config), "Revoke", signer_pb2.RevokeRequest(kid=args.kid))
    print(f"revoked {reply.revoked_kid} (active {reply.active_kid or '-'})")
    return 0
