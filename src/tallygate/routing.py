"""Which upstream a request path goes to. Pure."""

from __future__ import annotations

from collections.abc import Sequence

from .config import Route


def prefix_matches(prefix: str, path: str) -> bool:
    """Prefixes match whole path segments: `/v1/messages` matches `/v1/messages/count_tokens`
    but not `/v1/messagesX`."""
    if prefix.endswith("/"):
        return path.startswith(prefix) or path == prefix[:-1]
    return path == prefix or path.startswith(prefix + "/")


class Router:
    __slots__ = ("_routes",)

    def __init__(self, routes: Sequence[Route]) -> None:
        self._routes = tuple(routes)

    def match(self, path: str) -> Route | None:
        """The first route whose prefix matches."""
        for route in self._routes:
            if prefix_matches(route.path_prefix, path):
                return route
        return None


def upstream_url(base_url: str, raw_path_and_query: str) -> str:
    """Base URL path + request path, query kept, bytes as the client sent them."""
    return base_url.rstrip("/") + raw_path_and_query
