"""The identity of one client connection, computed once at connection time."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.serialization import Encoding

from pki.spiffe_id import SpiffeId
from pki.svid import X509Svid, thumbprint_sha256


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Everything a request needs about the caller, precomputed per connection."""

    spiffe_id: SpiffeId
    id_text: str
    leaf_sha256_hex: str
    x5t_s256: str  # base64url (no padding) SHA-256 of the leaf DER (RFC 8705 cnf.x5t#S256)
    xfcc: str  # By=<gateway>;Hash=<hex>;URI=<client>
    leaf_der: bytes
    not_after: datetime

    @property
    def client_cert(self) -> str:
        """RFC 9440 ``Client-Cert`` value: ``:base64(DER):`` (built only when configured)."""
        return f":{base64.b64encode(self.leaf_der).decode('ascii')}:"

    @classmethod
    def from_svid(cls, svid: X509Svid, gateway_id: SpiffeId) -> PeerIdentity:
        leaf = svid.leaf
        digest = thumbprint_sha256(leaf)  # one hash serves XFCC's Hash and cnf.x5t#S256
        hex_digest = digest.hex()
        id_text = str(svid.spiffe_id)
        return cls(
            spiffe_id=svid.spiffe_id,
            id_text=id_text,
            leaf_sha256_hex=hex_digest,
            x5t_s256=base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii"),
            xfcc=f"By={gateway_id};Hash={hex_digest};URI={id_text}",
            leaf_der=leaf.public_bytes(Encoding.DER),
            not_after=leaf.not_valid_after_utc,
        )
