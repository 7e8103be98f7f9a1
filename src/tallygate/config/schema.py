"""The configuration's shape: frozen dataclasses that mirror the YAML, with their defaults.

Every default and every enumeration a key accepts is defined here, once.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from tallygate.core.codec import DEFAULT_GZIP
from tallygate.core.dialects import DIALECTS
from tallygate.core.pricing import EgressTier, TokenPrice
from tallygate.core.tokens import ENCODINGS
from tallygate.policy.attribution import Attribution
from tallygate.policy.cors import CorsPolicy

AuthHeader = Literal["authorization", "x-api-key"]
AUTH_HEADERS: tuple[AuthHeader, ...] = ("authorization", "x-api-key")
OnDisconnect = Literal["cancel", "drain"]
DIALECT_CHOICES = ("auto", *DIALECTS)
ENCODING_CHOICES = ENCODINGS

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class ListenError(Exception):
    """An address tallygate cannot listen on (in use, not this host's, not allowed)."""

    @classmethod
    def of(cls, listen: object, error: OSError) -> ListenError:
        reason = os.strerror(error.errno) if error.errno else str(error)
        return cls(f"cannot listen on {listen}: {reason.lower()}")


class ConfigError(Exception):
    """The configuration is invalid; `problems` holds one `key.path: message` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Tls:
    cert: str  # PEM certificate chain
    key: str  # PEM private key


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int
    tls: Tls | None = None

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. `first_byte` runs from sending the request to the response headers; `idle` between
    two reads of the response body; `total` over the whole exchange."""

    connect: float = 5.0
    first_byte: float = 120.0
    idle: float = 60.0
    total: float = 900.0


@dataclass(frozen=True, slots=True)
class Upstream:
    name: str
    url: str
    api_key: str | None = field(default=None, repr=False)
    auth_header: AuthHeader = "authorization"
    timeouts: Timeouts = Timeouts()


@dataclass(frozen=True, slots=True)
class Route:
    path_prefix: str
    upstream: str
    dialect: str = "auto"  # "auto": from the request path (dialects.detect_dialect)
    cors: CorsPolicy | Literal[False] | None = None  # None: the top-level `cors:`; False: off


@dataclass(frozen=True, slots=True)
class Metering:
    enabled: bool = True
    estimate: bool = True
    request_usage: bool = True
    on_client_disconnect: OnDisconnect = "cancel"
    drain_timeout: float = 30.0
    max_event_bytes: int = 1024 * 1024
    default_encoding: str = "o200k_base"
    encodings: tuple[tuple[str, str], ...] = ()  # (model glob, encoding), before the built-ins
    image_tokens_default: int = 765


@dataclass(frozen=True, slots=True)
class Compression:
    gzip: bool = True
    # The compressor's own defaults, defined once (compression.GzipSettings says why these).
    level: int = DEFAULT_GZIP.level
    window_bits: int = DEFAULT_GZIP.window_bits
    mem_level: int = DEFAULT_GZIP.mem_level
    # Below this many bytes a response of known length is not worth a gzip header and trailer.
    min_length: int = 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may take. Timeouts as nginx's client_header_timeout, client_body_timeout
    and send_timeout; header sizes as its large_client_header_buffers. 0: no limit."""

    max_request_bytes: int = 32 * MiB
    max_header_bytes: int = 8 * KiB  # one header line, and the request line
    max_headers: int = 100
    header_timeout: float = 10.0  # from the first byte of a request (or the accept) to its head
    body_timeout: float = 60.0  # between two reads of a request body
    write_timeout: float = 60.0  # one write to a client that does not read
    max_connections: int = 0  # open client connections, per worker
    max_streams: int = 0  # requests in flight, per worker
    retry_after: int = 1  # seconds, in a 503 past max_connections or max_streams


@dataclass(frozen=True, slots=True)
class Pool:
    """The one shared upstream connection pool."""

    max_connections: int = 10_000  # 0: no limit
    keepalive_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class Admin:
    listen: Listen = Listen("127.0.0.1", 9464)
    metrics_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class Metrics:
    max_models: int = 50  # distinct model label values; past them, `other`


@dataclass(frozen=True, slots=True)
class Egress:
    usd_per_gb: float = 0.09
    free_gb: float = 0.0
    tiers: tuple[EgressTier, ...] = ()
    directions: tuple[str, ...] = ("client_out", "upstream_out")
    gb_bytes: int = 2**30


@dataclass(frozen=True, slots=True)
class Pricing:
    models: Mapping[str, TokenPrice] = field(default_factory=dict)
    egress: Egress = Egress()


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    keys: tuple[str, ...] = field(default=(), repr=False)  # SHA-256 hex of tallygate-issued keys


DEFAULT_LEDGER_URL = "sqlite:///var/lib/tallygate/usage.db"


@dataclass(frozen=True, slots=True)
class Ledger:
    """`ledger:`; `url` None is `ledger: off`."""

    url: str | None = DEFAULT_LEDGER_URL
    # Where rows wait while the store is away; one file per process, `<spool>.<pid>`. Default:
    # beside an SQLite file, or /var/lib/tallygate/ledger.spool.
    spool: str | None = None
    commit_interval: float = 0.1  # at most this long between a row and its commit
    batch_rows: int = 1000  # or commit as soon as this many wait

    def spool_path(self) -> str:
        if self.spool:
            return self.spool
        if self.url and self.url.startswith("sqlite:"):
            from tallygate.ledger.store import sqlite_path

            return sqlite_path(self.url) + ".spool"
        return "/var/lib/tallygate/ledger.spool"


DEFAULT_LISTEN = Listen("127.0.0.1", 8080)
DEFAULT_SHUTDOWN_GRACE = 30.0


@dataclass(frozen=True, slots=True)
class Config:
    upstreams: Mapping[str, Upstream]
    routes: tuple[Route, ...]
    listen: Listen = DEFAULT_LISTEN
    admin: Admin = Admin()
    compression: Compression = Compression()
    limits: Limits = Limits()
    pool: Pool = Pool()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    shutdown_grace: float = DEFAULT_SHUTDOWN_GRACE
    metering: Metering = Metering()
    access_log: str = "stdout"  # stdout, stderr, off, or a file path
    metrics: Metrics = Metrics()
    pricing: Pricing = Pricing()
    tenants: Mapping[str, Tenant] = field(default_factory=dict)
    tenant_header: str | None = None
    require_key: bool = False  # auth.require_key
    workers: int = 1
    cors: CorsPolicy | None = None  # None: no CORS, preflights are relayed like any request
    ledger: Ledger = Ledger()
    attribution: Attribution = field(default_factory=Attribution)

    def cors_for(self, route: Route | None) -> CorsPolicy | None:
        """The CORS policy of a request on `route` (None before routing, or when off)."""
        if route is None or route.cors is None:
            return self.cors
        return route.cors or None
