"""The dev CA: what it issues must be a correct X.509-SVID for every key type."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from svidgate.pki.bundle import BundleSet
from svidgate.pki.ca import CertificateAuthority, IssuedSvid, KeyType, write_private_file
from svidgate.pki.errors import (
    CaError,
    InvalidSpiffeIdError,
    InvalidSvidError,
    PkiError,
    UntrustedSvidError,
)
from svidgate.pki.spiffe_id import TrustDomain, parse_spiffe_id
from svidgate.pki.svid import (
    load_certificates,
    load_private_key,
    parse_raw_chain,
    thumbprint_sha256,
    verify_x509_svid,
    x5t_s256,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
ID = "spiffe://example.org/ns/a/sa/b"
KEY_CLASSES = {
    KeyType.EC_P256: ec.EllipticCurvePrivateKey,
    KeyType.ED25519: ed25519.Ed25519PrivateKey,
    KeyType.RSA_2048: rsa.RSAPrivateKey,
}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def cas() -> dict[tuple[KeyType, bool], CertificateAuthority]:
    return {
        (kt, inter): CertificateAuthority.create(
            "example.org", key_type=kt, intermediate=inter, now=NOW
        )
        for kt in KeyType
        for inter in (False, True)
    }


@pytest.mark.parametrize("intermediate", [False, True], ids=["root", "intermediate"])
@pytest.mark.parametrize("key_type", list(KeyType))
def test_issued_svids_verify(
    cas: dict[tuple[KeyType, bool], CertificateAuthority], key_type: KeyType, intermediate: bool
) -> None:
    ca = cas[(key_type, intermediate)]
    svid = ca.issue(ID, dns=["b.internal"], ips=["127.0.0.1", "::1"], key_type=key_type, now=NOW)
    assert isinstance(svid.private_key, KEY_CLASSES[key_type])
    assert svid.chain[0] == svid.leaf
    assert len(svid.chain) == (2 if intermediate else 1)
    bundles = BundleSet.from_bundles([ca.bundle()])
    result = verify_x509_svid(svid.leaf, svid.chain[1:], bundles, now=NOW)
    assert str(result.spiffe_id) == ID
    leaf = svid.leaf
    ext = leaf.extensions
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert ku.value.key_encipherment is (key_type is KeyType.RSA_2048)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ID]
    assert san.get_values_for_type(x509.DNSName) == ["b.internal"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(svid.private_key.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        aki.key_identifier
        == ca.signing_cert.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    )
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= timedelta(hours=1, minutes=1)


@pytest.mark.parametrize("leaf_type", list(KeyType))
@pytest.mark.parametrize("ca_type", list(KeyType))
def test_leaf_key_type_independent_of_the_ca_key_type(
    cas: dict[tuple[KeyType, bool], CertificateAuthority], ca_type: KeyType, leaf_type: KeyType
) -> None:
    """Mixed chains (e.g. an Ed25519 leaf under an EC CA) take pki's Ed25519 chain walk or
    cryptography's verifier; both must accept what the CA issues."""
    for intermediate in (False, True):
        ca = cas[(ca_type, intermediate)]
        svid = ca.issue(ID, key_type=leaf_type, now=NOW)
        assert isinstance(svid.private_key, KEY_CLASSES[leaf_type])
        bundles = BundleSet.from_bundles([ca.bundle()])
        assert str(verify_x509_svid(svid.leaf, svid.chain[1:], bundles, now=NOW).spiffe_id) == ID


def test_accepted_dns_names() -> None:
    ca = CertificateAuthority.create("example.org", now=NOW)
    names = ["localhost", "*.svc.example.org", "xn--exmple-cua.org", "_grpc.a-b.internal"]
    svid = ca.issue(ID, dns=names, now=NOW)
    san = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == names


