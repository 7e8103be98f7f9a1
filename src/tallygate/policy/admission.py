"""Admission: whether tallygate takes a request, decided from its head before any of its body
is read. Pure: the proxy hands it what the head says and acts on the answer.

The checks run in this order, and the first that fails answers: the connection and stream
caps (503), CONNECT (405), a target that is not a path (400), a path that could escape a route
(400), a CORS preflight (answered here, never relayed), the key (401, before a 404, so that who
has no key learns nothing of the routes), the route (404), the declared body size (413).
Budgets and rate limits join this list.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple, cast

from tallygate.config.schema import Config, Route
from tallygate.core import errors
from tallygate.core.dialects import ApiFamily, Dialect, detect_dialect, family_for
from tallygate.core.errors import ProxyError
from tallygate.policy.cors import CorsPolicy, is_preflight
from tallygate.policy.headers import is_trusted
from tallygate.policy.routing import Router, canonical_path, path_problem
from tallygate.policy.tenants import Identity, Tenants


class Admitted(NamedTuple):
    route: Route
    target: str  # the path in its one spelling, and the query as sent
    spoken: Dialect  # the API the route speaks (its dialect, or the one its path names)
    identity: Identity
    trusted: bool  # the peer is a trusted proxy: its forwarding headers are believed


@dataclass(frozen=True, slots=True)
class Refused:
    error: ProxyError
    close: bool = False  # close the connection after answering


@dataclass(frozen=True, slots=True)
class Preflight:
    """A CORS preflight, answered by tallygate itself."""


PREFLIGHT = Preflight()


@dataclass(slots=True)
class Decision:
    """The answer, and what the proxy needs to answer in the right shape whatever it is."""

    verdict: Admitted | Refused | Preflight
    family: ApiFamily  # whose error shape the client gets
    cors: tuple[CorsPolicy, str] | None  # a cross-origin request's policy and origin


class Admission:
    def __init__(self, config: Config, router: Router, tenants: Tenants) -> None:
        self.config = config
        self.router = router
        self.tenants = tenants

    def decide(
        self,
        method: str,
        raw_target: str,
        path: str,
        headers: Mapping[str, str],
        peer: str | None,
        content_length: int | None,
        over_connection_limit: bool,
        active_streams: int,
    ) -> Decision:
        """`path` is the target's path as the HTTP layer decoded it (for the error shape until a
        route is found, and for the CORS policy); `raw_target` is the target as sent."""
        config, limits = self.config, self.config.limits
        # Until a route says otherwise, errors take the shape of the API the path names (worked
        # out when needed: most requests are admitted, in their route's shape).
        decision = Decision(PREFLIGHT, "openai", None)
        origin = headers.get("Origin")
        if origin is not None:  # a browser's cross-origin request: every answer says CORS
            cors = config.cors_for(self.router.match(path))
            if cors is not None:
                decision.cors = (cors, origin)
        refusal: ProxyError | None = None
        close = False
        if limits.max_connections and over_connection_limit:
            refusal = errors.overloaded("connections", limits.max_connections)
            close = True
        elif limits.max_streams and active_streams > limits.max_streams:
            refusal = errors.overloaded("streams", limits.max_streams)
        elif method == "CONNECT":
            refusal = errors.method_refused("CONNECT")
        elif not raw_target.startswith("/"):
            refusal = errors.not_a_proxy("a request target not starting with /")
        if refusal is not None:
            decision.verdict = Refused(refusal, close)
            decision.family = family_for(detect_dialect(path), path)
            return decision
        route_path, mark, query = raw_target.partition("?")
        route_path = canonical_path(route_path)
        problem = path_problem(route_path) or ("fragment" if "#" in query else None)
        if problem is not None:
            decision.verdict = Refused(errors.path_refused(problem))
            decision.family = family_for(detect_dialect(path), path)
            return decision
        if decision.cors is not None and is_preflight(method, headers):
            decision.family = family_for(detect_dialect(path), path)
            return decision  # PREFLIGHT

        route = self.router.match(route_path)
        spoken: Dialect = "none"
        if route is not None:  # errors take the shape of the route's API
            auto = route.dialect == "auto"
            spoken = detect_dialect(route_path) if auto else cast(Dialect, route.dialect)
            decision.family = family_for(spoken, route_path)
        else:
            decision.family = family_for(detect_dialect(path), path)
        trusted = is_trusted(peer, config.trusted_proxies)
        identity = self.tenants.identify(headers, trusted)
        if identity is None:
            decision.verdict = Refused(errors.unauthorized())
        elif route is None:
            decision.verdict = Refused(errors.no_route(path))
        elif content_length is not None and content_length > limits.max_request_bytes:
            decision.verdict = Refused(errors.too_large(limits.max_request_bytes))
        else:
            target = route_path + mark + query
            decision.verdict = Admitted(route, target, spoken, identity, trusted)
        return decision
