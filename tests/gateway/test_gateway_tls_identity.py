"""Steps 1 and 2 over real TLS on loopback: who gets a connection at all."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from gateway_harness import (
    GATEWAY_ID,
    WEB_ID,
    A,
    B,
    Echo,
    Harness,
    LabPki,
    build_request,
    gateway_config,
    raw_exchange,
)
from support.waiting import wait_for
from svidgate.pki.ca import CertificateAuthority, write_private_file


async def _counted(gw: Harness, reason: str, count: int = 1) -> None:
    """``svidgate_gateway_handshake_failures_total{reason}`` reaches ``count`` (the server
    side finishes its half of a failed handshake after the client has given up)."""
    registry = gw.server.metrics.registry
    name = "svidgate_gateway_handshake_failures_total"

    def reached() -> bool:
        return registry.get_sample_value(name, {"reason": reason}) == count

    await wait_for(reached, 5, f"{count} handshake failure(s) counted as {reason}")


async def test_valid_svid_reaches_upstream(gw: Harness, echo: Echo) -> None:
    resp = await gw.request("GET", "/orders/1")
    assert resp is not None and resp.status == 200
    assert echo.targets == ["/orders/1"]
    assert echo.seen[0]["peer"] == GATEWAY_ID  # upstream mTLS with the gateway's SVID


async def test_no_client_certificate_refused(gw: Harness, echo: Echo) -> None:
    resp = await raw_exchange(gw.port, gw.ctx(None), build_request("GET", "/public"))
    assert resp is None
    assert echo.seen == []
    await _counted(gw, "no_client_certificate")


async def test_no_client_certificate_tls12_refused(gw: Harness, echo: Echo) -> None:
    resp = await raw_exchange(gw.port, gw.ctx(None, tls13=False), build_request("GET", "/public"))
    assert resp is None
    assert echo.seen == []
    await _counted(gw, "no_client_certificate")


async def test_unknown_ca_refused(gw: Harness, echo: Echo, tmp_path: Path) -> None:
    stranger = CertificateAuthority.create(A)  # same trust domain name, different key
    stranger.issue(WEB_ID).write(tmp_path / "stranger")
    ctx = gw.pki.client_context(tmp_path / "stranger.crt", tmp_path / "stranger.key")
    assert await raw_exchange(gw.port, ctx, build_request("GET", "/public")) is None
    assert echo.seen == []
    await _counted(gw, "unknown_ca")


async def test_ca_certificate_as_client_cert_refused(gw: Harness, echo: Echo) -> None:
    ca = gw.pki.ca
    (gw.pki.dir / "ca-as-leaf.crt").write_bytes(
        ca.root_cert.public_bytes(serialization.Encoding.PEM)
    )
    write_private_file(
        gw.pki.dir / "ca-as-leaf.key",
        ca.root_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    resp = await gw.request("GET", "/public", client="ca-as-leaf")
    assert resp is None
    assert echo.seen == []
    await _counted(gw, "not_an_svid")


def _broken_leaf(ca: CertificateAuthority, out: Path, uris: list[str], *, expired: bool) -> None:
    """A deliberately broken vector signed by the real test CA (two URI SANs, or expired)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    not_before, not_after = (
        (now - timedelta(days=2), now - timedelta(days=1))
        if expired
        else (
            now - timedelta(minutes=5),
            now + timedelta(hours=1),
        )
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "broken")]))
        .issuer_name(ca.signing_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.signing_key.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    cert = builder.sign(ca.signing_key, hashes.SHA256())  # type: ignore[arg-type]
    out.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private_file(
        out.with_suffix(".key"),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


async def test_two_uri_sans_refused(gw: Harness, echo: Echo) -> None:
    _broken_leaf(
        gw.pki.ca,
        gw.pki.dir / "two-uris",
        [WEB_ID, "spiffe://example.org/ops/alice"],
        expired=False,
    )
    assert await gw.request("GET", "/public", client="two-uris") is None
    assert echo.seen == []
    await _counted(gw, "not_an_svid")


async def test_expired_svid_refused(gw: Harness, echo: Echo) -> None:
    _broken_leaf(gw.pki.ca, gw.pki.dir / "expired", [WEB_ID], expired=True)
    assert await gw.request("GET", "/public", client="expired") is None
    assert echo.seen == []
    await _counted(gw, "expired")


async def test_trust_domain_a_signed_by_b_refused(gw: Harness, echo: Echo) -> None:
    # An example.org ID signed by other.org's CA: the merged ssl store accepts the handshake,
    # the per-trust-domain re-verification must not.
    _broken_leaf(gw.pki.cas[B], gw.pki.dir / "a-by-b", [WEB_ID], expired=False)
    assert await gw.request("GET", "/public", client="a-by-b") is None
    assert echo.seen == []
    await _counted(gw, "unknown_ca")  # found by the identity check, after the handshake
    # ... while other.org's own workloads are fine.
    resp = await gw.request("GET", "/public", client="b-web")
    assert resp is not None and resp.status == 200
    assert len(echo.seen) == 1


async def test_tls12_non_aead_cipher_refused(gw: Harness, echo: Echo) -> None:
    ctx = gw.ctx("web", tls13=False)
    ctx.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")  # CBC, not AEAD
    assert await raw_exchange(gw.port, ctx, build_request("GET", "/orders/1")) is None
    assert echo.seen == []


async def test_tls12_aead_ecdhe_accepted(gw: Harness, echo: Echo) -> None:
    ctx = gw.ctx("web", tls13=False)
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    resp = await raw_exchange(gw.port, ctx, build_request("GET", "/orders/1"))
    assert resp is not None and resp.status == 200


async def test_min_version_13_refuses_tls12(
    test_pki: LabPki, echo: Echo, start_gateway: Callable[..., Any]
) -> None:
    doc = gateway_config(test_pki, echo.port)
    doc["tls"]["min_version"] = "1.3"
    gw: Harness = await start_gateway(doc)
    assert await gw.request("GET", "/orders/1") is not None
    tls12 = await raw_exchange(gw.port, gw.ctx("web", tls13=False), build_request("GET", "/x"))
    assert tls12 is None
