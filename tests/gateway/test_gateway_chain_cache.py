"""The per-connection SVID verification cache: a presented chain verified once per generation of
bundles, used only inside every certificate's validity, never for a failed chain, dropped on
reload; resumed sessions (empty chain) never use it. Verified connections are handed to
aiohttp directly and leave nothing behind when they close."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from gateway_harness import WEB_ID, Echo, Harness
from support.waiting import wait_for
from svidgate.gateway.identity import VerifiedChainCache
from svidgate.pki.bundle import BundleSet
from svidgate.pki.ca import CertificateAuthority, IssuedSvid
from svidgate.pki.errors import PkiError
from svidgate.pki.spiffe_id import parse_spiffe_id

GATEWAY = parse_spiffe_id("spiffe://example.org/gateway")


def ders(svid: IssuedSvid) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in svid.chain]


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("example.org", intermediate=True)


def test_second_lookup_is_a_hit_with_the_same_identity(ca: CertificateAuthority) -> None:
    cache = VerifiedChainCache()
    bundles = BundleSet.from_bundles([ca.bundle()])
    chain = ders(ca.issue(WEB_ID))
    now = datetime.now(UTC)
    first = cache.identify(chain, generation=1, bundles=bundles, gateway_id=GATEWAY, now=now)
    again = cache.identify(chain, generation=1, bundles=bundles, gateway_id=GATEWAY, now=now)
    assert again is first and first.id_text == WEB_ID
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)


def test_entry_is_not_used_outside_the_validity_of_the_chain(ca: CertificateAuthority) -> None:
    cache = VerifiedChainCache()
    bundles = BundleSet.from_bundles([ca.bundle()])
    now = datetime.now(UTC)
    chain = ders(ca.issue(WEB_ID, ttl=timedelta(minutes=5), now=now))
    cache.identify(chain, generation=1, bundles=bundles, gateway_id=GATEWAY, now=now)
    later = now + timedelta(minutes=6)
    with pytest.raises(PkiError, match="expired"):
        cache.identify(chain, generation=1, bundles=bundles, gateway_id=GATEWAY, now=later)
    assert len(cache) == 0 and cache.hits == 0


def test_another_generation_verifies_again_against_its_own_bundles(
    ca: CertificateAuthority,
) -> None:
    cache = VerifiedChainCache()
    bundles = BundleSet.from_bundles([ca.bundle()])
    stranger = CertificateAuthority.create("example.org")
    chain = ders(ca.issue(WEB_ID))
    now = datetime.now(UTC)
    cache.identify(chain, generation=1, bundles=bundles, gateway_id=GATEWAY, now=now)
    # generation 2 trusts another CA only: the generation-1 entry must not let the chain in
    rotated = BundleSet.from_bundles([stranger.bundle()])
    with pytest.raises(PkiError):
        cache.identify(chain, generation=2, bundles=rotated, gateway_id=GATEWAY, now=now)
    assert cache.hits == 0


def test_failed_verifications_are_never_cached(ca: CertificateAuthority) -> None:
    cache = VerifiedChainCache()
    bundles = BundleSet.from_bundles([ca.bundle()])
    stranger = CertificateAuthority.create("example.org")
    chain = ders(stranger.issue(WEB_ID))
    now = datetime.now(UTC)
    for _ in range(2):
        with pytest.raises(PkiError):
            cache.identify(chain, generation=1, bundles=bundles, gateway_id=GATEWAY, now=now)
    assert (len(cache), cache.hits, cache.misses) == (0, 0, 2)
    with pytest.raises(ValueError, match="empty chain"):
        cache.identify([], generation=1, bundles=bundles, gateway_id=GATEWAY, now=now)


def test_cache_is_bounded(ca: CertificateAuthority) -> None:
    cache = VerifiedChainCache(max_entries=2)
    bundles = BundleSet.from_bundles([ca.bundle()])
    now = datetime.now(UTC)
    for _ in range(3):
        chain = ders(ca.issue(WEB_ID))
        cache.identify(chain, generation=1, bundles=bundles, gateway_id=GATEWAY, now=now)
    assert len(cache) == 2


async def test_gateway_reuses_a_verified_chain_and_drops_the_cache_on_reload(
    gw: Harness, echo: Echo
) -> None:
    chains = gw.server.app.chains
    for _ in range(3):
        resp = await gw.request("GET", "/orders/1")
        assert resp is not None and resp.status == 200
    assert chains.misses == 1 and chains.hits == 2
    assert gw.server.reload()
    assert len(chains) == 0
    resp = await gw.request("GET", "/orders/1")
    assert resp is not None and resp.status == 200
    assert chains.misses == 2
    assert len(echo.seen) == 4


async def test_closed_connections_leave_no_identity_or_timer_behind(
    gw: Harness, echo: Echo
) -> None:
    app = gw.server.app
    for _ in range(3):
        resp = await gw.request("GET", "/orders/1")
        assert resp is not None and resp.status == 200
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", gw.port, ssl=gw.ctx("web"), server_hostname="localhost"
    )
    writer.write(b"GET /orders/2 HTTP/1.1\r\nHost: localhost\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    listener = gw.server.listener
    assert listener is not None
    # the open keep-alive connection (its certificate-expiry timer lives with it in the core)
    assert len(app.peers) == 1 and listener.open_connections == 1
    writer.close()
    await wait_for(
        lambda: not app.peers and not listener.open_connections, 2, "the connection's cleanup"
    )
    assert app.peers == {} and listener.open_connections == 0
