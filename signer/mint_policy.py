"""What a ``Sign`` caller may put in a token beyond its subject: extra claims and audiences.

The signer vouches for every claim it signs, and the gateway forwards verified claims as
identity headers, so a claim is a statement of the signer, not of the caller:

- extra claims are refused unless ``authorization.claims`` names the claim and one of its
  patterns matches the principal (registered claims are refused earlier, by
  :func:`svidgate.signer.jwt.parse_extra_claims`, whatever the config says);
- audiences are free while ``authorization.audiences`` is empty (compatible default); once it
  is set, every requested audience must be listed under a pattern that matches the principal.

The principal is decided by the service: over mTLS TCP the caller's SPIFFE ID, over the Unix
socket (where the caller is the local workload) the token's subject.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from svidgate.pki.matchers import IdMatcher
from svidgate.pki.spiffe_id import SpiffeId
from svidgate.signer.config import AuthorizationConfig
from svidgate.signer.errors import AudienceNotAllowedError, ClaimNotAllowedError


@dataclass(frozen=True, slots=True)
class MintPolicy:
    claims: Mapping[str, IdMatcher]
    audiences: tuple[tuple[IdMatcher, frozenset[str]], ...]

    @classmethod
    def from_config(cls, auth: AuthorizationConfig) -> MintPolicy:
        return cls(
            claims={name: IdMatcher.parse(patterns) for name, patterns in auth.claims.items()},
            audiences=tuple(
                (IdMatcher.parse([pattern]), frozenset(allowed))
                for pattern, allowed in auth.audiences.items()
            ),
        )

    def check(
        self, principal: SpiffeId, claims: Collection[str], audiences: Collection[str]
    ) -> None:
        """Raise ClaimNotAllowedError / AudienceNotAllowedError for the first thing refused."""
        for name in sorted(claims):
            matcher = self.claims.get(name)
            if matcher is None or matcher.match(principal) is None:
                raise ClaimNotAllowedError(
                    f"{name} ({principal} may not set it: see authorization.claims)"
                )
        if not self.audiences:
            return
        granted: set[str] = set()
        for matcher, allowed in self.audiences:
            if matcher.match(principal) is not None:
                granted |= allowed
        for audience in sorted(set(audiences) - granted):
            raise AudienceNotAllowedError(
                f"{audience} ({principal} may not mint it: see authorization.audiences)"
            )
