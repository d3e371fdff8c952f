"""`svidgate pki init | issue | inspect`."""

from __future__ import annotations

import argparse
import dataclasses
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from svidgate.pki.bundle import Bundle, BundleSet, load_bundle
from svidgate.pki.ca import DEFAULT_CA_TTL, DEFAULT_SVID_TTL, CertificateAuthority, KeyType
from svidgate.pki.durations import format_duration, parse_duration
from svidgate.pki.errors import CaError, PkiError
from svidgate.pki.spiffe_id import TrustDomain, parse_spiffe_id, parse_trust_domain
from svidgate.pki.svid import (
    check_svid_profile,
    load_certificates,
    thumbprint_sha256,
    uri_sans,
    verify_x509_svid,
    x5t_s256,
)

CA_FILES = ("root.crt", "root.key", "intermediate.crt", "intermediate.key")


def register(sub: argparse._SubParsersAction[Any]) -> None:
    """Add `svidgate pki …`."""
    pki = sub.add_parser("pki", help="SPIFFE trust domains and X.509-SVIDs for dev and tests")
    cmds = pki.add_subparsers(dest="pki_command", metavar="COMMAND")
    cmds.required = True
    key_types = [k.value for k in KeyType]

    init = cmds.add_parser("init", help="create a trust domain CA, its bundle and keys")
    init.add_argument("--trust-domain", required=True, help="e.g. example.org")
    init.add_argument("--dir", required=True, type=Path, help="directory to write the CA into")
    init.add_argument("--key-type", choices=key_types, default=KeyType.EC_P256.value)
    init.add_argument("--ttl", default=format_duration(DEFAULT_CA_TTL), help="CA lifetime")
    init.add_argument("--intermediate", action="store_true", help="sign SVIDs with an intermediate")
    init.add_argument("--force", action="store_true", help="overwrite an existing CA in --dir")
    init.set_defaults(handler=cmd_init)

    issue = cmds.add_parser("issue", help="issue an X.509-SVID")
    issue.add_argument("--dir", required=True, type=Path, help="CA directory from `pki init`")
    issue.add_argument("--spiffe-id", required=True)
    issue.add_argument("--out", required=True, type=Path, help="writes OUT.crt and OUT.key")
    issue.add_argument("--dns", action="append", default=[], metavar="NAME")
    issue.add_argument("--ip", action="append", default=[], metavar="ADDR")
    issue.add_argument("--ttl", default=format_duration(DEFAULT_SVID_TTL))
    issue.add_argument("--key-type", choices=key_types, default=KeyType.EC_P256.value)
    issue.set_defaults(handler=cmd_issue)

    inspect = cmds.add_parser("inspect", help="show a certificate and check the SVID rules")
    inspect.add_argument("file", type=Path)
    inspect.add_argument("--bundle", type=Path, help="also verify the chain against this bundle")
    inspect.add_argument(
        "--trust-domain",
        help="the trust domain the --bundle belongs to (default: named by its CA certificates)",
    )
    inspect.set_defaults(handler=cmd_inspect)


def cmd_init(args: argparse.Namespace) -> int:
    td = parse_trust_domain(args.trust_domain)
    ttl = parse_duration(args.ttl)
    directory: Path = args.dir
    existing = [name for name in CA_FILES if (directory / name).exists()]
    if existing and not args.force:
        raise CaError(f"{directory / existing[0]} exists; refusing to overwrite a CA (use --force)")
    ca = CertificateAuthority.create(
        td, key_type=KeyType(args.key_type), ttl=ttl, intermediate=args.intermediate
    )
    for path in ca.save(directory):
        print(f"wrote {path}")
    print(f"trust domain {td}: root CA valid until {ca.root_cert.not_valid_after_utc:%Y-%m-%d}")
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    spiffe_id = parse_spiffe_id(args.spiffe_id, require_path=True)
    ttl = parse_duration(args.ttl)
    ca = CertificateAuthority.load(args.dir)
    svid = ca.issue(spiffe_id, dns=args.dns, ips=args.ip, ttl=ttl, key_type=KeyType(args.key_type))
    crt, key = svid.write(args.out)
    print(f"wrote {crt}")
    print(f"wrote {key}")
    print(f"{spiffe_id} valid until {svid.leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}")
    return 0


