"""X.509-SVID vectors from tests/vectors/pki (see its README): each good one verifies, each
broken one is refused with the exact error class and a message naming the defect."""

from __future__ import annotations

import functools
import importlib.util
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest
from cryptography import x509
from svidgate.pki.bundle import BundleSet, load_bundle
from svidgate.pki.errors import InvalidSvidError, PkiError, UntrustedSvidError
from svidgate.pki.spiffe_id import parse_spiffe_id
from svidgate.pki.svid import check_svid_profile, load_certificates, verify_x509_svid

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "pki"
NOW = datetime(2030, 1, 1, tzinfo=UTC)  # the instant the vectors are made for
WORKLOAD = parse_spiffe_id("spiffe://example.org/ns/shop/sa/orders")
KEY_SUFFIXES = {"ec-p256": "", "ed25519": "-ed25519", "rsa-2048": "-rsa-2048"}


@functools.cache
def _generator() -> ModuleType:
    """tests/vectors/pki/generate.py, imported by path (tests/ is not a package)."""
    name = "pki_vectors_generate"
    spec = importlib.util.spec_from_file_location(name, VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _bundles(key_type: str = "ec-p256", *, other: bool = True) -> BundleSet:
    """example.org's bundle of ``key_type`` (or, for "constrained[-ed25519]", its
    name-constrained root) and other.org's."""
    if key_type.startswith("constrained"):
        name = f"bundle-name-constrained{key_type.removeprefix('constrained')}.pem"
    else:
        name = f"bundle-example.org{KEY_SUFFIXES[key_type]}.pem"
    bundles = [load_bundle(VECTORS / name, "example.org")]
    if other:
        bundles.append(load_bundle(VECTORS / "bundle-other.org.pem", "other.org"))
    return BundleSet.from_bundles(bundles)


def _chain(name: str) -> list[x509.Certificate]:
    return load_certificates(VECTORS / name)


def test_committed_vectors_equal_a_fresh_generation() -> None:
    built: dict[str, bytes] = _generator().build()
    on_disk = {p.name for p in VECTORS.iterdir() if p.suffix in (".pem", ".json")}
    assert set(built) == on_disk
    for name, data in built.items():
        assert (VECTORS / name).read_bytes() == data, f"{name} differs from generate.py"


def test_the_generator_uses_the_same_now() -> None:
    assert _generator().NOW == NOW


@pytest.mark.parametrize("key_type", sorted(KEY_SUFFIXES))
@pytest.mark.parametrize("shape", ["good-leaf", "good-chain-intermediate"])
def test_good_vectors_verify(key_type: str, shape: str) -> None:
    chain = _chain(f"{shape}{KEY_SUFFIXES[key_type]}.pem")
    assert len(chain) == (1 if shape == "good-leaf" else 2)
    svid = verify_x509_svid(chain[0], chain[1:], _bundles(key_type), now=NOW)
    assert svid.spiffe_id == WORKLOAD
    assert svid.leaf == chain[0]
    assert svid.intermediates == tuple(chain[1:])
    assert check_svid_profile(chain[0]) == WORKLOAD


@pytest.mark.parametrize("key_type", sorted(KEY_SUFFIXES))
def test_good_vectors_do_not_verify_against_another_key_types_root(key_type: str) -> None:
    """Three roots with one trust domain: only the matching root verifies."""
    chain = _chain(f"good-chain-intermediate{KEY_SUFFIXES[key_type]}.pem")
    for other_type in KEY_SUFFIXES:
        if other_type == key_type:
            continue
        with pytest.raises(UntrustedSvidError, match="does not chain"):
            verify_x509_svid(chain[0], chain[1:], _bundles(other_type), now=NOW)


def test_good_chain_without_its_intermediate_does_not_verify() -> None:
    for suffix in KEY_SUFFIXES.values():
        chain = _chain(f"good-chain-intermediate{suffix}.pem")
        with pytest.raises(UntrustedSvidError, match="does not chain"):
            verify_x509_svid(chain[0], [], _bundles(), now=NOW)


PROFILE_DEFECTS = [
    ("wrong-leaf-ca-true.pem", "leaf certificate is a CA"),
    ("two-uri-sans.pem", "has 2 URI SANs"),
    ("no-uri-san.pem", "no URI SAN"),
    ("uri-san-not-spiffe.pem", "scheme must be 'spiffe://'"),
    ("uri-san-trust-domain-only.pem", "a workload SPIFFE ID needs a path"),
    ("uppercase-trust-domain.pem", "trust domain must be lowercase"),
    ("leaf-key-cert-sign.pem", "keyCertSign"),
    ("leaf-crl-sign.pem", "cRLSign"),
    ("no-digital-signature.pem", "lacks the digitalSignature"),
]


@pytest.mark.parametrize(("name", "fragment"), PROFILE_DEFECTS)
def test_profile_defects_are_invalid_svids(name: str, fragment: str) -> None:
    chain = _chain(name)
    with pytest.raises(InvalidSvidError) as info:
        check_svid_profile(chain[0])
    assert fragment in str(info.value)
    with pytest.raises(InvalidSvidError) as info:
        verify_x509_svid(chain[0], chain[1:], _bundles(), now=NOW)
    assert fragment in str(info.value)


CHAIN_DEFECTS = [
    ("expired.pem", "ec-p256", "expired at 2022-01-01T00:00:00Z"),
    ("not-yet-valid.pem", "ec-p256", "not valid before 2090-01-01T00:00:00Z"),
    ("other-trust-domain.pem", "ec-p256", "does not chain to the bundle of other.org"),
    ("untrusted-ca.pem", "ec-p256", "does not chain to the bundle of example.org"),
    ("untrusted-ca-ed25519.pem", "ed25519", "signature or issuer name does not match"),
    ("intermediate-not-ca.pem", "ec-p256", "basicConstraints.cA must be asserted"),
    ("intermediate-not-ca-ed25519.pem", "ed25519", "issuer is not a CA"),
    ("intermediate-expired.pem", "ec-p256", "not valid at validation time"),
    ("intermediate-expired-ed25519.pem", "ed25519", "outside its validity period"),
    ("unknown-critical-extension.pem", "ec-p256", "unaccounted-for critical extensions"),
    ("unknown-critical-extension-ed25519.pem", "ed25519", "unhandled critical extension"),
    ("name-constraint-violated.pem", "constrained", "unsupported name constraint"),
    ("name-constraint-violated-ed25519.pem", "constrained-ed25519", "name constraints are not"),
]


@pytest.mark.parametrize(("name", "key_type", "fragment"), CHAIN_DEFECTS)
def test_chain_defects_are_untrusted(name: str, key_type: str, fragment: str) -> None:
    chain = _chain(name)
    check_svid_profile(chain[0])  # the leaf itself is a well-formed SVID
    with pytest.raises(UntrustedSvidError) as info:
        verify_x509_svid(chain[0], chain[1:], _bundles(key_type), now=NOW)
    assert fragment in str(info.value)


def test_other_trust_domain_without_its_bundle() -> None:
    chain = _chain("other-trust-domain.pem")
    with pytest.raises(UntrustedSvidError, match=r"no trust bundle for trust domain other\.org"):
        verify_x509_svid(chain[0], [], _bundles(other=False), now=NOW)


def test_validity_is_checked_at_the_given_now_only() -> None:
    """expired.pem was fine in 2021; good-leaf.pem is not yet valid in 2024."""
    leaf = _chain("expired.pem")[0]
    in_2021 = datetime(2021, 6, 1, tzinfo=UTC)
    assert verify_x509_svid(leaf, [], _bundles(), now=in_2021).spiffe_id == WORKLOAD
    good = _chain("good-leaf.pem")[0]
    with pytest.raises(UntrustedSvidError, match="not valid before 2025-01-01"):
        verify_x509_svid(good, [], _bundles(), now=datetime(2024, 1, 1, tzinfo=UTC))


def test_every_vector_file_is_covered_by_a_test() -> None:
    covered = {n for n, _ in PROFILE_DEFECTS} | {n for n, _, _ in CHAIN_DEFECTS}
    covered |= {
        f"{s}{k}.pem"
        for s in ("good-leaf", "good-chain-intermediate")
        for k in KEY_SUFFIXES.values()
    }
    pems = {p.name for p in VECTORS.glob("*.pem") if not p.name.startswith("bundle-")}
    assert pems == covered


def test_errors_are_pki_errors() -> None:
    assert issubclass(InvalidSvidError, PkiError)
    assert issubclass(UntrustedSvidError, PkiError)
