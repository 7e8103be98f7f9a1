"""Warnings about a valid configuration that probably does not do what its author meant: printed
by `tallygate check` and logged when tallygate starts. Pure."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from tallygate.config import Config, Route
from tallygate.policy.routing import canonical_path, path_problem, prefix_matches


def config_warnings(config: Config) -> list[str]:
    return [
        *_unroutable_prefixes(config.routes), *_shadowed_routes(config.routes),
        *_v1_upstreams(config), *_open_relay(config),
    ]  # fmt: skip


def _unroutable_prefixes(routes: tuple[Route, ...]) -> list[str]:
    """Prefixes no routed path can start with: routes see the path without its query, after
    requests with a dangerous path are refused (`path_problem`), in its one spelling
    (`canonical_path`)."""
    found = []
    for i, route in enumerate(routes):
        prefix = route.path_prefix
        if "?" in prefix:
            why = "a routed path never holds '?' (routes match the path, not its query)"
        elif (problem := path_problem(prefix)) is not None:
            why = f"a request whose path holds a {problem} is refused before routing"
        elif (canonical := canonical_path(prefix)) != prefix:
            why = f"requests are routed by the path's one spelling: write it {canonical}"
        else:
            continue
        found.append(f"routes[{i}] ({prefix}) never matches: {why}")
    return found


def _covers(earlier: str, later: str) -> bool:
    """Every path `later` matches, `earlier` matches too."""
    if later == "/":
        return earlier == "/"
    base = later.rstrip("/")
    return prefix_matches(earlier, base) and prefix_matches(earlier, base + "/x")


def _shadowed_routes(routes: tuple[Route, ...]) -> list[str]:
    found = []
    for j, route in enumerate(routes):
        for i, earlier in enumerate(routes[:j]):
            if _covers(earlier.path_prefix, route.path_prefix):
                found.append(
                    f"routes[{j}] ({route.path_prefix}) never matches: routes[{i}] "
                    f"({earlier.path_prefix}) comes first and matches every path it would; "
                    "put the longer prefix first"
                )
                break
    return found


def _v1_upstreams(config: Config) -> list[str]:
    return [
        f"upstreams.{name}.url ends in /v1: clients' base URLs end in /v1 already (the SDKs' "
        f"defaults), so requests would reach {upstream.url.rstrip('/')}/v1/...; "
        "leave /v1 out of the upstream's URL"
        for name, upstream in config.upstreams.items()
        if urlsplit(upstream.url).path.rstrip("/").endswith("/v1")
    ]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name, or all interfaces (""): reachable from elsewhere


def _open_relay(config: Config) -> list[str]:
    keyed = [name for name, upstream in config.upstreams.items() if upstream.api_key]
    if _is_loopback(config.listen.host) or not keyed or config.require_key:
        return []
    return [
        f"listen ({config.listen}) is reachable from other hosts and upstreams "
        f"({', '.join(keyed)}) send your provider keys, but auth.require_key is off: anyone who "
        "reaches tallygate spends on your keys. Issue keys to clients (tenants, "
        "`tallygate hash-key`) and set auth.require_key: true, or listen on 127.0.0.1"
    ]
