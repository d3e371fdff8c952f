"""A small SPIFFE CA for development and tests: a root (and optional intermediate) per trust
domain that issues X.509-SVIDs."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from svidgate.pki.bundle import Bundle, marshal_json, marshal_pem
from svidgate.pki.durations import format_duration
from svidgate.pki.errors import CaError, InvalidSpiffeIdError, PkiError
from svidgate.pki.spiffe_id import SpiffeId, TrustDomain, parse_spiffe_id, parse_trust_domain
from svidgate.pki.svid import load_certificates, load_private_key, uri_sans

DEFAULT_CA_TTL = timedelta(days=365)
DEFAULT_SVID_TTL = timedelta(hours=1)
BACKDATE = timedelta(minutes=1)

MAX_DNS_NAME = 253
# LDH labels (underscore tolerated, as in service names), optionally a leading "*." wildcard.
_DNS_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME = re.compile(rf"(?:\*\.)?{_DNS_LABEL}(?:\.{_DNS_LABEL})*")

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


class KeyType(StrEnum):
    EC_P256 = "ec-p256"
    ED25519 = "ed25519"
    RSA_2048 = "rsa-2048"


def generate_private_key(key_type: KeyType) -> PrivateKey:
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(ec.SECP256R1())
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _signature_hash(key: CertificateIssuerPrivateKeyTypes) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def private_key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 (also when the file already existed)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise CaError(f"cannot write {path}: {exc.strerror}") from None


def _write_public_file(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
        path.chmod(0o644)
    except OSError as exc:
        raise CaError(f"cannot write {path}: {exc.strerror}") from None


@dataclass
class IssuedSvid:
    """A freshly issued X.509-SVID and its private key (kept in memory until written)."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey

    def cert_pem(self) -> bytes:
        """Leaf first, then intermediates (never the root)."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return private_key_pem(self.private_key)

    def write(self, prefix: Path) -> tuple[Path, Path]:
        """Write ``PREFIX.crt`` and ``PREFIX.key`` (0600)."""
        crt = prefix.with_name(prefix.name + ".crt")
        key = prefix.with_name(prefix.name + ".key")
        _write_public_file(crt, self.cert_pem())
        write_private_file(key, self.key_pem())
        return crt, key


def _ski(key: PrivateKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key.public_key())


def _ca_certificate(
    trust_domain: TrustDomain,
    common_name: str,
    key: PrivateKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: PrivateKey,
    *,
    not_before: datetime,
    not_after: datetime,
    path_length: int,
) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "svidgate"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    issuer_name = issuer_cert.subject if issuer_cert is not None else subject
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id()))]),
            critical=False,
        )
        .add_extension(_ski(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    return builder.sign(issuer_key, _signature_hash(issuer_key))


class CertificateAuthority:
    """Root (+ optional intermediate) of one trust domain; the last CA in line signs SVIDs."""

    def __init__(
        self,
        trust_domain: TrustDomain,
        root_cert: x509.Certificate,
        root_key: PrivateKey,
        intermediate_cert: x509.Certificate | None = None,
        intermediate_key: PrivateKey | None = None,
    ) -> None:
        self.trust_domain = trust_domain
        self.root_cert = root_cert
        self.root_key = root_key
        self.intermediate_cert = intermediate_cert
        self.intermediate_key = intermediate_key

    @classmethod
    def create(
        cls,
        trust_domain: TrustDomain | str,
        *,
        key_type: KeyType = KeyType.EC_P256,
        ttl: timedelta = DEFAULT_CA_TTL,
        intermediate: bool = False,
        now: datetime | None = None,
    ) -> CertificateAuthority:
        td = (
            trust_domain
            if isinstance(trust_domain, TrustDomain)
            else parse_trust_domain(trust_domain)
        )
        if ttl <= timedelta(0):
            raise CaError("CA TTL must be positive")
        now = now or datetime.now(UTC)
        try:
            not_after = now + ttl
        except OverflowError:
            raise CaError(f"CA TTL {format_duration(ttl)} is too long") from None
        root_key = generate_private_key(key_type)
        root = _ca_certificate(
            td,
            f"svidgate root CA {td}",
            root_key,
            None,
            root_key,
            not_before=now - BACKDATE,
            not_after=not_after,
            path_length=1 if intermediate else 0,
        )
        if not intermediate:
            return cls(td, root, root_key)
        inter_key = generate_private_key(key_type)
        inter = _ca_certificate(
            td,
            f"svidgate intermediate CA {td}",
            inter_key,
            root,
            root_key,
            not_before=now - BACKDATE,
            not_after=not_after,
            path_length=0,
        )
        return cls(td, root, root_key, inter, inter_key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        """Load a CA written by :meth:`save` (``svidgate pki init``)."""
        directory = Path(directory)
        root = _load_one_cert(directory / "root.crt")
        root_key = _load_ca_key(directory / "root.key")
        td = _trust_domain_of_ca(root, directory / "root.crt")
        _check_is_ca(root, directory / "root.crt")
        _check_key_pair(root, root_key, directory / "root.key")
        inter_path = directory / "intermediate.crt"
        if inter_path.exists():
            inter = _load_one_cert(inter_path)
            inter_key = _load_ca_key(directory / "intermediate.key")
            _check_is_ca(inter, inter_path)
            _check_key_pair(inter, inter_key, directory / "intermediate.key")
            try:
                inter.verify_directly_issued_by(root)
            except (ValueError, TypeError, InvalidSignature):
                raise CaError(f"{inter_path} was not issued by {directory / 'root.crt'}") from None
            return cls(td, root, root_key, inter, inter_key)
        return cls(td, root, root_key)

    def save(self, directory: Path) -> list[Path]:
        """Write root.crt, root.key (0600), bundle.pem, bundle.json [, intermediate.crt/.key]."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CaError(f"cannot create directory {directory}: {exc.strerror}") from None
        written = [directory / "root.crt", directory / "root.key"]
        _write_public_file(written[0], self.root_cert.public_bytes(serialization.Encoding.PEM))
        write_private_file(written[1], private_key_pem(self.root_key))
        bundle = self.bundle()
        _write_public_file(directory / "bundle.pem", marshal_pem(bundle))
        _write_public_file(directory / "bundle.json", marshal_json(bundle))
        written += [directory / "bundle.pem", directory / "bundle.json"]
        if self.intermediate_cert is not None and self.intermediate_key is not None:
            inter_crt, inter_key = directory / "intermediate.crt", directory / "intermediate.key"
            _write_public_file(
                inter_crt, self.intermediate_cert.public_bytes(serialization.Encoding.PEM)
            )
            write_private_file(inter_key, private_key_pem(self.intermediate_key))
            written += [inter_crt, inter_key]
        else:  # a stale intermediate from an earlier `init --force` would be loaded and used
            for stale in (directory / "intermediate.crt", directory / "intermediate.key"):
                try:
                    stale.unlink(missing_ok=True)
                except OSError as exc:
                    raise CaError(f"cannot remove {stale}: {exc.strerror}") from None
        return written

    def bundle(self) -> Bundle:
        return Bundle(self.trust_domain, (self.root_cert,), sequence=1)

    @property
    def signing_cert(self) -> x509.Certificate:
        return self.intermediate_cert if self.intermediate_cert is not None else self.root_cert

    @property
    def signing_key(self) -> PrivateKey:
        return self.intermediate_key if self.intermediate_key is not None else self.root_key

    def issue(
        self,
        spiffe_id: SpiffeId | str,
        *,
        dns: Iterable[str] = (),
        ips: Iterable[str] = (),
        ttl: timedelta = DEFAULT_SVID_TTL,
        key_type: KeyType = KeyType.EC_P256,
        now: datetime | None = None,
    ) -> IssuedSvid:
        """Issue an X.509-SVID for a workload ID of this CA's trust domain."""
        sid = (
            spiffe_id
            if isinstance(spiffe_id, SpiffeId)
            else parse_spiffe_id(spiffe_id, require_path=True)
        )
        if sid.is_trust_domain_id:
            raise InvalidSpiffeIdError(f"{sid}: a workload SPIFFE ID needs a path")
        if sid.trust_domain != self.trust_domain:
            raise CaError(f"{sid} is not in this CA's trust domain {self.trust_domain}")
        if ttl <= timedelta(0):
            raise CaError("SVID TTL must be positive")
        now = now or datetime.now(UTC)
        issuer_cert, issuer_key = self.signing_cert, self.signing_key
        try:
            not_after = min(now + ttl, issuer_cert.not_valid_after_utc)
        except OverflowError:  # a TTL past year 9999 is capped by the CA like any other
            not_after = issuer_cert.not_valid_after_utc
        if not_after <= now:
            raise CaError("the signing CA certificate has expired; run `svidgate pki init` again")
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(sid))]
        for name in dns:
            if len(name) > MAX_DNS_NAME or not _DNS_NAME.fullmatch(name):
                raise CaError(
                    f"invalid DNS name {name!r} (ASCII labels of letters, digits, '-' and '_'; "
                    "IDNs as A-labels: xn--…)"
                )
            names.append(x509.DNSName(name))
        for ip in ips:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(ip)))
            except ValueError:
                raise CaError(f"invalid IP address {ip!r}") from None
        key = generate_private_key(key_type)
        is_rsa = isinstance(key, rsa.RSAPrivateKey)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .issuer_name(issuer_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=is_rsa,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
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
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(_ski(key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                critical=False,
            )
            .sign(issuer_key, _signature_hash(issuer_key))
        )
        chain = (leaf,) if self.intermediate_cert is None else (leaf, self.intermediate_cert)
        return IssuedSvid(sid, leaf, chain, key)


def _load_one_cert(path: Path) -> x509.Certificate:
    certs = load_certificates(path)
    if len(certs) != 1:
        raise CaError(f"{path}: expected exactly one certificate, found {len(certs)}")
    return certs[0]


def _load_ca_key(path: Path) -> PrivateKey:
    key = load_private_key(path)
    if not isinstance(
        key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    ):
        raise CaError(f"{path}: unsupported CA key type")
    return key


def _check_is_ca(cert: x509.Certificate, path: Path) -> None:
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        raise CaError(f"{path} is not a CA certificate (basicConstraints CA:TRUE required)")


def _check_key_pair(cert: x509.Certificate, key: PrivateKey, key_path: Path) -> None:
    if cert.public_key() != key.public_key():
        raise CaError(f"{key_path} is not the private key of its certificate")


def _trust_domain_of_ca(cert: x509.Certificate, path: Path) -> TrustDomain:
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise CaError(
            f"{path}: a svidgate CA certificate carries its trust domain ID as one URI SAN"
        )
    try:
        sid = parse_spiffe_id(uris[0])
    except PkiError as exc:
        raise CaError(f"{path}: {exc}") from None
    return sid.trust_domain
