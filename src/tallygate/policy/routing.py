"""Which upstream a request path goes to. Pure."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from tallygate.config.schema import Route


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


_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_NOT_ASCII = re.compile(r"[^\x00-\x7f]+")


def canonical_path(path: str) -> str:
    """The one spelling of a request path (as sent, without its query) that tallygate routes,
    meters and forwards: escapes of unreserved characters decoded (`%63ompletions` is
    `completions`, RFC 3986 6.2.2.2), bytes above 0x7F escaped, every other escape kept as sent.
    Forwarded as it is, never decoded again, so the upstream sees the path that was routed."""
    if "%" in path:
        path = _ESCAPE.sub(_unreserved, path)
    if not path.isascii():
        path = _NOT_ASCII.sub(_escaped, path)
    return path


def _unreserved(escape: re.Match[str]) -> str:
    char = chr(int(escape[1], 16))
    return char if char in _UNRESERVED else escape[0]


def _escaped(run: re.Match[str]) -> str:
    # aiohttp decodes a head with surrogateescape: this gives back the bytes that were sent.
    return "".join(f"%{byte:02X}" for byte in run[0].encode("utf-8", "surrogateescape"))


def path_problem(path: str) -> str | None:
    """Why a request path (as sent, without its query) could escape its route's base path, or
    None. Refused, as nginx does with `..` past the root and Envoy with escaped slashes: dot
    segments in any spelling (`..`, `%2e%2e`), backslashes, and encoded slashes, backslashes or
    control characters, which an upstream may decode into a path of its own."""
    if "%" not in path and "." not in path and "\\" not in path and "#" not in path:
        return None  # nearly every API path: nothing to look at
    if "#" in path:
        return "fragment"  # never sent by a client; an upstream URL would drop what follows
    if "\\" in path:
        return "backslash"
    for escape in _ESCAPE.findall(path):
        code = int(escape, 16)
        if code in (0x2F, 0x5C):
            return "encoded slash or backslash"
        if code < 0x20 or code == 0x7F:
            return "encoded control character"
    for segment in path.split("/"):
        # `..;x` too: servlet containers drop the `;x` path parameter and then see `..`.
        segment = segment.split(";", 1)[0]
        if segment.replace("%2e", ".").replace("%2E", ".") in (".", ".."):
            return "dot segment"
    return None