def test_default_ttl_is_short_and_capped_by_the_ca() -> None:
    ca = CertificateAuthority.create("example.org", ttl=timedelta(hours=2), now=NOW)
    svid = ca.issue(ID, now=NOW)
    assert svid.leaf.not_valid_after_utc == NOW + timedelta(hours=1)
    long = ca.issue(ID, ttl=timedelta(days=30), now=NOW)
    assert long.leaf.not_valid_after_utc == ca.root_cert.not_valid_after_utc
    huge = ca.issue(ID, ttl=timedelta(days=999_999_999), now=NOW)  # past year 9999
    assert huge.leaf.not_valid_after_utc == ca.root_cert.not_valid_after_utc


def test_issuing_after_the_ca_expired_is_refused() -> None:
    ca = CertificateAuthority.create("example.org", ttl=timedelta(hours=1), now=NOW)
    with pytest.raises(CaError, match="has expired"):
        ca.issue(ID, now=NOW + timedelta(hours=2))


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"spiffe_id": "spiffe://other.org/a"}, CaError, "not in this CA's trust domain"),
        ({"spiffe_id": "spiffe://example.org"}, InvalidSpiffeIdError, "needs a path"),
        ({"spiffe_id": "spiffe://Example.org/a"}, InvalidSpiffeIdError, "lowercase"),
        ({"ttl": timedelta(0)}, CaError, "TTL must be positive"),
        ({"ttl": timedelta(seconds=-1)}, CaError, "TTL must be positive"),
        ({"dns": ["a b"]}, CaError, "invalid DNS name 'a b'"),
        ({"dns": [""]}, CaError, "invalid DNS name ''"),
        ({"dns": ["exämple.org"]}, CaError, "invalid DNS name 'exämple.org'"),
        ({"dns": ["a..b"]}, CaError, "invalid DNS name 'a..b'"),
        ({"dns": ["a.*.b"]}, CaError, "invalid DNS name 'a.*.b'"),
        ({"dns": ["a/b"]}, CaError, "invalid DNS name 'a/b'"),
        ({"dns": ["a" * 64 + ".org"]}, CaError, "invalid DNS name"),
        ({"ips": ["300.1.1.1"]}, CaError, "invalid IP address '300.1.1.1'"),
    ],
)
def test_issue_refuses(kwargs: dict[str, object], error: type[PkiError], fragment: str) -> None:
    ca = CertificateAuthority.create("example.org", now=NOW)
    args: dict[str, object] = {"spiffe_id": ID, "now": NOW, **kwargs}
    with pytest.raises(error) as info:
        ca.issue(**args)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_issue_accepts_a_parsed_trust_domain_id_only_with_a_path() -> None:
    ca = CertificateAuthority.create(TrustDomain("example.org"), now=NOW)
    with pytest.raises(InvalidSpiffeIdError, match="needs a path"):
        ca.issue(parse_spiffe_id("spiffe://example.org"), now=NOW)


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"trust_domain": "Example.org"}, InvalidSpiffeIdError, "lowercase"),
        ({"trust_domain": "spiffe://example.org/a"}, InvalidSpiffeIdError, "no path"),
        ({"ttl": timedelta(0)}, CaError, "CA TTL must be positive"),
        ({"ttl": timedelta(days=999_999_999)}, CaError, "is too long"),
    ],
)
def test_create_refuses(kwargs: dict[str, object], error: type[PkiError], fragment: str) -> None:
    args: dict[str, object] = {"trust_domain": "example.org", "now": NOW, **kwargs}
    with pytest.raises(error) as info:
        CertificateAuthority.create(**args)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@pytest.mark.parametrize("intermediate", [False, True])
