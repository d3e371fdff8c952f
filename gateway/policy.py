"""Authorization: default deny; per route an allow list of SPIFFE ID patterns (pki matchers).

:meth:`Policy.authorize` raises :class:`Forbidden` / :class:`NoRoute`; :meth:`Policy.explain`
returns the same decision as data (route, rule, reason) for the audit log and the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass

from svidgate.gateway.config import GatewayConfig
from svidgate.gateway.errors import Forbidden, NoRoute
from svidgate.gateway.routes import Route, RouteTable
from svidgate.pki.matchers import IdMatcher
from svidgate.pki.spiffe_id import SpiffeId

ALLOWED = "allowed"
NO_ROUTE = "no_route"
METHOD_NOT_ALLOWED = "method_not_allowed"
IDENTITY_NOT_ALLOWED = "identity_not_allowed"


@dataclass(frozen=True, slots=True)
class Decision:
    """Why a request is allowed or denied; ``rule`` is the pattern that admitted the caller."""

    allowed: bool
    reason: str
    route: Route | None
    rule: str | None = None

    def describe(self) -> str:
        route = self.route.name if self.route is not None else "-"
        if self.allowed:
            return f"ALLOW route={route} rule={self.rule}"
        return f"DENY route={route} reason={self.reason}"


class Policy:
    """The route table plus one compiled allow list per route."""

    __slots__ = ("_matchers", "table")

    def __init__(self, table: RouteTable, matchers: dict[int, IdMatcher]) -> None:
        self.table = table
        self._matchers = matchers

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> Policy:
        table = RouteTable.from_config(cfg)
        matchers = {i: IdMatcher.parse(r.allow) for i, r in enumerate(cfg.routes)}
        return cls(table, matchers)

    def matcher(self, route: Route) -> IdMatcher:
        return self._matchers[route.index]

    def explain(self, spiffe_id: SpiffeId, method: str, path: str) -> Decision:
        """Decide for a canonical path (see :func:`svidgate.gateway.routes.canonical_path`)."""
        found = self.table.match(path, method)
        if found is None:
            return Decision(False, NO_ROUTE, None)
        if not found.method_allowed:
            return Decision(False, METHOD_NOT_ALLOWED, found.route)
        pattern = self._matchers[found.route.index].match(spiffe_id)
        if pattern is None:
            return Decision(False, IDENTITY_NOT_ALLOWED, found.route)
        return Decision(True, ALLOWED, found.route, pattern.text)

    def authorize(self, spiffe_id: SpiffeId, method: str, path: str) -> Decision:
        """The allowing decision, or raise :class:`NoRoute` / :class:`Forbidden`."""
        decision = self.explain(spiffe_id, method, path)
        if decision.allowed:
            return decision
        if decision.route is None:
            raise NoRoute(NO_ROUTE)
        raise Forbidden(decision.reason)
