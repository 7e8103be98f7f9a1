"""Totals of ledger rows, grouped any way (`tallygate usage`, the admin API). Pure: fed rows
and a time zone, it returns totals; money is summed in nano-USD, exactly.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta, tzinfo
from typing import Any

import orjson

from tallygate.ledger.rows import NANO, Row

GROUPS = ("tenant", "user", "session", "model", "upstream", "key", "tag", "day", "week", "month")
SUMS = (
    "input_tokens", "cached_input_tokens", "cache_write_input_tokens", "output_tokens",
    "reasoning_tokens", "client_in", "client_out", "upstream_out", "upstream_in",
    "cost_input", "cost_cached_input", "cost_cache_write_input", "cost_output", "cost_egress",
    "cost_total",
)  # fmt: skip
_SUM_INDEX = [Row._fields.index(name) for name in SUMS]
PERIODS = ("today", "yesterday", "this-week", "this-month", "last-month")


def period_bounds(since: str | None, until: str | None, tz: tzinfo, now: datetime) -> tuple[
    datetime | None, datetime | None
]:  # fmt: skip
    """[since, until) from `--since`/`--until`: a date (YYYY-MM-DD, midnight in `tz`), or a
    named period. A named `since` without `until` ends where the period ends."""
    today = now.astimezone(tz).date()

    def midnight(day: date) -> datetime:
        return datetime(day.year, day.month, day.day, tzinfo=tz)

    def named(name: str) -> tuple[datetime, datetime]:
        first = today.replace(day=1)
        if name == "today":
            return midnight(today), midnight(today + timedelta(days=1))
        if name == "yesterday":
            return midnight(today - timedelta(days=1)), midnight(today)
        if name == "this-week":
            monday = today - timedelta(days=today.weekday())
            return midnight(monday), midnight(monday + timedelta(days=7))
        if name == "this-month":
            return midnight(first), midnight(_next_month(first))
        if name == "last-month":
            previous = (first - timedelta(days=1)).replace(day=1)
            return midnight(previous), midnight(first)
        try:
            day = date.fromisoformat(name)
        except ValueError:
            raise ValueError(
                f"{name!r}: expected a date (YYYY-MM-DD) or one of {', '.join(PERIODS)}"
            ) from None
        return midnight(day), midnight(day + timedelta(days=1))

    start = end = None
    if since is not None:
        start, end = named(since)
        if since not in PERIODS:
            end = None  # a date starts a range; the range runs to `until`, or now
    if until is not None:
        end = named(until)[0] if until not in PERIODS else named(until)[1]
    return start, end


def _next_month(first: date) -> date:
    return date(first.year + first.month // 12, first.month % 12 + 1, 1)


def _keys(row: Row, by: Sequence[str], tz: tzinfo) -> list[tuple[str, ...]]:
    """The group keys a row counts in: one, or one per tag when grouping by tag."""
    local = datetime.fromtimestamp(row.ts_ms / 1000, tz)
    values: list[list[str]] = []
    for group in by:
        if group == "tag":
            tags = orjson.loads(row.tags) if row.tags else {}
            values.append([f"{k}={v}" for k, v in sorted(tags.items())] or [""])
        elif group == "day":
            values.append([local.date().isoformat()])
        elif group == "week":
            monday = local.date() - timedelta(days=local.weekday())
            values.append([monday.isoformat()])
        elif group == "month":
            values.append([local.strftime("%Y-%m")])
        else:
            field = {"user": "user_id", "session": "session_id", "key": "key_id"}.get(group, group)
            value = getattr(row, field)
            values.append(["" if value is None else str(value)])
    keys: list[tuple[str, ...]] = [()]
    for options in values:
        keys = [(*key, option) for key in keys for option in options]
    return keys


def totals(rows: Iterable[Row], by: Sequence[str], tz: tzinfo) -> list[dict[str, Any]]:
    """One entry per group, in key order: the group's values, `requests`, and every sum."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for row in rows:
        for key in _keys(row, by, tz):
            sums = groups.get(key)
            if sums is None:
                sums = groups[key] = [0] * (len(SUMS) + 1)
            sums[0] += 1
            for i, index in enumerate(_SUM_INDEX, 1):
                sums[i] += int(row[index])  # type: ignore[arg-type]
    result = []
    for key in sorted(groups):
        sums = groups[key]
        entry: dict[str, Any] = dict(zip(by, key, strict=True))
        entry["requests"] = sums[0]
        entry.update(zip(SUMS, sums[1:], strict=True))
        result.append(entry)
    return result


def usd(nano: int) -> str:
    """Nano-USD as an exact decimal string."""
    sign = "-" if nano < 0 else ""
    whole, part = divmod(abs(nano), NANO)
    return f"{sign}{whole}.{part:09d}"


def render(entries: list[dict[str, Any]], by: Sequence[str], fmt: str) -> str:
    columns = [*by, "requests", *SUMS]

    def shown(entry: dict[str, Any], column: str) -> Any:
        value = entry[column]
        return usd(value) if column.startswith("cost_") else value

    if fmt == "json":
        return (
            orjson.dumps(
                [{c: shown(e, c) for c in columns} for e in entries], option=orjson.OPT_INDENT_2
            ).decode()
            + "\n"
        )
    if fmt == "ndjson":
        return "".join(orjson.dumps({c: shown(e, c) for c in columns}).decode() + "\n"
                       for e in entries)  # fmt: skip
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([c + ("_usd" if c.startswith("cost_") else "") for c in columns])
        for entry in entries:
            writer.writerow([shown(entry, c) for c in columns])
        return out.getvalue()
    # table: the groups, requests, tokens in and out, bytes out to clients, cost by kind
    brief = [*by, "requests", "input_tokens", "output_tokens", "client_out", "cost_egress",
             "cost_total"]  # fmt: skip
    cells = [[c + ("_usd" if c.startswith("cost_") else "") for c in brief]]
    cells += [[str(shown(e, c)) for c in brief] for e in entries]
    widths = [max(len(row[i]) for row in cells) for i in range(len(brief))]
    lines = ["  ".join(cell.ljust(widths[i]) if i < len(by) else cell.rjust(widths[i])
                       for i, cell in enumerate(row)).rstrip() for row in cells]  # fmt: skip
    return "\n".join(lines) + "\n"
