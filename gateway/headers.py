"""Header hygiene for both directions of the proxy.

Towards the upstream: hop-by-hop headers (and every header named in ``Connection``) go first,
then every client-supplied identity header and forwarding header (``Forwarded``,
``X-Forwarded-*``, ``X-Real-IP``, ``X-Original-URL``, method overrides …) in any spelling, then
the gateway sets its own: ``X-Forwarded-For`` / ``X-Forwarded-Proto``, ``X-Request-Id`` (the
client's when well-formed, else a new one), the identity headers, and ``Host`` (the upstream's
authority unless the route preserves the client's).
A bearer token the gateway did not verify is removed by :func:`strip_bearer` (the pipeline
decides when: routes without a JWT, unless ``forward_authorization``).
From the upstream: hop-by-hop headers go, and a header with CR, LF or NUL is refused (502).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from multidict import CIMultiDict
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
# Set by the gateway or never passed on: a client's values would let it pose as a proxy hop,
# rewrite the URL or method behind the policy check, or claim another address.
FORWARDING_HEADERS = frozenset(
    {
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
        "x-original-url",
        "x-rewrite-url",
        "x-http-method-override",
        "x-http-method",
        "x-method-override",
        "x-request-id",
    }
)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
# Framing headers a client cannot get removed by naming them in Connection.
_PROTECTED = frozenset({"host", "content-length"})
_BAD_VALUE = re.compile(r"[\r\n\x00]")
_BAD_BYTES = re.compile(rb"[\r\n\x00]")
_HOP_BY_HOP_BYTES = frozenset(name.encode("ascii") for name in HOP_BY_HOP)
_SAFE_CLAIM = re.compile(r"^[\x20-\x7e]*$")


def normalize_name(name: str) -> str:
    """Fold case and the ``_`` / ``.`` spellings that some servers treat as ``-``."""
    return name.lower().replace("_", "-").replace(".", "-")


class _RandomIds:
    """32 hex digits from the OS's CSPRNG per request, read 4 KiB at a time (one syscall per
    256 ids); the buffer is dropped in a forked child, so workers never share ids."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def reset(self) -> None:
        self._buf, self._pos = b"", 0

    def next(self) -> str:
        pos = self._pos
        if pos >= len(self._buf):
            self._buf, pos = os.urandom(4096), 0
        self._pos = pos + 16
        return self._buf[pos : pos + 16].hex()


_IDS = _RandomIds()
os.register_at_fork(after_in_child=_IDS.reset)


def identity_header_names(claim_headers: Iterable[str]) -> frozenset[str]:
    """The normalized names the gateway owns: stripped from clients, set by the gateway."""
    return IDENTITY_HEADERS | FORWARDING_HEADERS | {normalize_name(h) for h in claim_headers}


def request_id(values: list[str]) -> str:
    """The client's ``X-Request-Id`` when it sent exactly one well-formed value, else a new
    random one (32 hex digits)."""
    if len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return values[0]
    return _IDS.next()


def _connection_named(headers: CIMultiDict[str]) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", []):
        for raw in value.split(","):
            token = raw.strip().lower()
            if token and token not in _PROTECTED:
                named.add(token)
    return named


def upstream_request_headers(
    incoming: CIMultiDict[str],
    identity: PeerIdentity,
    *,
    owned: frozenset[str],
    xfcc: bool,
    client_cert: bool,
    claim_headers: Mapping[str, str],
    claims: Mapping[str, Any] | None,
    client_address: str | None,
    preserve_host: bool = False,
) -> CIMultiDict[str]:
    """The headers sent upstream, built in the documented order. Without ``preserve_host``
    the client's Host is dropped (the upstream client then sends the upstream's authority)."""
    named = _connection_named(incoming) if "Connection" in incoming else None
    out: CIMultiDict[str] = CIMultiDict()
    add = out.add
    for name, value in incoming.items():
        if _passes(name, owned, preserve_host) and (named is None or name.lower() not in named):
            add(name, value)
    # Every name set below is owned (stripped above): add, never a search-and-replace.
    if client_address is not None:
        add("X-Forwarded-For", client_address)
    add("X-Forwarded-Proto", "https")
    add("X-Request-Id", request_id(incoming.getall("X-Request-Id", [])))
    if xfcc:
        add("X-Forwarded-Client-Cert", identity.xfcc)
    if client_cert:
        add("Client-Cert", identity.client_cert)
    if claims:
        for claim, header in claim_headers.items():
            if claim in claims:
                add(header, claim_value(claims[claim]))
    return out


_PASSES: dict[tuple[str, frozenset[str], bool], bool] = {}
_PASSES_MAX = 4096  # distinct (spelling, owned set, preserve_host) decisions remembered


def _passes(name: str, owned: frozenset[str], preserve_host: bool) -> bool:
    """Whether a client header of this spelling may go upstream (before ``Connection``'s own
    list): not hop-by-hop, not owned by the gateway, not Host unless preserved. Memoized:
    clients send the same few spellings on every request."""
    key = (name, owned, preserve_host)
    verdict = _PASSES.get(key)
    if verdict is None:
        lower = name.lower()
        verdict = (
            lower not in HOP_BY_HOP
            and normalize_name(name) not in owned
            and (preserve_host or lower != "host")
        )
        if len(_PASSES) >= _PASSES_MAX:
            _PASSES.clear()
        _PASSES[key] = verdict
    return verdict


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


def response_header_pairs(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers for the client from the upstream's raw headers, minus hop-by-hop ones and the
    framing the HTTP/1.1 core sets itself (Content-Length); raises :class:`UpstreamError` for
    CR, LF or NUL in a name or value."""
    pairs = list(raw)
    # One pass over every name and value for CR, LF or NUL (joined by a space, never matched).
    if _BAD_BYTES.search(b" ".join([b for pair in pairs for b in pair])):
        raise UpstreamError("bad_upstream_header", "CR, LF or NUL in an upstream header")
    connection_named: set[bytes] = set()
    for name, value in pairs:
        if name.lower() == b"connection":
            connection_named |= {t.strip().lower() for t in value.split(b",") if t.strip()}
    drop = (_DROP | (connection_named - {b"host"})) if connection_named else _DROP
    return [(name, value) for name, value in pairs if name.lower() not in drop]


_DROP = _HOP_BY_HOP_BYTES | {b"content-length"}
