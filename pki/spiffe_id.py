"""SPIFFE IDs and trust domains, parsed exactly per the SPIFFE-ID specification.

py-spiffe's ``SpiffeId`` is more lenient than the spec (it lowercases ``spiffe://Example.org``);
this parser refuses instead, and the tests use py-spiffe as an oracle for everything we accept.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from svidgate.pki.errors import InvalidSpiffeIdError

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
_PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """A trust domain name such as ``example.org`` (lowercase, ``[a-z0-9._-]``)."""

    name: str

    def __str__(self) -> str:
        return self.name

    def id(self) -> SpiffeId:
        """The trust domain's own ID, ``spiffe://<name>`` (never a valid workload SVID ID)."""
        return SpiffeId(self, "")


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID; ``path`` is ``""`` (trust domain ID) or ``/seg/seg``."""

    trust_domain: TrustDomain
    path: str

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"

    @property
    def is_trust_domain_id(self) -> bool:
        return self.path == ""

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.path.split("/")[1:]) if self.path else ()


def _check_trust_domain_name(name: str, text: str) -> None:
    if not name:
        raise InvalidSpiffeIdError(f"{text!r}: trust domain is missing")
    if len(name.encode()) > MAX_TRUST_DOMAIN_BYTES:
        raise InvalidSpiffeIdError(
            f"{text!r}: trust domain is longer than {MAX_TRUST_DOMAIN_BYTES} bytes"
        )
    if "@" in name:
        raise InvalidSpiffeIdError(f"{text!r}: userinfo is not allowed in a trust domain")
    for ch in name:
        if ch in _TRUST_DOMAIN_CHARS:
            continue
        if ch == "%":
            raise InvalidSpiffeIdError(f"{text!r}: percent-encoding is not allowed")
        if ch == ":":
            raise InvalidSpiffeIdError(f"{text!r}: a port is not allowed in a trust domain")
        if ch in string.ascii_uppercase:
            raise InvalidSpiffeIdError(f"{text!r}: trust domain must be lowercase")
        raise InvalidSpiffeIdError(
            f"{text!r}: trust domain may contain only a-z, 0-9, '.', '-' and '_' (found {ch!r})"
        )


def _check_path(path: str, text: str) -> None:
    if path.endswith("/"):
        raise InvalidSpiffeIdError(f"{text!r}: path must not end with '/'")
    for segment in path.split("/")[1:]:
        if segment == "":
            raise InvalidSpiffeIdError(f"{text!r}: path has an empty segment")
        if segment in (".", ".."):
            raise InvalidSpiffeIdError(f"{text!r}: path has a '{segment}' segment")
        for ch in segment:
            if ch in _PATH_CHARS:
                continue
            if ch == "%":
                raise InvalidSpiffeIdError(f"{text!r}: percent-encoding is not allowed")
            if ch in "?#":
                raise InvalidSpiffeIdError(f"{text!r}: a query or fragment is not allowed")
            raise InvalidSpiffeIdError(
                f"{text!r}: path may contain only A-Z, a-z, 0-9, '.', '-' and '_' (found {ch!r})"
            )


def parse_trust_domain(text: str) -> TrustDomain:
    """Parse ``example.org`` or the trust domain ID ``spiffe://example.org``."""
    if text.startswith(SCHEME_PREFIX):
        spiffe_id = parse_spiffe_id(text)
        if not spiffe_id.is_trust_domain_id:
            raise InvalidSpiffeIdError(f"{text!r}: a trust domain has no path")
        return spiffe_id.trust_domain
    if "://" in text:
        raise InvalidSpiffeIdError(f"{text!r}: scheme must be 'spiffe://'")
    _check_trust_domain_name(text, text)
    return TrustDomain(text)


def parse_spiffe_id(text: str, *, require_path: bool = False) -> SpiffeId:
    """Parse a SPIFFE ID strictly; ``require_path`` refuses the bare trust domain ID (as an
    X.509-SVID must)."""
    if not isinstance(text, str):
        raise InvalidSpiffeIdError("SPIFFE ID must be a string")
    if not text:
        raise InvalidSpiffeIdError("SPIFFE ID is empty")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidSpiffeIdError(f"SPIFFE ID is longer than {MAX_ID_BYTES} bytes")
    if not text.startswith(SCHEME_PREFIX):
        raise InvalidSpiffeIdError(f"{text!r}: scheme must be 'spiffe://'")
    rest = text[len(SCHEME_PREFIX) :]
    slash = rest.find("/")
    name, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    for ch in "?#":
        if ch in name:
            raise InvalidSpiffeIdError(f"{text!r}: a query or fragment is not allowed")
    _check_trust_domain_name(name, text)
    _check_path(path, text)
    if require_path and not path:
        raise InvalidSpiffeIdError(f"{text!r}: a workload SPIFFE ID needs a path")
    return SpiffeId(TrustDomain(name), path)
