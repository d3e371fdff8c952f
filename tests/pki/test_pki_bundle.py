"""Trust bundles: PEM and SPIFFE JSON, round trips, malformed input, one bundle per domain."""

from __future__ import annotations

import base64
import json
import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from svidgate.pki.bundle import (
    Bundle,
    BundleSet,
    load_bundle,
    marshal_json,
    marshal_pem,
    parse_json_bundle,
    parse_pem_bundle,
)
from svidgate.pki.ca import CertificateAuthority, KeyType
from svidgate.pki.errors import BundleError, UntrustedSvidError
from svidgate.pki.spiffe_id import TrustDomain, parse_spiffe_id
from svidgate.pki.svid import verify_x509_svid

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "pki"
NOW = datetime(2030, 1, 1, tzinfo=UTC)
TD = TrustDomain("example.org")


@pytest.fixture(scope="module")
def cas() -> dict[KeyType, CertificateAuthority]:
    return {kt: CertificateAuthority.create("example.org", key_type=kt, now=NOW) for kt in KeyType}


def _der_b64(bundle: Bundle, index: int = 0) -> str:
    der = bundle.x509_authorities[index].public_bytes(serialization.Encoding.DER)
    return base64.b64encode(der).decode()


def test_committed_pem_and_json_bundles_hold_the_same_root() -> None:
    pem = load_bundle(VECTORS / "bundle-example.org.pem", "example.org")
    doc = load_bundle(VECTORS / "bundle-example.org.json", TD)
    assert pem.trust_domain == doc.trust_domain == TD
    assert len(pem.x509_authorities) == 1
    assert pem.x509_authorities == doc.x509_authorities
    assert (doc.sequence, doc.refresh_hint) == (7, 300)
    assert (pem.sequence, pem.refresh_hint) == (None, None)


def test_pem_round_trip_is_byte_exact() -> None:
    data = (VECTORS / "bundle-example.org.pem").read_bytes()
    data += (VECTORS / "bundle-other.org.pem").read_bytes()
    bundle = parse_pem_bundle(data, TD)
    assert len(bundle.x509_authorities) == 2
    assert marshal_pem(bundle) == data


@pytest.mark.parametrize("key_type", list(KeyType))
def test_json_round_trip(cas: dict[KeyType, CertificateAuthority], key_type: KeyType) -> None:
    jwt_key = {"use": "jwt-svid", "kid": "k1", "kty": "OKP", "crv": "Ed25519", "x": "AAAA"}
    bundle = Bundle(TD, cas[key_type].bundle().x509_authorities, (jwt_key,), 42, 600)
    data = marshal_json(bundle)
    again = parse_json_bundle(data, TD)
    assert again == bundle
    doc = json.loads(data)
    assert doc["spiffe_sequence"] == 42
    assert doc["spiffe_refresh_hint"] == 600
    x509_key = doc["keys"][0]
    assert x509_key["use"] == "x509-svid"
    assert x509_key["kty"] == {"ec-p256": "EC", "ed25519": "OKP", "rsa-2048": "RSA"}[key_type]
    assert x509_key["x5c"] == [_der_b64(bundle)]
    assert marshal_json(again) == data


def test_json_without_sequence_omits_it(cas: dict[KeyType, CertificateAuthority]) -> None:
    bundle = Bundle(TD, cas[KeyType.EC_P256].bundle().x509_authorities)
    doc = json.loads(marshal_json(bundle))
    assert "spiffe_sequence" not in doc
    assert "spiffe_refresh_hint" not in doc
    assert parse_json_bundle(marshal_json(bundle), TD) == bundle


def test_load_bundle_decides_by_content(tmp_path: Path) -> None:
    json_data = b"\n  " + (VECTORS / "bundle-example.org.json").read_bytes()
    (tmp_path / "bundle.pem").write_bytes(json_data)  # the name does not matter
    (tmp_path / "bundle.json").write_bytes((VECTORS / "bundle-example.org.pem").read_bytes())
    assert load_bundle(tmp_path / "bundle.pem", TD).sequence == 7
    assert load_bundle(str(tmp_path / "bundle.json"), TD).sequence is None


def _good_key() -> dict[str, Any]:
    doc = json.loads((VECTORS / "bundle-example.org.json").read_bytes())
    key: dict[str, Any] = doc["keys"][0]
    return key


MALFORMED: list[tuple[object, str]] = [
    ("not json", "not valid JSON"),
    ([], "expected a JWKS object with a 'keys' list"),
    ({}, "expected a JWKS object with a 'keys' list"),
    ({"keys": {}}, "expected a JWKS object with a 'keys' list"),
    ({"keys": ["x"]}, "keys[0]: not an object"),
    ({"keys": [{**_good_key(), "x5c": None}]}, "keys[0]: x509-svid key needs exactly one x5c"),
    ({"keys": [{k: v for k, v in _good_key().items() if k != "x5c"}]}, "exactly one x5c"),
    ({"keys": [{**_good_key(), "x5c": []}]}, "exactly one x5c"),
    ({"keys": [{**_good_key(), "x5c": _good_key()["x5c"] * 2}]}, "exactly one x5c"),
    ({"keys": [{**_good_key(), "x5c": [7]}]}, "exactly one x5c"),
    ({"keys": [{**_good_key(), "x5c": ["!!!not base64"]}]}, "x5c is not a DER certificate"),
    ({"keys": [{**_good_key(), "x5c": ["AAAA"]}]}, "x5c is not a DER certificate"),
    ({"keys": [{k: v for k, v in _good_key().items() if k != "use"}]}, "'use' member is required"),
    ({"keys": [{**_good_key(), "use": 7}]}, "keys[0]: the 'use' member is required"),
    ({"keys": [{"use": "jwt-svid", "kty": "EC"}]}, "jwt-svid key needs a kid"),
    ({"keys": [{"use": "jwt-svid", "kid": ""}]}, "jwt-svid key needs a kid"),
    ({"keys": [], "spiffe_sequence": "1"}, "spiffe_sequence must be a non-negative integer"),
    ({"keys": [], "spiffe_sequence": 1.5}, "spiffe_sequence must be a non-negative integer"),
    ({"keys": [], "spiffe_sequence": True}, "spiffe_sequence must be a non-negative integer"),
    ({"keys": [], "spiffe_sequence": -1}, "spiffe_sequence must be a non-negative integer"),
    ({"keys": [], "spiffe_refresh_hint": "60s"}, "spiffe_refresh_hint must be a non-negative"),
]


