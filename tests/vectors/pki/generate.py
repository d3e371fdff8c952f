"""Regenerate the X.509-SVID test vectors in this directory (byte for byte).

    python tests/vectors/pki/generate.py [--out DIR]

Everything is deterministic: keys are derived from a label (EC P-256 and Ed25519 from
SHA-256 of the label, RSA-2048 from primes found by a PRNG seeded with the label), serial
numbers are hashes of the label, validity windows are fixed dates, ECDSA signatures are
RFC 6979 deterministic, Ed25519 and RSA PKCS#1 v1.5 signatures are deterministic anyway.
Running it twice gives identical files; ``tests/pki/test_pki_vectors.py`` checks that the
committed files equal a fresh run.

The certificates are built with ``cryptography`` directly (not with ``pki.ca``) because most
of them are deliberately broken, and so that a bug in ``pki`` cannot leak into its own
test data. Tests verify them at ``NOW`` (2030-01-01T00:00:00Z), never at the wall clock.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

HERE = Path(__file__).resolve().parent

# The instant the tests verify at. Good vectors are valid for decades on both sides of it.
NOW = datetime(2030, 1, 1, tzinfo=UTC)
CA_NOT_BEFORE = datetime(2020, 1, 1, tzinfo=UTC)
CA_NOT_AFTER = datetime(2100, 1, 1, tzinfo=UTC)
LEAF_NOT_BEFORE = datetime(2025, 1, 1, tzinfo=UTC)
LEAF_NOT_AFTER = datetime(2099, 1, 1, tzinfo=UTC)
EXPIRED = (datetime(2021, 1, 1, tzinfo=UTC), datetime(2022, 1, 1, tzinfo=UTC))
NOT_YET_VALID = (datetime(2090, 1, 1, tzinfo=UTC), datetime(2091, 1, 1, tzinfo=UTC))

TD_A = "example.org"
TD_B = "other.org"
WORKLOAD = "/ns/shop/sa/orders"
UNKNOWN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.55555.1")  # private arc, no meaning
KEY_TYPES = ("ec-p256", "ed25519", "rsa-2048")

Key = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


# ---------------------------------------------------------------- deterministic keys


def _seed(label: str) -> bytes:
    return hashlib.sha256(b"svidgate test vector " + label.encode()).digest()


_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % d for d in range(2, int(p**0.5) + 1))]


def _is_probable_prime(n: int, rng: random.Random) -> bool:
    for p in _SMALL_PRIMES:
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for _ in range(40):
        x = pow(rng.randrange(2, n - 2), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _rsa_prime(rng: random.Random, bits: int, e: int) -> int:
    while True:
        candidate = rng.getrandbits(bits) | (3 << (bits - 2)) | 1
        if (candidate - 1) % e and _is_probable_prime(candidate, rng):
            return candidate


def _rsa_key(label: str) -> rsa.RSAPrivateKey:
    rng = random.Random(_seed(label))
    e = 65537
    p = _rsa_prime(rng, 1024, e)
    q = _rsa_prime(rng, 1024, e)
    if p < q:
        p, q = q, p
    d = pow(e, -1, (p - 1) * (q - 1))
    numbers = rsa.RSAPrivateNumbers(
        p=p,
        q=q,
        d=d,
        dmp1=rsa.rsa_crt_dmp1(d, p),
        dmq1=rsa.rsa_crt_dmq1(d, q),
        iqmp=rsa.rsa_crt_iqmp(p, q),
        public_numbers=rsa.RSAPublicNumbers(e, p * q),
    )
    return numbers.private_key()


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def make_key(label: str, key_type: str) -> Key:
    """The private key named ``label`` (same label, same key, every run)."""
    if key_type == "ec-p256":
        scalar = int.from_bytes(_seed(label), "big") % (_P256_ORDER - 1) + 1
        return ec.derive_private_key(scalar, ec.SECP256R1())
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(_seed(label))
    if key_type == "rsa-2048":
        return _rsa_key(label)
    raise ValueError(key_type)


def _serial(label: str) -> int:
    return int.from_bytes(_seed("serial " + label)[:16], "big") | 1


# ---------------------------------------------------------------- certificates


@dataclass
class Issuer:
    cert: x509.Certificate
    key: Key


@dataclass
class LeafSpec:
    """What a leaf looks like; the defaults are a correct X.509-SVID."""

    uris: list[str] = field(default_factory=lambda: [f"spiffe://{TD_A}{WORKLOAD}"])
    dns: list[str] = field(default_factory=list)
    ca: bool = False
    digital_signature: bool = True
    key_cert_sign: bool = False
    crl_sign: bool = False
    not_before: datetime = LEAF_NOT_BEFORE
    not_after: datetime = LEAF_NOT_AFTER
    extra: list[tuple[x509.ExtensionType, bool]] = field(default_factory=list)


def _sign(builder: x509.CertificateBuilder, key: Key) -> x509.Certificate:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return builder.sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    return builder.sign(key, hashes.SHA256())


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "svidgate test vectors"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def make_ca(
    label: str,
    trust_domain: str,
    key_type: str,
    *,
    issuer: Issuer | None = None,
    ca: bool = True,
    path_length: int | None = None,
    key_label: str | None = None,
    not_before: datetime = CA_NOT_BEFORE,
    not_after: datetime = CA_NOT_AFTER,
    extra: tuple[tuple[x509.ExtensionType, bool], ...] = (),
) -> Issuer:
    """A root (``issuer`` None) or intermediate CA of ``trust_domain``; ``ca=False`` builds the
    broken 'intermediate' that is not a CA. ``key_label`` gives a different key, same name."""
    key = make_key(key_label or label, key_type)
    subject = _name(label)
    signer = issuer if issuer is not None else Issuer(None, key)  # type: ignore[arg-type]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(_serial(label))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.key.public_key()),
            critical=False,
        )
    )
    for ext, critical in extra:
        builder = builder.add_extension(ext, critical=critical)
    return Issuer(_sign(builder, signer.key), key)


def make_leaf(label: str, issuer: Issuer, key_type: str, spec: LeafSpec) -> x509.Certificate:
    key = make_key(label, key_type)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in spec.uris]
    names += [x509.DNSName(d) for d in spec.dns]
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(_serial(label))
        .not_valid_before(spec.not_before)
        .not_valid_after(spec.not_after)
        .add_extension(x509.BasicConstraints(ca=spec.ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=spec.digital_signature,
                content_commitment=False,
                key_encipherment=isinstance(key, rsa.RSAPrivateKey),
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=spec.key_cert_sign,
                crl_sign=spec.crl_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    for ext, critical in spec.extra:
        builder = builder.add_extension(ext, critical=critical)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return _sign(builder, issuer.key)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _json_bundle(*certs: x509.Certificate, sequence: int) -> bytes:
    """A SPIFFE bundle (JWKS) written independently of ``pki.bundle``."""
    keys = []
    for cert in certs:
        pub = cert.public_key()
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        nums = pub.public_numbers()
        keys.append(
            {
                "use": "x509-svid",
                "kty": "EC",
                "crv": "P-256",
                "x": base64.urlsafe_b64encode(nums.x.to_bytes(32, "big")).rstrip(b"=").decode(),
                "y": base64.urlsafe_b64encode(nums.y.to_bytes(32, "big")).rstrip(b"=").decode(),
                "x5c": [base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()],
            }
        )
    doc = {"keys": keys, "spiffe_sequence": sequence, "spiffe_refresh_hint": 300}
    return json.dumps(doc, indent=2).encode() + b"\n"


def build() -> dict[str, bytes]:
    """File name → content for every vector."""
    files: dict[str, bytes] = {}

    # Good vectors: one root per key type; leaf directly under it, and via an intermediate.
    roots: dict[str, Issuer] = {}
    for kt in KEY_TYPES:
        suffix = "" if kt == "ec-p256" else f"-{kt}"
        root = roots[kt] = make_ca(f"root {TD_A} {kt}", TD_A, kt)
        inter = make_ca(f"intermediate {TD_A} {kt}", TD_A, kt, issuer=root, path_length=0)
        files[f"bundle-{TD_A}{suffix}.pem"] = _pem(root.cert)
        leaf = make_leaf(f"good leaf {kt}", root, kt, LeafSpec(dns=["orders.internal"]))
        files[f"good-leaf{suffix}.pem"] = _pem(leaf)
        chained = make_leaf(f"good chained leaf {kt}", inter, kt, LeafSpec())
        files[f"good-chain-intermediate{suffix}.pem"] = _pem(chained, inter.cert)
        if kt == "ec-p256":
            files[f"bundle-{TD_A}.json"] = _json_bundle(root.cert, sequence=7)

    root_b = make_ca(f"root {TD_B} ec-p256", TD_B, "ec-p256")
    files[f"bundle-{TD_B}.pem"] = _pem(root_b.cert)

    # Leaf defects (the SVID profile): all EC P-256 under example.org's root.
    broken: dict[str, LeafSpec] = {
        "wrong-leaf-ca-true.pem": LeafSpec(ca=True),
        "two-uri-sans.pem": LeafSpec(
            uris=[f"spiffe://{TD_A}{WORKLOAD}", f"spiffe://{TD_A}/ns/shop/sa/other"]
        ),
        "no-uri-san.pem": LeafSpec(uris=[], dns=["orders.internal"]),
        "expired.pem": LeafSpec(not_before=EXPIRED[0], not_after=EXPIRED[1]),
        "not-yet-valid.pem": LeafSpec(not_before=NOT_YET_VALID[0], not_after=NOT_YET_VALID[1]),
        "other-trust-domain.pem": LeafSpec(uris=[f"spiffe://{TD_B}{WORKLOAD}"]),
        "leaf-key-cert-sign.pem": LeafSpec(key_cert_sign=True),
        "leaf-crl-sign.pem": LeafSpec(crl_sign=True),
        "no-digital-signature.pem": LeafSpec(digital_signature=False),
        "uri-san-not-spiffe.pem": LeafSpec(uris=[f"https://{TD_A}{WORKLOAD}"]),
        "uri-san-trust-domain-only.pem": LeafSpec(uris=[f"spiffe://{TD_A}"]),
        "uppercase-trust-domain.pem": LeafSpec(uris=[f"spiffe://Example.org{WORKLOAD}"]),
    }
    for name, spec in broken.items():
        files[name] = _pem(make_leaf(f"leaf {name}", roots["ec-p256"], "ec-p256", spec))

    # Chain defects, for EC (cryptography's verifier) and Ed25519 (pki's own chain walk).
    for kt in ("ec-p256", "ed25519"):
        suffix = "" if kt == "ec-p256" else f"-{kt}"
        root = roots[kt]
        # Same subject name as example.org's root, a different key: in no bundle.
        rogue = make_ca(f"root {TD_A} {kt}", TD_A, kt, key_label=f"rogue root {kt}")
        leaf = make_leaf(f"leaf untrusted-ca {kt}", rogue, kt, LeafSpec())
        files[f"untrusted-ca{suffix}.pem"] = _pem(leaf)
        not_ca = make_ca(f"intermediate not ca {TD_A} {kt}", TD_A, kt, issuer=root, ca=False)
        leaf = make_leaf(f"leaf intermediate-not-ca {kt}", not_ca, kt, LeafSpec())
        files[f"intermediate-not-ca{suffix}.pem"] = _pem(leaf, not_ca.cert)
        old = make_ca(
            f"intermediate expired {TD_A} {kt}",
            TD_A,
            kt,
            issuer=root,
            path_length=0,
            not_before=EXPIRED[0],
            not_after=EXPIRED[1],
        )
        leaf = make_leaf(f"leaf intermediate-expired {kt}", old, kt, LeafSpec())
        files[f"intermediate-expired{suffix}.pem"] = _pem(leaf, old.cert)
        unknown = x509.UnrecognizedExtension(UNKNOWN_OID, b"\x05\x00")  # DER NULL
        spec = LeafSpec(extra=[(unknown, True)])
        leaf = make_leaf(f"leaf unknown-critical-extension {kt}", root, kt, spec)
        files[f"unknown-critical-extension{suffix}.pem"] = _pem(leaf)
        # A root that may only issue for other.org: its example.org leaf breaks the constraint.
        only_b = x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier(TD_B)], excluded_subtrees=None
        )
        constrained = make_ca(
            f"root {TD_A} {kt} name constrained", TD_A, kt, extra=((only_b, True),)
        )
        files[f"bundle-name-constrained{suffix}.pem"] = _pem(constrained.cert)
        leaf = make_leaf(f"leaf name-constrained {kt}", constrained, kt, LeafSpec())
        files[f"name-constraint-violated{suffix}.pem"] = _pem(leaf)
    return dict(sorted(files.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="directory (default: here)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, data in build().items():
        (args.out / name).write_bytes(data)
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
