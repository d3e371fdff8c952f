"""Authorization: default deny; per route an allow list of SPIFFE ID patterns (pki matchers).

:meth:`Policy.authorize` is what the request pipeline calls: it returns the allowing decision
or raises a :class:`PolicyDenial` carrying the denying one (:class:`IdentityDenied`, a 403
:class:`Forbidden`, or :class:`RouteNotFound`, a 404 :class:`NoRoute`). :meth:`Policy.explain`
returns the same decision as data, for the CLI. A decision names the route, the rule that
admitted the caller and the reason: what the audit log records.
"""

from __future__ import annotations

from dataclasses import dataclass

from svidgate.gateway.config import GatewayConfig
from svidgate.gateway.errors import Forbidden, NoRoute, RequestError
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


class PolicyDenial(RequestError):
    """Policy refused the request; ``decision`` says why (route, reason) for the audit log."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.reason)
        self.decision = decision


class IdentityDenied(PolicyDenial, Forbidden):
    """A route matches, but not for this caller or this method: 403."""


class RouteNotFound(PolicyDenial, NoRoute):
    """No route's path prefix matches: 404."""


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
        """The allowing decision, or raise :class:`RouteNotFound` (no route) /
        :class:`IdentityDenied` (method or identity not allowed) with the denying one."""
        decision = self.explain(spiffe_id, method, path)
        if decision.allowed:
            return decision
        if decision.route is None:
            raise RouteNotFound(decision)
        raise IdentityDenied(decision)
