"""A usage record as one ledger row. Pure.

Money is stored as integers, nano-USD (1e-9 USD), so that sums are exact and equal across
stores; tokens by bucket, bytes by direction, and the price table's version, so that history
can be re-priced when a price is corrected.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from tallygate.core.pricing import COST_KINDS
from tallygate.core.record import UsageRecord

NANO = 1_000_000_000  # nano-USD per USD

# The columns of the `usage` table, in order: `Row` below holds them.
COLUMNS = (
    "request_id", "attempt", "ts_ms", "tenant", "user_id", "session_id", "tags", "key_id",
    "route", "upstream", "model", "priced_as", "dialect", "status", "outcome", "stream",
    "tokens_source", "input_tokens", "cached_input_tokens", "cache_write_input_tokens",
    "output_tokens", "reasoning_tokens", "client_in", "client_out", "upstream_out",
    "upstream_in", "cost_input", "cost_cached_input", "cost_cache_write_input", "cost_output",
    "cost_egress", "cost_total", "price_version", "duration_ms",
)  # fmt: skip


class Row(NamedTuple):
    request_id: str
    attempt: int  # 0 for the first attempt; a failover's next attempt is its own row
    ts_ms: int  # when the request arrived, Unix milliseconds
    tenant: str
    user_id: str | None
    session_id: str | None
    tags: str | None  # a JSON object
    key_id: str | None
    route: str
    upstream: str
    model: str | None
    priced_as: str | None
    dialect: str
    status: int
    outcome: str
    stream: int
    tokens_source: str
    input_tokens: int
    cached_input_tokens: int
    cache_write_input_tokens: int
    output_tokens: int
    reasoning_tokens: int
    client_in: int
    client_out: int
    upstream_out: int
    upstream_in: int
    cost_input: int  # nano-USD, as every cost_ column
    cost_cached_input: int
    cost_cache_write_input: int
    cost_output: int
    cost_egress: int
    cost_total: int
    price_version: str
    duration_ms: int


assert Row._fields == COLUMNS


def nano(usd: float) -> int:
    return round(usd * NANO)


def row_of(record: UsageRecord, price_version: str, attempt: int = 0) -> Row:
    tokens, wire, cost = record.tokens, record.bytes, record.cost_usd
    kinds = [nano(cost.get(kind, 0.0)) for kind in COST_KINDS]
    by_kind = dict(zip(COST_KINDS, kinds, strict=True))
    return Row(
        record.request_id, attempt, int(record.ts * 1000), record.tenant, record.user,
        record.session, orjson.dumps(dict(record.tags)).decode() if record.tags else None,
        record.key_id, record.route, record.upstream, record.model, record.priced_as,
        record.dialect, record.status, record.outcome, int(record.stream), record.tokens_source,
        tokens.input, tokens.cached_input, tokens.cache_write_input, tokens.output,
        tokens.reasoning, wire.client_in, wire.client_out, wire.upstream_out, wire.upstream_in,
        by_kind["input"], by_kind["cached_input"], by_kind["cache_write_input"],
        by_kind["output"], by_kind["egress"], sum(kinds), price_version,
        round(record.timings.duration_s * 1000),
    )  # fmt: skip


def row_from_json(values: list[Any]) -> Row:
    """A row as the spool file keeps it (a JSON array, in column order)."""
    return Row(*values)
