"""Reading the YAML configuration: parsed, interpolated and validated once, into the frozen
dataclasses of `tallygate.config.schema`.

Every problem is reported with the dotted path of the offending key, all problems at once, so that
`tallygate check` can list them. This module reads the file and the environment (for `${VAR}`) and
nothing else: it does not open sockets or touch the event loop.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import os
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from tallygate.config.schema import (
    AUTH_HEADERS,
    DEFAULT_LISTEN,
    DEFAULT_SHUTDOWN_GRACE,
    DIALECT_CHOICES,
    ENCODING_CHOICES,
    Admin,
    AuthHeader,
    Compression,
    Config,
    ConfigError,
    Egress,
    GiB,
    KiB,
    Ledger,
    Limits,
    Listen,
    Metering,
    Metrics,
    MiB,
    OnDisconnect,
    Pool,
    Pricing,
    Route,
    Tenant,
    Timeouts,
    Tls,
    Upstream,
)
from tallygate.core.pricing import EgressTier, TokenPrice, parse_token_price
from tallygate.core.record import DIRECTIONS
from tallygate.policy.attribution import Attribution, source_problem
from tallygate.policy.cors import CorsPolicy

# ---------------------------------------------------------------------------------------------
# Scalars with units

# A space may part a number from its unit: `30 s`, `1h 30m`.
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*$|^\s*((?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*)+)$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1, "B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB, "k": KiB, "K": KiB, "M": MiB, "G": GiB,
    "KB": 1000, "MB": 1000**2, "GB": 1000**3,
}  # fmt: skip


def parse_duration(value: object) -> float:
    """`250ms`, `30s`, `5m`, `1h`, `1d`, combined as `2h30m`, or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value)
        match = _DURATION.match(text)
        if not match:
            if text.strip().startswith("-") and _DURATION.match(text.strip()[1:]):
                raise ValueError(f"must be positive, got {value!r}")
            raise ValueError(f"expected a duration like 250ms, 30s, 5m or 2h30m, got {value!r}")
        if match[1] is not None:
            seconds = float(match[1])
        else:
            seconds = sum(
                float(number) * _DURATION_UNITS[unit]
                for number, unit in _DURATION_PART.findall(match[2])
            )
    if seconds <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return seconds


