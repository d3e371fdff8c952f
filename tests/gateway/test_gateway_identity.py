"""PeerIdentity (pure): the per-connection values agree with pki's definitions."""

from __future__ import annotations

import base64
import hashlib

from cryptography.hazmat.primitives.serialization import Encoding
from support.pki import Pki
from svidgate.gateway.identity import PeerIdentity
from svidgate.pki.spiffe_id import parse_spiffe_id
from svidgate.pki.svid import X509Svid, x5t_s256


def test_identity_values(pki: Pki) -> None:
    issued = pki.ca.issue("spiffe://example.org/ns/shop/sa/web")
    svid = X509Svid(issued.spiffe_id, issued.leaf, ())
    gateway = parse_spiffe_id("spiffe://example.org/gateway")
    ident = PeerIdentity.from_svid(svid, gateway)
    der = issued.leaf.public_bytes(Encoding.DER)
    digest = hashlib.sha256(der).hexdigest()
    assert ident.x5t_s256 == x5t_s256(issued.leaf)
    assert ident.xfcc == (
        f"By=spiffe://example.org/gateway;Hash={digest};URI=spiffe://example.org/ns/shop/sa/web"
    )
    assert ident.client_cert == f":{base64.b64encode(der).decode()}:"
    assert ident.not_after == issued.leaf.not_valid_after_utc
