"""The ledger as OpenAI's organization Usage and Costs APIs answer, so tools written for them
read tallygate unchanged. Pure: fed rows, it returns the response objects.

Mapping: a tallygate tenant is a `project_id`, the end user a `user_id`, the key's short id an
`api_key_id`. Buckets are `bucket_width` long, aligned to whole buckets in UTC, from the one that
holds `start_time`. A page holds `limit` buckets; `next_page` is the next bucket's start.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from tallygate.ledger.rows import NANO, Row

WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}
# OpenAI's documented defaults and maxima of `limit` (buckets per page), by width.
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}
USAGE_GROUPS = {"project_id": "tenant", "user_id": "user_id", "api_key_id": "key_id",
                "model": "model"}  # fmt: skip
COST_GROUPS = ("project_id", "line_item")


class FacadeError(ValueError):
    """A parameter OpenAI's API would refuse: the message names it."""


def window(
    start_time: int, end_time: int | None, width: str, limit: int | None, page: str | None,
    now: int,
) -> tuple[int, int, int, int]:  # fmt: skip
    """(first bucket start, page end, bucket seconds, buckets on this page), validated."""
    if width not in WIDTHS:
        raise FacadeError(f"bucket_width: one of {', '.join(WIDTHS)}")
    seconds = WIDTHS[width]
    default, most = LIMITS[width]
    count = default if limit is None else limit
    if not 1 <= count <= most:
        raise FacadeError(f"limit: 1 to {most} for bucket_width {width}")
    first = start_time - start_time % seconds
    if page is not None:
        try:
            first = int(page)
        except ValueError:
            raise FacadeError("page: not a page this API gave") from None
    end = now if end_time is None else end_time
    if end <= start_time:
        raise FacadeError("end_time: must be after start_time")
    return first, min(end, first + count * seconds), seconds, count


def _buckets(
    rows: Iterable[Row], first: int, stop: int, seconds: int, key_of: Any
) -> dict[int, dict[tuple[Any, ...], list[int]]]:
    buckets: dict[int, dict[tuple[Any, ...], list[int]]] = {}
    for start in range(first, stop, seconds):
        buckets[start] = {}
    for row in rows:
        second = row.ts_ms // 1000
        if not first <= second < stop:
            continue
        start = first + (second - first) // seconds * seconds
        for key, values in key_of(row):
            sums = buckets[start].setdefault(key, [0] * len(values))
            for i, value in enumerate(values):
                sums[i] += value
    return buckets


def _page(
    buckets: dict[int, dict[tuple[Any, ...], list[int]]], seconds: int, stop: int, end: int,
    result: Any,
) -> dict[str, Any]:  # fmt: skip
    data = [
        {"object": "bucket", "start_time": start, "end_time": start + seconds,
         "results": [result(key, sums) for key, sums in sorted(groups.items(), key=str)]}
        for start, groups in sorted(buckets.items())
    ]  # fmt: skip
    more = stop < end
    return {"object": "page", "data": data, "has_more": more,
            "next_page": str(stop) if more else None}  # fmt: skip


def usage_completions(
    rows: Iterable[Row], start_time: int, end_time: int | None, width: str,
    group_by: Sequence[str], limit: int | None, page: str | None, now: int,
) -> dict[str, Any]:  # fmt: skip
    for group in group_by:
        if group not in USAGE_GROUPS:
            raise FacadeError(f"group_by: {group!r} is not one of {', '.join(USAGE_GROUPS)}")
    first, stop, seconds, _ = window(start_time, end_time, width, limit, page, now)
    end = now if end_time is None else end_time

    def key_of(row: Row) -> list[tuple[tuple[Any, ...], list[int]]]:
        key = tuple(getattr(row, USAGE_GROUPS[g]) for g in group_by)
        values = [row.input_tokens, row.output_tokens, row.cached_input_tokens, 1]
        return [(key, values)]

    def result(key: tuple[Any, ...], sums: list[int]) -> dict[str, Any]:
        named = dict(zip(group_by, key, strict=True))
        return {
            "object": "organization.usage.completions.result",
            "input_tokens": sums[0], "output_tokens": sums[1], "input_cached_tokens": sums[2],
            "input_audio_tokens": 0, "output_audio_tokens": 0, "num_model_requests": sums[3],
            "project_id": named.get("project_id"), "user_id": named.get("user_id"),
            "api_key_id": named.get("api_key_id"), "model": named.get("model"), "batch": None,
        }  # fmt: skip

    return _page(_buckets(rows, first, stop, seconds, key_of), seconds, stop, end, result)


# Costs by line item: tallygate's cost kinds, named as OpenAI's costs name theirs.
_LINE_ITEMS = (
    ("input", "cost_input"), ("cached input", "cost_cached_input"),
    ("cache write input", "cost_cache_write_input"), ("output", "cost_output"),
    ("egress", "cost_egress"),
)  # fmt: skip


def costs(
    rows: Iterable[Row], start_time: int, end_time: int | None, width: str,
    group_by: Sequence[str], limit: int | None, page: str | None, now: int,
) -> dict[str, Any]:  # fmt: skip
    if width != "1d":
        raise FacadeError("bucket_width: only 1d is supported, as OpenAI's costs API")
    for group in group_by:
        if group not in COST_GROUPS:
            raise FacadeError(f"group_by: {group!r} is not one of {', '.join(COST_GROUPS)}")
    first, stop, seconds, _ = window(start_time, end_time, width, limit, page, now)
    end = now if end_time is None else end_time
    by_item = "line_item" in group_by

    def key_of(row: Row) -> list[tuple[tuple[Any, ...], list[int]]]:
        project = row.tenant if "project_id" in group_by else None
        if not by_item:
            return [((project, None), [row.cost_total])]
        return [((project, f"{row.model or 'unknown'}, {item}"), [getattr(row, column)])
                for item, column in _LINE_ITEMS if getattr(row, column)]  # fmt: skip

    def result(key: tuple[Any, ...], sums: list[int]) -> dict[str, Any]:
        return {
            "object": "organization.costs.result",
            "amount": {"value": sums[0] / NANO, "currency": "usd"},
            "line_item": key[1], "project_id": key[0],
        }  # fmt: skip

    return _page(_buckets(rows, first, stop, seconds, key_of), seconds, stop, end, result)