def parse_size(value: object) -> int:
    """`512KiB`, `32MiB`, or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 32MiB, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if not match:
            if str(value).strip().startswith("-") and _SIZE.match(str(value).strip()[1:]):
                raise ValueError(f"must be positive, got {value!r}")
            raise ValueError(f"expected a size like 512KiB or 32MiB, got {value!r}")
        size = int(match[1]) * _SIZE_UNITS[match[2]]
    if size <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return size


def parse_listen(value: object) -> Listen:
    """`host:port`, `[v6]:port` or `:port` (all interfaces)."""
    text = str(value).strip()
    match = re.match(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]*)):(\d{1,5})$", text)
    if not match or not 0 <= int(match[3]) <= 65535:
        raise ValueError(f"expected host:port, got {value!r}")
    host = match[1] or match[2] or "0.0.0.0"
    return Listen(host, int(match[3]))


# ---------------------------------------------------------------------------------------------
# ${VAR} interpolation

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(node: object, path: str, env: Mapping[str, str], problems: list[str]) -> object:
    if isinstance(node, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match[1], match[2]
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(
                f"{path}: environment variable {name} is not set "
                f"(write ${{{name}:-}} to make it optional)"
            )
            return ""

        return _VAR.sub(substitute, node)
    if isinstance(node, dict):
        return {k: _interpolate(v, _join(path, k), env, problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(node)]
    return node


# ---------------------------------------------------------------------------------------------
# The reader: walks the YAML tree, collects problems, falls back to defaults so it can go on.

T = TypeVar("T")


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


class _Reader:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def mapping(self, raw: object, path: str, known: Iterable[str]) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.problems.append(f"{path or 'config'}: expected a mapping, got {_kind(raw)}")
            return {}
        known = list(known)
        for key in raw:
            if key not in known:
                hint = difflib.get_close_matches(str(key), known, n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                self.problems.append(f"{_join(path, key)}: unknown key{suggestion}")
        return {k: v for k, v in raw.items() if k in known}

    def value(
        self,
        raw: Mapping[str, Any],
        key: str,
        path: str,
        convert: Callable[[object], T],
        default: T,
    ) -> T:
        if key not in raw or raw[key] is None:
            return default
        try:
            return convert(raw[key])
        except ValueError as error:
            self.problems.append(f"{_join(path, key)}: {error}")
            return default


def _kind(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "a string" if isinstance(value, str) else type(value).__name__


# ${VAR} makes strings: typed keys also take the string forms of their values.
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _bool(value: object) -> bool:
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _int_in(low: int, high: int) -> Callable[[object], int]:
    def convert(value: object) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number from {low} to {high}, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}, got {value}")
        return value

    return convert


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_kind(value)}")
    return value


def _url(value: object) -> str:
    text = _string(value).strip()
    parts = urlsplit(text)
    # First, so that no message below repeats a URL that holds a password.
    if parts.username is not None or parts.password is not None:
        raise ValueError("credentials in the URL are not supported: use api_key")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http:// or https:// URL, got {text!r}")
    if parts.query or parts.fragment:
        raise ValueError("a base URL takes no query or fragment")
    return text.rstrip("/")


def _path_prefix(value: object) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    return text


def _auth_header(value: object) -> AuthHeader:
    text = _string(value).lower()
    for choice in AUTH_HEADERS:
        if text == choice:
            return choice
    raise ValueError(f"expected one of {', '.join(AUTH_HEADERS)}, got {value!r}")


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def convert(value: object) -> str:
        text = _string(value)
        if text not in choices:
            hint = difflib.get_close_matches(text, choices, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ValueError(f"expected one of {', '.join(choices)}, got {text!r}{suggestion}")
        return text

    return convert


def _on_disconnect(value: object) -> OnDisconnect:
    text = _choice(("cancel", "drain"))(value)
    return "drain" if text == "drain" else "cancel"


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise ValueError(f"expected an IP address or CIDR block, got {value!r}") from None


def _default_auth_header(url: str) -> AuthHeader:
    # Anthropic's API takes its key in x-api-key; every OpenAI-compatible API (and Ollama behind an
    # auth proxy) takes a bearer token. `auth_header` overrides this guess.
    host = urlsplit(url).hostname or ""
    return (
        "x-api-key"
        if host == "anthropic.com" or host.endswith(".anthropic.com")
        else "authorization"
    )


def _read_timeouts(r: _Reader, raw: object, path: str) -> Timeouts:
    m = r.mapping(raw, path, [f.name for f in fields(Timeouts)])
    d = Timeouts()
    return Timeouts(
        connect=r.value(m, "connect", path, parse_duration, d.connect),
        first_byte=r.value(m, "first_byte", path, parse_duration, d.first_byte),
        idle=r.value(m, "idle", path, parse_duration, d.idle),
        total=r.value(m, "total", path, parse_duration, d.total),
    )


def _read_limits(r: _Reader, m: Mapping[str, Any]) -> Limits:
    d, path = Limits(), "limits"
    return Limits(
        max_request_bytes=r.value(m, "max_request_bytes", path, parse_size, d.max_request_bytes),
        max_header_bytes=r.value(m, "max_header_bytes", path, parse_size, d.max_header_bytes),
        max_headers=r.value(m, "max_headers", path, _int_in(1, 10_000), d.max_headers),
        header_timeout=r.value(m, "header_timeout", path, parse_duration, d.header_timeout),
        body_timeout=r.value(m, "body_timeout", path, parse_duration, d.body_timeout),
        write_timeout=r.value(m, "write_timeout", path, parse_duration, d.write_timeout),
        max_connections=r.value(
            m, "max_connections", path, _int_in(0, 10_000_000), d.max_connections
        ),
        max_streams=r.value(m, "max_streams", path, _int_in(0, 10_000_000), d.max_streams),
        retry_after=r.value(m, "retry_after", path, _int_in(0, 86_400), d.retry_after),
    )


def _read_listen(r: _Reader, raw: object) -> Listen:
    """`host:port`, or `{address: host:port, tls: {cert, key}}` to serve HTTPS."""
    if not isinstance(raw, dict):
        return r.value({"listen": raw}, "listen", "", parse_listen, DEFAULT_LISTEN)
    m = r.mapping(raw, "listen", ["address", "tls"])
    where = r.value(m, "address", "listen", parse_listen, DEFAULT_LISTEN)
    if "tls" not in m:
        return where
    t = r.mapping(m["tls"], "listen.tls", ["cert", "key"])
    for key in ("cert", "key"):
        if key not in t:
            r.problems.append(f"listen.tls.{key}: required")
    tls = Tls(
        r.value(t, "cert", "listen.tls", _string, ""), r.value(t, "key", "listen.tls", _string, "")
    )
    if tls.cert and tls.key:
        # Loaded now, so that a wrong path or a key that does not match fails `check`, not a
        # first connection.
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as error:
            r.problems.append(f"listen.tls: cannot load the certificate and key: {error}")
    return Listen(where.host, where.port, tls)


def _read_upstreams(r: _Reader, raw: object) -> dict[str, Upstream]:
    if not isinstance(raw, dict) or not raw:
        r.problems.append("upstreams: at least one upstream is required")
        return {}
    upstreams = {}
    for name, spec in raw.items():
        path = f"upstreams.{name}"
        m = r.mapping(spec, path, ["url", "api_key", "auth_header", "timeouts"])
        if "url" not in m:
            r.problems.append(f"{path}.url: required")
        url = r.value(m, "url", path, _url, "http://invalid")
        api_key = r.value(m, "api_key", path, _string, "") or None
        upstreams[str(name)] = Upstream(
            name=str(name),
            url=url,
            api_key=api_key,
            auth_header=r.value(m, "auth_header", path, _auth_header, _default_auth_header(url)),
            timeouts=_read_timeouts(r, m.get("timeouts"), f"{path}.timeouts"),
        )
    return upstreams


def _read_routes(r: _Reader, raw: object, upstreams: Mapping[str, Upstream]) -> tuple[Route, ...]:
    if not isinstance(raw, list) or not raw:
        r.problems.append("routes: at least one route is required (a list)")
        return ()
    routes = []
    for i, spec in enumerate(raw):
        path = f"routes[{i}]"
        m = r.mapping(spec, path, ["path_prefix", "upstream", "dialect", "cors"])
        for key in ("path_prefix", "upstream"):
            if key not in m:
                r.problems.append(f"{path}.{key}: required")
        upstream = r.value(m, "upstream", path, _string, "")
        if upstream and upstream not in upstreams and upstreams:
            known = ", ".join(upstreams)
            r.problems.append(f"{path}.upstream: unknown upstream '{upstream}' (known: {known})")
        routes.append(
            Route(
                r.value(m, "path_prefix", path, _path_prefix, "/"),
                upstream,
                r.value(m, "dialect", path, _choice(DIALECT_CHOICES), "auto"),
                False if m.get("cors") is False else _read_cors(r, m.get("cors"), f"{path}.cors"),
            )
        )
    return tuple(routes)


_CORS_KEYS = [f.name for f in fields(CorsPolicy)]
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _strings(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError("expected a list of strings")
    return tuple(v.strip() for v in value)


def _origins(value: object) -> tuple[str, ...]:
    origins = _strings(value)
    for origin in origins:
        if origin != "*" and (
            not re.fullmatch(r"https?://[^/\s]+", origin) or origin.endswith(":")
        ):
            raise ValueError(
                f"'{origin}' is not an origin: `*`, or scheme://host[:port] with no path"
            )
    return origins


def _methods(value: object) -> tuple[str, ...]:
    methods = tuple(m.upper() for m in _strings(value))
    for method in methods:
        if method not in _METHODS:
            raise ValueError(f"unknown method '{method}' (known: {', '.join(_METHODS)})")
    return methods


def _read_cors(r: _Reader, raw: object, path: str) -> CorsPolicy | None:
    if raw is None:
        return None
    m = r.mapping(raw, path, _CORS_KEYS)
    if "allow_origins" not in m:
        r.problems.append(f"{path}.allow_origins: required (a list of origins, or `*`)")
        return None
    d = CorsPolicy(allow_origins=())
    policy = CorsPolicy(
        allow_origins=r.value(m, "allow_origins", path, _origins, ()),
        allow_methods=r.value(m, "allow_methods", path, _methods, d.allow_methods),
        allow_headers=r.value(m, "allow_headers", path, _strings, d.allow_headers),
        expose_headers=r.value(m, "expose_headers", path, _strings, d.expose_headers),
        allow_credentials=r.value(m, "allow_credentials", path, _bool, d.allow_credentials),
        max_age=int(r.value(m, "max_age", path, parse_duration, float(d.max_age))),
    )
    if policy.allow_credentials and "*" in policy.allow_origins:
        r.problems.append(
            f"{path}.allow_credentials: browsers refuse credentials with any origin (`*`): "
            "name the origins"
        )
    return policy


TOP_KEYS = [
    "listen", "admin", "upstreams", "routes", "compression", "limits", "pool", "trusted_proxies",
    "shutdown_grace", "metering", "access_log", "metrics", "pricing", "tenants", "tenant_header",
    "auth", "workers", "cors", "ledger", "attribution",
]  # fmt: skip


def _workers(value: object) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    return _int_in(1, 256)(value)


_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")


def _number(value: object) -> float:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            value = float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"expected a number >= 0, got {value!r}")
    return float(value)


def _read_pricing(r: _Reader, raw: object) -> Pricing:
    m = r.mapping(raw, "pricing", ["models", "egress"])
    models: dict[str, TokenPrice] = {}
    raw_models = m.get("models") or {}
    if not isinstance(raw_models, dict):
        r.problems.append("pricing.models: expected a mapping of model names or globs to prices")
        raw_models = {}
    for name, spec in raw_models.items():
        try:
            models[str(name)] = parse_token_price(spec, f"pricing.models.{name}")
        except ValueError as error:
            r.problems.append(str(error))
    e = r.mapping(m.get("egress"), "pricing.egress",
                  ["usd_per_gb", "free_gb", "tiers", "directions", "gb_bytes"])  # fmt: skip
    d = Egress()
    tiers = []
    for i, tier in enumerate(e.get("tiers") or []):
        path = f"pricing.egress.tiers[{i}]"
        t = r.mapping(tier, path, ["up_to_gb", "usd_per_gb"])
        if "usd_per_gb" not in t:
            r.problems.append(f"{path}.usd_per_gb: required")
        up_to = r.value(t, "up_to_gb", path, _number, -1.0)
        tiers.append(
            EgressTier(None if up_to < 0 else up_to, r.value(t, "usd_per_gb", path, _number, 0.0))
        )
    bounded = [t.up_to_gb for t in tiers if t.up_to_gb is not None]
    if bounded != sorted(bounded):
        r.problems.append("pricing.egress.tiers: up_to_gb must increase from tier to tier")
    directions = e.get("directions", list(d.directions))
    if not isinstance(directions, list):
        r.problems.append("pricing.egress.directions: expected a list")
        directions = list(d.directions)
    for i, direction in enumerate(directions):
        if direction not in DIRECTIONS:
            r.problems.append(
                f"pricing.egress.directions[{i}]: expected one of {', '.join(DIRECTIONS)}, "
                f"got {direction!r}"
            )
    return Pricing(
        models=models,
        egress=Egress(
            usd_per_gb=r.value(e, "usd_per_gb", "pricing.egress", _number, d.usd_per_gb),
            free_gb=r.value(e, "free_gb", "pricing.egress", _number, d.free_gb),
            tiers=tuple(tiers),
            directions=tuple(x for x in directions if x in DIRECTIONS),
            gb_bytes=r.value(e, "gb_bytes", "pricing.egress", parse_size, d.gb_bytes),
        ),
    )


def _read_tenants(r: _Reader, raw: object) -> dict[str, Tenant]:
    tenants = {}
    for name, spec in r.mapping(raw, "tenants", list(raw) if isinstance(raw, dict) else []).items():
        path = f"tenants.{name}"
        if str(name) in ("anonymous", "other"):
            r.problems.append(f"{path}: the names anonymous and other are reserved")
        t = r.mapping(spec, path, ["keys"])
        keys = t.get("keys") or []
        if not isinstance(keys, list) or not keys:
            r.problems.append(
                f"{path}.keys: expected a list of SHA-256 hashes (tallygate hash-key)"
            )
            keys = []
        for i, key in enumerate(keys):
            if not isinstance(key, str) or not _HEX64.match(key.removeprefix("sha256:")):
                r.problems.append(
                    f"{path}.keys[{i}]: expected a SHA-256 hex digest (tallygate hash-key), "
                    "never the key itself"
                )
        tenants[str(name)] = Tenant(
            str(name), tuple(k.removeprefix("sha256:").lower() for k in keys if isinstance(k, str))
        )
    return tenants


def _read_metering(r: _Reader, raw: object) -> Metering:
    path = "metering"
    m = r.mapping(raw, path, [f.name for f in fields(Metering)])
    d = Metering()
    encodings = []
    raw_encodings = m.get("encodings") or {}
    if not isinstance(raw_encodings, dict):
        r.problems.append(f"{path}.encodings: expected a mapping of model globs to encodings")
        raw_encodings = {}
    for glob, name in raw_encodings.items():
        try:
            encodings.append((str(glob), _choice(ENCODING_CHOICES)(name)))
        except ValueError as error:
            r.problems.append(f"{path}.encodings.{glob}: {error}")
    return Metering(
        enabled=r.value(m, "enabled", path, _bool, d.enabled),
        estimate=r.value(m, "estimate", path, _bool, d.estimate),
        request_usage=r.value(m, "request_usage", path, _bool, d.request_usage),
        on_client_disconnect=r.value(
            m, "on_client_disconnect", path, _on_disconnect, d.on_client_disconnect
        ),
        drain_timeout=r.value(m, "drain_timeout", path, parse_duration, d.drain_timeout),
        max_event_bytes=r.value(m, "max_event_bytes", path, parse_size, d.max_event_bytes),
        default_encoding=r.value(
            m, "default_encoding", path, _choice(ENCODING_CHOICES), d.default_encoding
        ),
        encodings=tuple(encodings),
        image_tokens_default=r.value(
            m, "image_tokens_default", path, _int_in(0, 1_000_000), d.image_tokens_default
        ),
    )


def _read_ledger(r: _Reader, raw: object) -> Ledger:
    """`ledger: off`, `ledger: URL`, or a mapping with `url`."""
    if raw is False or raw == "off":
        return Ledger(url=None)
    if raw is None:
        return Ledger()
    if isinstance(raw, str):
        raw = {"url": raw}
    m = r.mapping(raw, "ledger", [f.name for f in fields(Ledger)])
    d = Ledger()
    url = r.value(m, "url", "ledger", _ledger_url, d.url)
    return Ledger(
        url=url,
        spool=r.value(m, "spool", "ledger", _string, "") or None,
        commit_interval=r.value(m, "commit_interval", "ledger", parse_duration, d.commit_interval),
        batch_rows=r.value(m, "batch_rows", "ledger", _int_in(1, 1_000_000), d.batch_rows),
    )


def _ledger_url(value: object) -> str | None:
    if value is False or value == "off":
        return None
    text = _string(value)
    if not (text.startswith("sqlite:///") or text.startswith(("postgresql://", "postgres://"))):
        raise ValueError("expected off, sqlite:///PATH or postgresql://USER@HOST/DB")
    return text


def _sources(value: object) -> tuple[str, ...]:
    items = _strings(value)
    for item in items:
        problem = source_problem(item)
        if problem is None and item.startswith("body:"):
            field = item[5:]
            if field not in ("user", "safety_identifier") and not field.startswith("metadata."):
                problem = "a body source is user, safety_identifier or metadata.KEY"
        if problem is not None:
            raise ValueError(f"{item!r}: {problem}")
    return items


def _read_attribution(r: _Reader, raw: object) -> Attribution:
    path = "attribution"
    m = r.mapping(raw, path, [f.name for f in fields(Attribution)])
    d = Attribution()
    return Attribution(
        user=r.value(m, "user", path, _sources, tuple(d.user)),
        session=r.value(m, "session", path, _sources, tuple(d.session)),
        tags_header=r.value(m, "tags_header", path, _string, d.tags_header or "") or None,
        headers_from=r.value(
            m, "headers_from", path, _choice(("any", "trusted_proxies")), d.headers_from
        ),
        hash_users=r.value(m, "hash_users", path, _bool, d.hash_users),
    )


def load_config_text(
    text: str, env: Mapping[str, str] | None = None, source: str = "config"
) -> Config:
    """Parse and validate; raise ConfigError listing every problem. `source` names the text in
    a YAML syntax error (the file's path), with the line and column."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([_yaml_problem(error, source)]) from None
    r = _Reader()
    document = _interpolate(document, "", os.environ if env is None else env, r.problems)
    top = r.mapping(document, "", TOP_KEYS)

    upstreams = _read_upstreams(r, top.get("upstreams"))
    routes = _read_routes(r, top.get("routes"), upstreams)

    admin_raw = r.mapping(top.get("admin"), "admin", ["listen", "metrics_token"])
    metrics_raw = r.mapping(top.get("metrics"), "metrics", ["max_models"])
    auth_raw = r.mapping(top.get("auth"), "auth", ["require_key"])
    comp_raw = r.mapping(
        top.get("compression"), "compression", [f.name for f in fields(Compression)]
    )
    limits_raw = r.mapping(top.get("limits"), "limits", [f.name for f in fields(Limits)])
    pool_raw = r.mapping(top.get("pool"), "pool", ["max_connections", "keepalive_timeout"])
    dc, dp = Compression(), Pool()

    trusted_raw = top.get("trusted_proxies") or []
    if not isinstance(trusted_raw, list):
        r.problems.append("trusted_proxies: expected a list of addresses or CIDR blocks")
        trusted_raw = []
    trusted = []
    for i, entry in enumerate(trusted_raw):
        try:
            trusted.append(_network(entry))
        except ValueError as error:
            r.problems.append(f"trusted_proxies[{i}]: {error}")

    config = Config(
        upstreams=upstreams,
        routes=routes,
        listen=_read_listen(r, top.get("listen")),
        admin=Admin(
            listen=r.value(admin_raw, "listen", "admin", parse_listen, Admin().listen),
            metrics_token=r.value(admin_raw, "metrics_token", "admin", _string, "") or None,
        ),
        compression=Compression(
            gzip=r.value(comp_raw, "gzip", "compression", _bool, dc.gzip),
            level=r.value(comp_raw, "level", "compression", _int_in(1, 9), dc.level),
            window_bits=r.value(
                comp_raw, "window_bits", "compression", _int_in(9, 15), dc.window_bits
            ),
            mem_level=r.value(comp_raw, "mem_level", "compression", _int_in(1, 9), dc.mem_level),
            min_length=r.value(comp_raw, "min_length", "compression", parse_size, dc.min_length),
        ),
        limits=_read_limits(r, limits_raw),
        pool=Pool(
            max_connections=r.value(
                pool_raw, "max_connections", "pool", _int_in(0, 1_000_000), dp.max_connections
            ),
            keepalive_timeout=r.value(
                pool_raw, "keepalive_timeout", "pool", parse_duration, dp.keepalive_timeout
            ),
        ),
        trusted_proxies=tuple(trusted),
        shutdown_grace=r.value(top, "shutdown_grace", "", parse_duration, DEFAULT_SHUTDOWN_GRACE),
        metering=_read_metering(r, top.get("metering")),
        access_log=r.value(top, "access_log", "", _string, "stdout"),
        metrics=Metrics(
            max_models=r.value(metrics_raw, "max_models", "metrics", _int_in(1, 10_000), 50)
        ),
        pricing=_read_pricing(r, top.get("pricing")),
        tenants=_read_tenants(r, top.get("tenants")),
        tenant_header=r.value(top, "tenant_header", "", _string, "") or None,
        require_key=r.value(auth_raw, "require_key", "auth", _bool, False),
        workers=r.value(top, "workers", "", _workers, 1),
        cors=_read_cors(r, top.get("cors"), "cors"),
        ledger=_read_ledger(r, top.get("ledger")),
        attribution=_read_attribution(r, top.get("attribution")),
    )
    if config.require_key and not config.tenants:
        r.problems.append(
            "auth.require_key: no tenants are configured, so every request would fail"
        )
    if str(config.listen) == str(config.admin.listen) and config.listen.port != 0:
        r.problems.append(f"admin.listen: must differ from listen ({config.listen})")
    if r.problems:
        raise ConfigError(r.problems)
    return config


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"config: cannot read {path}: {error.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"config: {path} is not UTF-8 text"]) from None
    return load_config_text(text, env, str(path))


def _yaml_problem(error: yaml.YAMLError, source: str) -> str:
    """`file:line:column: what is wrong`, as compilers say it."""
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    context = getattr(error, "context", None)
    what = f"{context}: {problem}" if context else problem
    if mark is None:
        return f"{source}: not valid YAML: {what}"
    return f"{source}:{mark.line + 1}:{mark.column + 1}: not valid YAML: {what}"
