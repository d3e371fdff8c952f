"""Header hygiene for both directions of the proxy.

Towards the upstream: hop-by-hop headers (and every header named in ``Connection``) go first,
then every client-supplied identity header in any spelling, then the gateway sets its own.
A bearer token the gateway did not verify is removed by :func:`strip_bearer` (the pipeline
decides when: routes without a JWT, unless ``forward_authorization``).
From the upstream: hop-by-hop headers go, and a header with CR, LF or NUL is refused (502).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy
from svidgate.gateway.errors import UpstreamError
from svidgate.gateway.identity import PeerIdentity

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
IDENTITY_HEADERS = frozenset(
    {"x-forwarded-client-cert", "x-spiffe-id", "client-cert", "client-cert-chain"}
)
# Framing headers a client cannot get removed by naming them in Connection.
_PROTECTED = frozenset({"host", "content-length"})
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_SAFE_CLAIM = re.compile(r"^[\x20-\x7e]*$")


def normalize_name(name: str) -> str:
    """Fold case and the ``_`` / ``.`` spellings that some servers treat as ``-``."""
    return name.lower().replace("_", "-").replace(".", "-")


def identity_header_names(claim_headers: Iterable[str]) -> frozenset[str]:
    """The normalized names the gateway owns: stripped from clients, set by the gateway."""
    return IDENTITY_HEADERS | {normalize_name(h) for h in claim_headers}


def _connection_named(headers: CIMultiDictProxy[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        for raw in value.split(","):
            token = raw.strip().lower()
            if token and token not in _PROTECTED:
                named.add(token)
    return named


def upstream_request_headers(
    incoming: CIMultiDictProxy[str],
    identity: PeerIdentity,
    *,
    owned: frozenset[str],
    xfcc: bool,
    client_cert: bool,
    claim_headers: Mapping[str, str],
    claims: Mapping[str, Any] | None,
) -> CIMultiDict[str]:
    """The headers sent upstream, built in the documented order."""
    drop = HOP_BY_HOP | _connection_named(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in drop or normalize_name(name) in owned:
            continue
        out.add(name, value)
    if xfcc:
        out["X-Forwarded-Client-Cert"] = identity.xfcc
    if client_cert:
        out["Client-Cert"] = identity.client_cert
    if claims:
        for claim, header in claim_headers.items():
            if claim in claims:
                out[header] = claim_value(claims[claim])
    return out


def is_bearer(value: str) -> bool:
    """True for an ``Authorization`` value that an upstream could read as a Bearer credential:
    it starts with ``bearer`` in any case, whatever follows (``Bearer x``, ``bearer``,
    ``Bearer,x``). Fail closed: a made-up scheme that merely starts so is removed too."""
    return value.lstrip(" \t").lower().startswith("bearer")


def strip_bearer(headers: CIMultiDict[str]) -> int:
    """Remove every ``Authorization: Bearer …`` value, keep other schemes (Basic, …) in order;
    returns how many were removed."""
    values = headers.getall("Authorization", [])
    kept = [v for v in values if not is_bearer(v)]
    if len(kept) == len(values):
        return 0
    headers.popall("Authorization")
    for value in kept:
        headers.add("Authorization", value)
    return len(values) - len(kept)


def claim_value(value: Any) -> str:
    """A claim as a header value: plain printable ASCII strings as is, anything else as JSON."""
    if isinstance(value, str) and _SAFE_CLAIM.fullmatch(value):
        return value
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def downstream_response_headers(raw: Iterable[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """Headers for the client from the upstream's raw headers; raises :class:`UpstreamError`."""
    pairs: list[tuple[str, str]] = []
    connection_named: set[str] = set()
    for raw_name, raw_value in raw:
        name = raw_name.decode("latin-1")
        value = raw_value.decode("latin-1")
        if _BAD_VALUE.search(name) or _BAD_VALUE.search(value):
            raise UpstreamError("bad_upstream_header", "CR, LF or NUL in an upstream header")
        if name.lower() == "connection":
            connection_named |= {t.strip().lower() for t in value.split(",") if t.strip()}
        pairs.append((name, value))
    drop = HOP_BY_HOP | (connection_named - _PROTECTED)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in pairs:
        if name.lower() not in drop:
            out.add(name, value)
    return out
