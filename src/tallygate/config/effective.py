"""The effective configuration, for `tallygate check`: defaults filled in, secrets masked."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from tallygate.config.load import TOP_KEYS
from tallygate.config.schema import (
    Config,
    Listen,
    Tenant,
    Upstream,
)

MASK = "********"


def _plain(value: object, key: str = "") -> object:
    if isinstance(value, Listen) and value.tls is not None:
        return {"address": str(value), "tls": {"cert": value.tls.cert, "key": value.tls.key}}
    if isinstance(value, Listen | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    if is_dataclass(value) and not isinstance(value, type):
        # An upstream's or a tenant's name is its key already.
        return {
            f.name: _plain(getattr(value, f.name), f.name)
            for f in fields(value)
            if f.name != "name" or not isinstance(value, Upstream | Tenant)
        }
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if key == "encodings" and isinstance(value, tuple):
        return dict(value)
    if key == "require_key":
        return value
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if key in ("api_key", "metrics_token", "keys") and value:
        return MASK
    return value


def effective_config(config: Config) -> dict[str, Any]:
    """The configuration with defaults filled in and every secret masked."""
    plain = _plain(config)
    assert isinstance(plain, dict)
    plain["auth"] = {"require_key": plain.pop("require_key")}
    return {key: plain[key] for key in TOP_KEYS}
