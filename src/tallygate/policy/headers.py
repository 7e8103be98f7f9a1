"""Header rules of a reverse proxy: hop-by-hop stripping, forwarding headers, credential injection,
and the headers of the response we relay. Pure: header maps in, header maps out.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from tallygate.config.schema import AuthHeader

# RFC 9110 section 7.6.1, plus the legacy Proxy-Connection and Keep-Alive that Go's httputil and
# Caddy strip too. TE is kept when it is exactly "trailers".
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

# Set by aiohttp from the body and URL we pass, or replaced by us.
_REQUEST_RECOMPUTED = frozenset({"host", "content-length", "accept-encoding", "expect"})

Headers = CIMultiDict[str] | CIMultiDictProxy[str]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _connection_named(headers: Headers) -> set[str]:
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def _end_to_end(headers: Headers, also_drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    drop = HOP_BY_HOP | also_drop | _connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in drop or (lower == "te" and value.strip().lower() == "trailers"):
            out.add(name, value)
    return out


def is_trusted(peer: str | None, trusted: tuple[Network, ...]) -> bool:
    if not peer or not trusted:  # nothing trusted (the default): no address to parse
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def client_address(peer: str | None, headers: Headers, trusted: tuple[Network, ...]) -> str | None:
    """Who the client is: the peer, or, when the peer is a trusted proxy, the rightmost address of
    `X-Forwarded-For` that is not one (nginx's `real_ip_recursive`): what a client writes into
    the header itself is never believed past the first untrusted hop."""
    address = peer
    if not is_trusted(peer, trusted):
        return address
    forwarded_for = headers.getall("X-Forwarded-For", ())
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        found = _hop_address(hop)
        if found is None:
            return address  # not an address: the last trusted hop is all we know
        address = found
        if not is_trusted(found, trusted):
            break
    return address


_HOP_WITH_PORT = re.compile(r"^(?:\[([^\]]+)\]|([^:\[\]]+))(?::\d{1,5})?$")


def _hop_address(hop: str) -> str | None:
    """The address of one `X-Forwarded-For` hop, with the port some proxies add (`1.2.3.4:5678`,
    `[2001:db8::1]:443`) left out, as nginx's real_ip reads it; None when it is no address."""
    with_port = _HOP_WITH_PORT.match(hop)
    if with_port is not None:
        hop = with_port[1] or with_port[2]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class ClientSide:
    """What the proxy knows of the client connection."""

    peer: str | None
    scheme: str
    host: str | None
    trusted: bool


def upstream_request_headers(
    client_headers: Headers,
    client: ClientSide,
    api_key: str | None,
    auth_header: AuthHeader,
    drop_client_credentials: bool = False,
) -> CIMultiDict[str]:
    headers = _end_to_end(client_headers, _REQUEST_RECOMPUTED)
    # The proxy reads the body plain (for metering) and compresses toward the client itself.
    headers["Accept-Encoding"] = "identity"

    forwarded_for = client_headers.get("X-Forwarded-For") if client.trusted else None
    if client.peer:
        forwarded_for = f"{forwarded_for}, {client.peer}" if forwarded_for else client.peer
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    else:
        headers.popall("X-Forwarded-For", None)
    proto = client_headers.get("X-Forwarded-Proto") if client.trusted else None
    headers["X-Forwarded-Proto"] = proto or client.scheme
    host = client_headers.get("X-Forwarded-Host") if client.trusted else None
    host = host or client.host
    if host:
        headers["X-Forwarded-Host"] = host
    else:
        headers.popall("X-Forwarded-Host", None)

    if api_key or drop_client_credentials:
        headers.popall("Authorization", None)
        headers.popall("x-api-key", None)
    if api_key:
        if auth_header == "x-api-key":
            headers["x-api-key"] = api_key
        else:
            headers["Authorization"] = f"Bearer {api_key}"
    return headers


def client_response_headers(
    upstream_headers: Headers,
    *,
    decoded: bool,
    gzip: bool,
    event_stream: bool,
    resized: bool = False,
) -> CIMultiDict[str]:
    """The upstream's end-to-end headers, adjusted for what we did to the body.

    `decoded`: we undid the upstream's Content-Encoding; `gzip`: we compress toward the client;
    `resized`: we removed the usage chunk we asked for. Each way the length is no longer the
    upstream's.
    """
    headers = _end_to_end(upstream_headers)
    if decoded or gzip or resized:
        headers.popall("Content-Length", None)
    if decoded:
        headers.popall("Content-Encoding", None)
    if gzip:
        headers["Content-Encoding"] = "gzip"
        vary = [v.strip() for value in headers.getall("Vary", ()) for v in value.split(",")]
        if not any(v.lower() in ("accept-encoding", "*") for v in vary):
            headers.add("Vary", "Accept-Encoding")
    if event_stream:
        # A buffering proxy in front (nginx, a CDN) would otherwise hold events back.
        cache = headers.get("Cache-Control", "").lower()
        if "no-cache" not in cache and "no-store" not in cache:
            headers["Cache-Control"] = "no-cache"
        headers["X-Accel-Buffering"] = "no"
    return headers
