"""Who a request belongs to: tallygate-issued client keys (stored as SHA-256 hashes), or a
tenant header from trusted peers. Pure: headers in, an identity out."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDictProxy

ANONYMOUS = "anonymous"
OTHER = "other"


def hash_key(key: str) -> str:
    # A header byte above 0x7F reaches us as a lone surrogate (aiohttp decodes heads with
    # surrogateescape): hashed as the bytes sent, it matches no issued key, as any wrong key.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def presented_key(headers: Mapping[str, str] | CIMultiDictProxy[str]) -> str | None:
    """The credential a client sent: `Authorization: Bearer <key>` or `x-api-key: <key>`."""
    authorization = headers.get("Authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key", "").strip()
    return key or None


@dataclass(frozen=True, slots=True)
class Identity:
    tenant: str
    by_key: bool  # a tallygate-issued key matched: it must not travel upstream
    key_id: str | None = None  # a short, stable id of that key (never the key itself)


class Tenants:
    def __init__(
        self,
        key_hashes: Mapping[str, tuple[str, ...]],
        header: str | None = None,
        require_key: bool = False,
    ) -> None:
        self._by_hash = {h.lower(): name for name, hashes in key_hashes.items() for h in hashes}
        self.names = tuple(key_hashes)
        self._header = header
        self.require_key = require_key

    def identify(
        self, headers: Mapping[str, str] | CIMultiDictProxy[str], trusted: bool
    ) -> Identity | None:
        """The request's tenant; None when a key is required and none of ours was presented."""
        key = presented_key(headers)
        if key is not None:
            hashed = hash_key(key)
            tenant = self._by_hash.get(hashed)
            if tenant is not None:
                return Identity(tenant, by_key=True, key_id="key_" + hashed[:12])
        if self.require_key:
            return None
        if self._header and trusted:
            named = headers.get(self._header, "").strip()
            if named:
                return Identity(named if named in self.names else OTHER, by_key=False)
        return Identity(ANONYMOUS, by_key=False)