def test_save_and_load_round_trip(tmp_path: Path, intermediate: bool) -> None:
    ca = CertificateAuthority.create("example.org", intermediate=intermediate, now=NOW)
    written = ca.save(tmp_path / "ca")
    names = {p.name for p in written}
    expected = {"root.crt", "root.key", "bundle.pem", "bundle.json"}
    if intermediate:
        expected |= {"intermediate.crt", "intermediate.key"}
    assert names == expected
    assert {p.name for p in (tmp_path / "ca").iterdir()} == expected
    for path in written:
        assert _mode(path) == (0o600 if path.suffix == ".key" else 0o644), path
    loaded = CertificateAuthority.load(tmp_path / "ca")
    assert loaded.trust_domain == TrustDomain("example.org")
    assert loaded.root_cert == ca.root_cert
    assert loaded.intermediate_cert == ca.intermediate_cert
    svid = loaded.issue(ID, now=NOW)
    verify_x509_svid(svid.leaf, svid.chain[1:], BundleSet.from_bundles([ca.bundle()]), now=NOW)


def test_load_refuses_a_directory_without_a_ca(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="cannot read certificate file"):
        CertificateAuthority.load(tmp_path)


def test_load_refuses_a_root_that_is_not_a_svidgate_ca(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("example.org", now=NOW)
    ca.save(tmp_path)
    leaf = ca.issue(ID, now=NOW)
    (tmp_path / "root.crt").write_bytes(leaf.cert_pem() + leaf.cert_pem())
    with pytest.raises(CaError, match="expected exactly one certificate, found 2"):
        CertificateAuthority.load(tmp_path)


def test_issued_svid_write(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("example.org", intermediate=True, now=NOW)
    svid: IssuedSvid = ca.issue(ID, now=NOW)
    (tmp_path / "w.key").write_bytes(b"old")
    (tmp_path / "w.key").chmod(0o644)  # an existing, too-open key file is tightened
    crt, key = svid.write(tmp_path / "w")
    assert (crt.name, key.name) == ("w.crt", "w.key")
    assert _mode(key) == 0o600
    assert load_certificates(crt) == list(svid.chain)
    loaded_key = load_private_key(key)
    assert isinstance(loaded_key, ec.EllipticCurvePrivateKey)
    assert loaded_key.private_numbers() == svid.private_key.private_numbers()  # type: ignore[union-attr]
    assert b"PRIVATE KEY" not in crt.read_bytes()
    assert ca.root_cert not in load_certificates(crt)


def test_write_private_file_is_0600(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    write_private_file(path, b"x")
    assert _mode(path) == 0o600
    path.chmod(0o666)
    write_private_file(path, b"y")
    assert _mode(path) == 0o600
    assert path.read_bytes() == b"y"


def test_thumbprints() -> None:
    ca = CertificateAuthority.create("example.org", now=NOW)
    leaf = ca.issue(ID, now=NOW).leaf
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert thumbprint_sha256(leaf) == hashlib.sha256(der).digest()
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    assert x5t_s256(leaf) == expected
    assert "=" not in x5t_s256(leaf) and len(x5t_s256(leaf)) == 43


def test_parse_raw_chain_and_loaders(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("example.org", intermediate=True, now=NOW)
    svid = ca.issue(ID, now=NOW)
    ders = [c.public_bytes(serialization.Encoding.DER) for c in svid.chain]
    assert parse_raw_chain(ders) == list(svid.chain)
    with pytest.raises(InvalidSvidError, match=r"not DER X\.509"):
        parse_raw_chain([b"\x30\x03junk"])
    (tmp_path / "junk.pem").write_bytes(b"junk")
    with pytest.raises(InvalidSvidError, match="not PEM certificates"):
        load_certificates(tmp_path / "junk.pem")
    secret = (
        b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END PRIVATE KEY-----\n"
    )
    (tmp_path / "bad.key").write_bytes(secret)
    with pytest.raises(PkiError) as info:
        load_private_key(tmp_path / "bad.key")
    assert "not an unencrypted PEM private key" in str(info.value)
    assert "c2VjcmV0" not in str(info.value)
    with pytest.raises(PkiError, match="cannot read private key file"):
        load_private_key(tmp_path / "missing.key")


def test_verify_rejects_a_leaf_of_another_ca_with_the_same_trust_domain() -> None:
    one = CertificateAuthority.create("example.org", now=NOW)
    two = CertificateAuthority.create("example.org", now=NOW)
    leaf = two.issue(ID, now=NOW).leaf
    with pytest.raises(UntrustedSvidError, match="does not chain"):
        verify_x509_svid(leaf, [], BundleSet.from_bundles([one.bundle()]), now=NOW)


async def test_issued_svids_work_for_real_mtls_on_loopback(tmp_path: Path) -> None:
    """Server and client SVIDs from one CA (with intermediate) complete a TLS 1.3 mTLS
    handshake on 127.0.0.1, and the server sees the client's SPIFFE ID."""
    ca = CertificateAuthority.create("example.org", intermediate=True)
    ca.save(tmp_path)
    server_crt, server_key = ca.issue(
        "spiffe://example.org/server", dns=["localhost"], ips=["127.0.0.1"]
    ).write(tmp_path / "server")
    client_crt, client_key = ca.issue(ID).write(tmp_path / "client")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tmp_path / "root.crt")
    server_ctx.load_cert_chain(server_crt, server_key)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=tmp_path / "root.crt")
    client_ctx.load_cert_chain(client_crt, client_key)
    seen: list[object] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peercert")
        seen.append(peer["subjectAltName"] if peer else None)
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="localhost"),
            timeout=10,
        )
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), timeout=10) == b"ping\n"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    assert seen == [(("URI", ID),)]


