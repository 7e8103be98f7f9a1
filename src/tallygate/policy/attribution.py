"""Who a request is for, inside its tenant: the end user, the session, free-form tags. Pure.

Each is looked up in sources given in order, the first one present wins: a request header
(`header:X-User-Id`) or a field of the request body that the APIs define for it
(`body:user`, `body:safety_identifier`, `body:metadata.user_id`). Headers are believed from
any client, or only from trusted proxies (`attribution.headers_from`). Values are cut to
`MAX_CHARS` and kept to visible characters; they go into the record and the ledger, never
into metric labels. With `hash_users`, the user is kept as a short hash.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MAX_CHARS = 128
MAX_TAGS = 16
_INVISIBLE = re.compile(r"[^\x21-\x7e\u00a0-\uffff ]+")

DEFAULT_USER = ("header:X-User-Id", "body:user", "body:safety_identifier", "body:metadata.user_id")
DEFAULT_SESSION = ("header:X-Session-Id", "body:metadata.session_id")
DEFAULT_TAGS_HEADER = "X-Tallygate-Tags"


@dataclass(frozen=True, slots=True)
class Attribution:
    user: Sequence[str] = DEFAULT_USER
    session: Sequence[str] = DEFAULT_SESSION
    tags_header: str | None = DEFAULT_TAGS_HEADER
    headers_from: str = "any"  # "any", or "trusted_proxies"
    hash_users: bool = False


def source_problem(source: str) -> str | None:
    """Why `source` is not one (for the configuration's error), or None."""
    kind, _, name = source.partition(":")
    if kind not in ("header", "body") or not name:
        return "expected header:NAME or body:FIELD (body:metadata.KEY for a metadata entry)"
    return None


def sane(value: object) -> str | None:
    if not isinstance(value, str | int) or isinstance(value, bool):
        return None
    text = _INVISIBLE.sub("", str(value)).strip()[:MAX_CHARS]
    return text or None


def _lookup(
    sources: Sequence[str], headers: Mapping[str, str], body: Mapping[str, Any] | None,
    believe_headers: bool,
) -> str | None:  # fmt: skip
    for source in sources:
        kind, _, name = source.partition(":")
        if kind == "header":
            value = sane(headers.get(name)) if believe_headers else None
        else:
            node: Any = body
            for part in name.split("."):
                node = node.get(part) if isinstance(node, Mapping) else None
            value = sane(node)
        if value is not None:
            return value
    return None


def parse_tags(value: str | None) -> tuple[tuple[str, str], ...]:
    """`team=search,feature=summary` as sorted pairs; malformed parts are left out."""
    if not value:
        return ()
    tags = {}
    for part in value.split(",")[:MAX_TAGS]:
        key, eq, tag = part.partition("=")
        key, tag = sane(key.strip()) or "", sane(tag.strip()) or ""
        if eq and key and tag:
            tags[key[:64]] = tag[:64]
    return tuple(sorted(tags.items()))


def attribute(
    policy: Attribution,
    headers: Mapping[str, str],
    body: Mapping[str, Any] | None,
    trusted: bool,
) -> tuple[str | None, str | None, tuple[tuple[str, str], ...]]:
    """(user, session, tags) of a request."""
    believe = policy.headers_from == "any" or trusted
    user = _lookup(policy.user, headers, body, believe)
    if user is not None and policy.hash_users:
        user = "u_" + hashlib.sha256(user.encode()).hexdigest()[:16]
    session = _lookup(policy.session, headers, body, believe)
    tags_header = policy.tags_header
    tags = parse_tags(headers.get(tags_header)) if tags_header and believe else ()
    return user, session, tags
