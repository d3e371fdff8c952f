"""The identity of one client connection, computed once at connection time, and a cache of
verified client chains so a returning client's chain is not re-verified on every connection."""

from __future__ import annotations

import base64
import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.hazmat.primitives.serialization import Encoding
from svidgate.pki.bundle import BundleSet
from svidgate.pki.jose import b64url_encode
from svidgate.pki.spiffe_id import SpiffeId
from svidgate.pki.svid import X509Svid, parse_raw_chain, thumbprint_sha256, verify_x509_svid

DEFAULT_CHAIN_CACHE_ENTRIES = 4096


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Everything a request needs about the caller, precomputed per connection."""

    spiffe_id: SpiffeId
    id_text: str
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
            x5t_s256=b64url_encode(digest),
            xfcc=f"By={gateway_id};Hash={hex_digest};URI={id_text}",
            leaf_der=leaf.public_bytes(Encoding.DER),
            not_after=leaf.not_valid_after_utc,
        )


def chain_key(ders: Sequence[bytes], generation: int) -> bytes:
    """SHA-256 over the generation and every presented certificate (length-prefixed DER)."""
    h = hashlib.sha256(generation.to_bytes(8, "big"))
    for der in ders:
        h.update(len(der).to_bytes(4, "big"))
        h.update(der)
    return h.digest()


@dataclass(frozen=True, slots=True)
class _Verified:
    identity: PeerIdentity
    valid_from: datetime  # latest notBefore of the chain and the trust domain's roots
    valid_until: datetime  # earliest notAfter of the same


class VerifiedChainCache:
    """Bounded LRU: (presented chain, state generation) → the identity it verified to.

    An entry is used only while ``now`` lies inside every certificate's validity (the chain's
    and its trust domain's roots), and only for the same generation of bundles and gateway ID;
    the owner clears it on every reload. Only a successful verification is stored."""

    def __init__(self, max_entries: int = DEFAULT_CHAIN_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def identify(
        self,
        ders: Sequence[bytes],
        *,
        generation: int,
        bundles: BundleSet,
        gateway_id: SpiffeId,
        now: datetime,
    ) -> PeerIdentity:
        """The identity of a non-empty presented chain, verified (or found verified) at ``now``;
        raises PkiError (never cached) when it does not verify."""
        if not ders:
            raise ValueError("an empty chain is never looked up in the cache")
        key = chain_key(ders, generation)
        entry = self._entries.get(key)
        if entry is not None:
            if entry.valid_from <= now <= entry.valid_until:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry.identity
            del self._entries[key]
        self.misses += 1
        chain = parse_raw_chain(ders)
        svid = verify_x509_svid(chain[0], chain[1:], bundles, now=now)
        identity = PeerIdentity.from_svid(svid, gateway_id)
        roots = bundles.get(svid.spiffe_id.trust_domain).x509_authorities
        # The roots the chain can end at (by name); all of them if none matches by name.
        top = chain[-1]
        anchors = [r for r in roots if r.subject == top.issuer or r == top] or list(roots)
        certs = [*chain, *anchors]
        self._entries[key] = _Verified(
            identity,
            valid_from=max(c.not_valid_before_utc for c in certs),
            valid_until=min(c.not_valid_after_utc for c in certs),
        )
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return identity
