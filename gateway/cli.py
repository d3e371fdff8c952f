"""`svidgate gateway serve|check|explain`.

``check`` loads the config and every file it names (certificates, keys, bundles) and prints the
route table; ``check --offline`` validates the schema and the policy only and reads no other file,
for a CI job or an image build that has the config but not the secrets.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from svidgate.gateway.config import GatewayConfig

EXIT_DENIED = 3


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add ``gateway`` with its ``serve``, ``check`` and ``explain`` subcommands."""
    gateway = sub.add_parser("gateway", help="the mTLS identity gateway")
    cmds = gateway.add_subparsers(dest="gateway_command", metavar="COMMAND")
    cmds.required = True

    serve = cmds.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, type=Path, help="gateway.yaml")
    serve.set_defaults(handler=_serve)

    check = cmds.add_parser("check", help="validate config, credentials and policy")
    check.add_argument("--config", required=True, type=Path, help="gateway.yaml")
    check.add_argument(
        "--offline",
        action="store_true",
        help="schema and policy only: read no certificate, key or bundle",
    )
    check.set_defaults(handler=_check)

    explain = cmds.add_parser(
        "explain", help="show which route and rule allow or deny a request (exit 3 = denied)"
    )
    explain.add_argument("--config", required=True, type=Path, help="gateway.yaml")
    explain.add_argument("--spiffe-id", required=True, help="the caller's SPIFFE ID")
    explain.add_argument("--method", default="GET", help="HTTP method (default GET)")
    explain.add_argument("--path", required=True, help="request target, e.g. /orders/1?x=y")
    explain.set_defaults(handler=_explain)


def _serve(args: argparse.Namespace) -> int:
    from svidgate.gateway.server import run

    return run(args.config)


def _check(args: argparse.Namespace) -> int:
    if args.offline:
        return _check_offline(args.config)
    from svidgate.gateway.credentials import StateHolder

    holder = StateHolder(args.config)  # with the Workload API: fetches the SVID, then closes
    holder.close()
    state = holder.current
    print(f"config:        {state.config_path} OK")
    print(
        f"gateway id:    {state.gateway_id} (certificate valid until "
        f"{state.cert_not_after:%Y-%m-%dT%H:%M:%SZ})"
    )
    print(f"trust domains: {', '.join(str(td) for td in state.bundles.trust_domains())}")
    _print_routes(state.config)
    return 0


def _check_offline(path: Path) -> int:
    from svidgate.gateway.config import load_config
    from svidgate.gateway.policy import Policy

    cfg = load_config(path)
    Policy.from_config(cfg)
    print(f"config:        {path} OK (offline: certificates, keys and bundles not read)")
    print(f"trust domains: {', '.join(cfg.trust_domains)}")
    _print_routes(cfg)
    return 0


def _print_routes(cfg: GatewayConfig) -> None:
    """Listeners, signer, other JWT issuers and the route table with each route's allow list
    and JWT rule."""
    from svidgate.gateway.config import SIGNER_ISSUER
    from svidgate.pki.durations import format_duration

    print(f"listen:        {cfg.listen} (workers {cfg.workers}); admin {cfg.admin_listen or '-'}")
    if cfg.signer is not None:
        print(
            f"signer:        {cfg.signer.address} (timeout {format_duration(cfg.signer.timeout)})"
        )
    for name, issuer in cfg.jwt_issuers.items():
        bundle = issuer.bundle
        socket = bundle.socket or "$SPIFFE_ENDPOINT_SOCKET"
        where = bundle.url or (str(bundle.file) if bundle.file else f"workload_api {socket}")
        iss = f", iss {issuer.issuer}" if issuer.issuer else ""
        print(f"jwt issuer:    {name}: {issuer.trust_domain} from {where}{iss}")
    print(f"routes ({len(cfg.routes)}):")
    for route in cfg.routes:
        methods = ",".join(route.match.methods) if route.match.methods else "*"
        upstream = cfg.upstreams[route.upstream]
        ci = route.match.case_insensitive_prefix
        if ci is None:
            ci = cfg.routing.case_insensitive_prefix
        prefix = route.match.path_prefix + (" (any case)" if ci else "")
        print(f"  {route.name}: {methods} {prefix} -> {route.upstream} ({upstream.url})")
        if route.allow:
            for pattern in route.allow:
                print(f"      allow {pattern}")
        else:
            print("      allow (nobody: empty allow list)")
        if route.jwt is not None and route.jwt.required:
            issuers = route.jwt.issuers
            print(
                f"      jwt audience={route.jwt.audience} bind={route.jwt.bind} "
                f"verify={route.jwt.verify}"
                + (f" issuers={','.join(issuers)}" if issuers != (SIGNER_ISSUER,) else "")
            )
        elif route.forward_authorization:
            print("      authorization: Bearer tokens forwarded unverified")


def _explain(args: argparse.Namespace) -> int:
    from svidgate.gateway.config import load_config
    from svidgate.gateway.errors import GatewayError
    from svidgate.gateway.policy import Policy
    from svidgate.gateway.routes import parse_target
    from svidgate.pki.spiffe_id import parse_spiffe_id

    cfg = load_config(args.config)
    spiffe_id = parse_spiffe_id(args.spiffe_id, require_path=True)
    method = args.method.upper()
    print(f"identity: {spiffe_id}")
    try:
        target = parse_target(args.path)
    except GatewayError as exc:
        print(f"request:  {method} {args.path}")
        print(f"decision: DENY (400 {exc})")
        return EXIT_DENIED
    print(f"request:  {method} {args.path} (canonical path {target.path})")
    policy = Policy.from_config(cfg)
    decision = policy.explain(spiffe_id, method, target.path)
    route = decision.route
    if route is None:
        print("route:    none matches")
        print("decision: DENY (404 no_route)")
        return EXIT_DENIED
    rc = cfg.routes[route.index]
    methods = ",".join(rc.match.methods) if rc.match.methods else "*"
    case = " in any case" if route.case_insensitive else ""
    print(
        f"route:    {route.name} (path_prefix {route.prefix}{case}, methods {methods}, "
        f"upstream {route.upstream})"
    )
    if decision.allowed:
        print(f"decision: ALLOW by rule {decision.rule}")
        if route.jwt is not None:
            print(
                f"then:     JWT required (audience {route.jwt.audience}, bind "
                f"{route.jwt.bind}, verify {route.jwt.verify})"
            )
        elif route.forward_authorization:
            print("then:     Authorization: Bearer forwarded unverified (forward_authorization)")
        return 0
    if decision.reason == "method_not_allowed":
        print(f"decision: DENY (403 method_not_allowed: {method} is not in {methods})")
    else:
        listed = ", ".join(rc.allow) or "nobody"
        print(f"decision: DENY (403 identity_not_allowed: no rule matches; allowed: {listed})")
    return EXIT_DENIED
