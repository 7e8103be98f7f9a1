"""Cross-origin requests from browsers (CORS): what a preflight is answered, and which headers
every response to a cross-origin request carries. Pure: headers in, headers out.

A browser page on another origin (a chat app calling the API with `fetch()`) first sends a
preflight, `OPTIONS` with `Origin` and `Access-Control-Request-Method`, and then reads the
answer only if it carries `Access-Control-Allow-Origin` for its origin.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Response headers a page may read without their being exposed (the Fetch standard's
# CORS-safelisted response header names).
_SAFELISTED = frozenset({
    "cache-control", "content-language", "content-length", "content-type", "expires",
    "last-modified", "pragma",
})  # fmt: skip
ANY = "*"


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """One `cors:` section. `allow_headers: ["*"]` allows whatever headers a preflight asks for;
    `expose_headers: ["*"]` exposes every header of the response."""

    allow_origins: tuple[str, ...]
    allow_methods: tuple[str, ...] = ("GET", "POST")
    allow_headers: tuple[str, ...] = (ANY,)
    expose_headers: tuple[str, ...] = (ANY,)
    allow_credentials: bool = False
    max_age: int = 600  # seconds a browser may cache a preflight's answer

    def allows(self, origin: str) -> bool:
        return ANY in self.allow_origins or origin in self.allow_origins

    def _origin_headers(self, origin: str) -> dict[str, str]:
        if ANY in self.allow_origins and not self.allow_credentials:
            return {"Access-Control-Allow-Origin": "*"}
        # A named origin, echoed: the answer depends on the request's Origin, so caches must
        # key on it. Credentials are never allowed with `*` (browsers refuse that answer).
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if self.allow_credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def preflight(self, origin: str, method: str, request_headers: str) -> dict[str, str] | None:
        """The headers of a preflight's answer, or None when it is refused (an origin or a
        method not allowed)."""
        if not self.allows(origin) or method.upper() not in self.allow_methods:
            return None
        headers = self._origin_headers(origin)
        headers["Access-Control-Allow-Methods"] = ", ".join(self.allow_methods)
        if ANY in self.allow_headers:
            if request_headers.strip():
                headers["Access-Control-Allow-Headers"] = request_headers.strip()
        else:
            headers["Access-Control-Allow-Headers"] = ", ".join(self.allow_headers)
        headers["Access-Control-Max-Age"] = str(self.max_age)
        return headers

    def response_headers(self, origin: str, present: Iterable[str]) -> dict[str, str]:
        """The headers to add to a response to a request from `origin` whose own header names
        are `present` (nothing when the origin is not allowed)."""
        if not self.allows(origin):
            return {}
        headers = self._origin_headers(origin)
        if ANY in self.expose_headers:
            names = sorted({n.lower() for n in present} - _SAFELISTED)
        else:
            names = list(self.expose_headers)
        if names:
            headers["Access-Control-Expose-Headers"] = ", ".join(names)
        return headers


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return (
        method == "OPTIONS" and "Origin" in headers and ("Access-Control-Request-Method" in headers)
    )
