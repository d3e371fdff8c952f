"""The identity of one client connection, computed once at connection time."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.serialization import Encoding

from pki.spiffe_id import SpiffeId
from pki.svid import X509Svid, thumbprint_sha256, x5t_s256


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Everything a request needs about the caller, precomputed per connection."""

    spiffe_id: SpiffeId
    id_text: str
    leaf_sha256_hex: str
    x5t_s256: str  # base64url SHA-256 of the leaf DER (RFC 8705 cnf.x5t#S256)
    xfcc: str  # By=<gateway>;Hash=<hex>;URI=<client>
    client_cert: str  # RFC 9440: :base64(DER):
    not_after: datetime

    @classmethod
    def from_svid(cls, svid: X509Svid, gateway_id: SpiffeId) -> PeerIdentity:
        leaf = svid.leaf
        digest = thumbprint_sha256(leaf).hex()
        id_text = str(svid.spiffe_id)
        der = leaf.public_bytes(Encoding.DER)
        return cls(
            spiffe_id=svid.spiffe_id,
            id_text=id_text,
            leaf_sha256_hex=digest,
            x5t_s256=x5t_s256(leaf),
            xfcc=f"By={gateway_id};Hash={digest};URI={id_text}",
            client_cert=f":{base64.b64encode(der).decode('ascii')}:",
            not_after=leaf.not_valid_after_utc,
        )