def test_unknown_use_is_ignored_as_the_bundle_spec_requires() -> None:
    # SPIFFE Trust Domain and Bundle, 4.2.2: unknown `use` values MUST be ignored (whole JWK).
    doc = {"keys": [_good_key(), {**_good_key(), "use": "enc"}], "spiffe_sequence": 3}
    bundle = parse_json_bundle(json.dumps(doc).encode(), TD)
    assert len(bundle.x509_authorities) == 1
    assert bundle.jwt_authorities == ()
    assert bundle.sequence == 3


@pytest.mark.parametrize(("doc", "fragment"), MALFORMED)
def test_malformed_json_bundles(doc: object, fragment: str, tmp_path: Path) -> None:
    data = doc.encode() if isinstance(doc, str) else json.dumps(doc).encode()
    with pytest.raises(BundleError) as info:
        parse_json_bundle(data, TD)
    assert fragment in str(info.value)
    assert str(info.value).startswith("bundle for example.org")
    path = tmp_path / "b.json"
    path.write_bytes(data)
    with pytest.raises(BundleError):
        load_bundle(path, TD)


def test_non_utf8_json_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="not valid JSON"):
        parse_json_bundle(b'{"keys": ["\xff"]}', TD)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"],
)
def test_malformed_pem_bundles(data: bytes, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not valid PEM certificates"):
        parse_pem_bundle(data, TD)
    (tmp_path / "b.pem").write_bytes(data)
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "b.pem", TD)


def test_unreadable_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"cannot read bundle .*missing\.pem"):
        load_bundle(tmp_path / "missing.pem", TD)
    with pytest.raises(BundleError, match="cannot read bundle"):
        load_bundle(tmp_path, TD)  # a directory


# ---------------------------------------------------------------- BundleSet


def test_bundle_set_lookup() -> None:
    a = load_bundle(VECTORS / "bundle-example.org.pem", "example.org")
    b = load_bundle(VECTORS / "bundle-other.org.pem", "other.org")
    bundles = BundleSet.from_bundles([a, b])
    assert bundles.get(TD) is a
    assert bundles.get(TrustDomain("other.org")) is b
    assert TD in bundles
    assert TrustDomain("third.org") not in bundles
    assert bundles.trust_domains() == [TD, TrustDomain("other.org")]
    assert bundles.pem() == marshal_pem(a) + marshal_pem(b)  # every authority, in order
    assert len(bundles) == 2
    assert list(bundles) == [a, b]
    with pytest.raises(UntrustedSvidError, match=r"no trust bundle for trust domain third\.org"):
        bundles.get(TrustDomain("third.org"))
    with pytest.raises(BundleError, match=r"two bundles for trust domain example\.org"):
        BundleSet.from_bundles([a, a])


def test_bundle_set_pem_loads_into_ssl() -> None:
    a = load_bundle(VECTORS / "bundle-example.org.pem", "example.org")
    b = load_bundle(VECTORS / "bundle-other.org.pem", "other.org")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=BundleSet.from_bundles([a, b]).pem().decode())
    assert len(ctx.get_ca_certs()) == 2


def test_an_id_is_checked_only_against_its_own_trust_domains_bundle() -> None:
    """A certificate naming example.org but signed by other.org's CA is refused even though
    other.org's bundle is loaded too (a trusted CA of B cannot mint identities of A)."""
    ca_a = CertificateAuthority.create("example.org", now=NOW)
    ca_b = CertificateAuthority.create("other.org", now=NOW)
    impostor_ca = CertificateAuthority(TD, ca_b.root_cert, ca_b.root_key)
    forged = impostor_ca.issue("spiffe://example.org/ns/a/sa/b", now=NOW)
    bundles = BundleSet.from_bundles([ca_a.bundle(), ca_b.bundle()])
    with pytest.raises(UntrustedSvidError, match=r"does not chain to the bundle of example\.org"):
        verify_x509_svid(forged.leaf, [], bundles, now=NOW + timedelta(minutes=1))
    # the same certificate verifies when example.org's bundle is (wrongly) B's root:
    misconfigured = BundleSet.from_bundles([Bundle(TD, ca_b.bundle().x509_authorities)])
    svid = verify_x509_svid(forged.leaf, [], misconfigured, now=NOW + timedelta(minutes=1))
    assert svid.spiffe_id == parse_spiffe_id("spiffe://example.org/ns/a/sa/b")


def test_empty_bundle_trusts_nothing() -> None:
    ca = CertificateAuthority.create("example.org", now=NOW)
    svid = ca.issue("spiffe://example.org/a", now=NOW)
    bundles = BundleSet.from_bundles([Bundle(TD, ())])
    with pytest.raises(UntrustedSvidError, match=r"has no X\.509 authorities"):
        verify_x509_svid(svid.leaf, [], bundles, now=NOW)