def _key_description(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    if isinstance(key, rsa.RSAPublicKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    return type(key).__name__


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _names_a_workload(cert: x509.Certificate) -> bool:
    """True when a URI SAN is a SPIFFE ID with a path: a CA certificate that claims a workload
    identity is checked (and fails) as an SVID instead of being shown as a CA."""
    for uri in uri_sans(cert):
        try:
            if not parse_spiffe_id(uri).is_trust_domain_id:
                return True
        except PkiError:
            continue
    return False


def _inspect_bundle(path: Path, trust_domain: str | None, leaf_td: TrustDomain) -> Bundle:
    """The bundle to check a leaf against, as the bundle of ITS OWN trust domain: given by
    --trust-domain or named by the bundle's CA certificates, never assumed from the leaf."""
    td = parse_trust_domain(trust_domain) if trust_domain is not None else None
    bundle = load_bundle(path, td or leaf_td)
    if td is None:
        named: set[TrustDomain] = set()
        for cert in bundle.x509_authorities:
            for uri in uri_sans(cert):
                try:
                    named.add(parse_spiffe_id(uri).trust_domain)
                except PkiError:
                    continue
        if len(named) != 1:
            raise PkiError(
                f"cannot tell which trust domain bundle {path} belongs to "
                "(its CA certificates do not name exactly one); pass --trust-domain"
            )
        bundle = dataclasses.replace(bundle, trust_domain=named.pop())
    return bundle


def cmd_inspect(args: argparse.Namespace) -> int:
    """Print what a certificate is; exit 1 when a leaf breaks the SVID rules or the chain check."""
    certs = load_certificates(args.file)
    if not certs:
        raise PkiError(f"{args.file}: no certificate found")
    leaf, intermediates = certs[0], certs[1:]
    now = datetime.now(UTC)
    status = "valid"
    if now < leaf.not_valid_before_utc:
        status = "not yet valid"
    elif now > leaf.not_valid_after_utc:
        status = "EXPIRED"
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        dns, ips = [], []
    lines = [
        ("file", str(args.file)),
        ("kind", "CA certificate" if _is_ca(leaf) else "leaf certificate"),
        ("uri_sans", ", ".join(uri_sans(leaf)) or "-"),
        ("dns_sans", ", ".join(dns) or "-"),
        ("ip_sans", ", ".join(ips) or "-"),
        ("subject", leaf.subject.rfc4514_string() or "-"),
        ("issuer", leaf.issuer.rfc4514_string() or "-"),
        ("serial", f"{leaf.serial_number:x}"),
        ("not_before", f"{leaf.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ}"),
        ("not_after", f"{leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} ({status})"),
        ("public_key", _key_description(leaf)),
        ("sha256", thumbprint_sha256(leaf).hex()),
        ("x5t#S256", x5t_s256(leaf)),
        ("chain", f"{len(certs)} certificate(s) (leaf first)"),
    ]
    ok = True
    if _is_ca(leaf) and not _names_a_workload(leaf):
        lines.append(("svid_checks", "skipped (a CA certificate, not an SVID)"))
    else:
        try:
            spiffe_id = check_svid_profile(leaf)
            lines.insert(1, ("spiffe_id", str(spiffe_id)))
            lines.append(("svid_checks", "ok"))
        except PkiError as exc:
            lines.append(("svid_checks", f"FAIL: {exc}"))
            ok = False
        if args.bundle is not None and ok:
            bundle = _inspect_bundle(args.bundle, args.trust_domain, spiffe_id.trust_domain)
            try:
                verify_x509_svid(leaf, intermediates, BundleSet.from_bundles([bundle]), now=now)
                lines.append(("chain_check", f"ok (against {args.bundle})"))
            except PkiError as exc:
                lines.append(("chain_check", f"FAIL: {exc}"))
                ok = False
    width = max(len(k) for k, _ in lines) + 1
    for key, value in lines:
        print(f"{key + ':':<{width}} {value}")
    return 0 if ok else 1