def test_save_without_intermediate_removes_a_stale_one(tmp_path: Path) -> None:
    """`init --force` without --intermediate over a CA that had one: the old intermediate
    must not be loaded (it would sign chains that do not verify against the new root)."""
    CertificateAuthority.create("example.org", intermediate=True, now=NOW).save(tmp_path)
    fresh = CertificateAuthority.create("example.org", now=NOW)
    fresh.save(tmp_path)
    assert not (tmp_path / "intermediate.crt").exists()
    assert not (tmp_path / "intermediate.key").exists()
    loaded = CertificateAuthority.load(tmp_path)
    assert loaded.intermediate_cert is None
    svid = loaded.issue(ID, now=NOW)
    verify_x509_svid(svid.leaf, svid.chain[1:], BundleSet.from_bundles([fresh.bundle()]), now=NOW)


def test_load_refuses_an_intermediate_of_another_root(tmp_path: Path) -> None:
    CertificateAuthority.create("example.org", intermediate=True, now=NOW).save(tmp_path / "a")
    CertificateAuthority.create("example.org", intermediate=True, now=NOW).save(tmp_path / "b")
    for name in ("intermediate.crt", "intermediate.key"):
        (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    with pytest.raises(CaError, match=r"intermediate\.crt was not issued by .*root\.crt"):
        CertificateAuthority.load(tmp_path / "a")


def test_load_refuses_a_leaf_as_root(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("example.org", now=NOW)
    ca.save(tmp_path)
    ca.issue(ID, now=NOW).write(tmp_path / "root")  # root.crt / root.key are now an SVID
    with pytest.raises(CaError, match=r"root\.crt is not a CA certificate"):
        CertificateAuthority.load(tmp_path)


def test_load_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    CertificateAuthority.create("example.org", now=NOW).save(tmp_path / "a")
    CertificateAuthority.create("example.org", now=NOW).save(tmp_path / "b")
    (tmp_path / "a" / "root.key").write_bytes((tmp_path / "b" / "root.key").read_bytes())
    with pytest.raises(CaError, match=r"root\.key is not the private key of its certificate"):
        CertificateAuthority.load(tmp_path / "a")


def test_write_errors_are_ca_errors(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("example.org", now=NOW)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CaError, match="cannot create directory"):
        ca.save(tmp_path / "file" / "sub")
    with pytest.raises(CaError, match=r"cannot write .*missing/x\.crt"):
        ca.issue(ID, now=NOW).write(tmp_path / "missing" / "x")
    with pytest.raises(CaError, match="cannot write"):
        write_private_file(tmp_path / "missing" / "k", b"x")
