"""The ledger on the admin listener, behind the same token as /metrics:

- `GET /admin/v1/usage`: totals as `tallygate usage` gives them (`since`, `until`, `by`, `tz`,
  `format=json|csv`, `limit`, `page`);
- `GET /v1/organization/usage/completions` and `GET /v1/organization/costs`: the shapes of
  OpenAI's organization Usage and Costs APIs (ledger/facade.py).

Each query opens the store in a thread of its own: the event loop never waits on it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web

from tallygate.ledger import facade
from tallygate.ledger.report import GROUPS, period_bounds, render, totals, usd
from tallygate.ledger.rows import Row
from tallygate.ledger.store import open_store

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _rows(url: str, since_ms: int | None, until_ms: int | None) -> list[Row]:
    store = open_store(url)
    try:
        return list(store.rows(since_ms, until_ms))
    finally:
        store.close()


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param,
                      "code": None}}  # fmt: skip
    return web.json_response(body, status=status)


def _int(query: Any, name: str) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise facade.FacadeError(f"{name}: expected an integer") from None


def add_routes(app: web.Application, url: str, guard: Callable[[Handler], Handler]) -> None:
    async def usage(request: web.Request) -> web.StreamResponse:
        query = request.query
        by = [g for g in query.get("by", "").split(",") if g]
        unknown = [g for g in by if g not in GROUPS]
        if unknown:
            return _error(400, f"by: {unknown[0]!r} is not one of {', '.join(GROUPS)}", "by")
        try:
            tz = ZoneInfo(query.get("tz", "UTC"))
        except (ZoneInfoNotFoundError, ValueError):
            return _error(400, "tz: not a time zone", "tz")
        try:
            start, end = period_bounds(query.get("since"), query.get("until"), tz,
                                       datetime.now(UTC))  # fmt: skip
            limit = _int(query, "limit") or 100
            offset = _int(query, "page") or 0
        except ValueError as error:
            return _error(400, str(error))
        if not 1 <= limit <= 1000 or offset < 0:
            return _error(400, "limit: 1 to 1000; page: as given by next_page", "limit")
        since_ms = int(start.timestamp() * 1000) if start else None
        until_ms = int(end.timestamp() * 1000) if end else None
        rows = await asyncio.to_thread(_rows, url, since_ms, until_ms)
        entries = totals(rows, by, tz)
        if query.get("format") == "csv":
            return web.Response(text=render(entries, by, "csv"), content_type="text/csv")
        page = entries[offset : offset + limit]
        for entry in page:
            for key, value in entry.items():
                if key.startswith("cost_"):
                    entry[key] = usd(value)
        more = offset + limit < len(entries)
        return web.json_response(
            {"data": page, "has_more": more, "next_page": str(offset + limit) if more else None}
        )

    def openai_shaped(answer: Callable[..., dict[str, Any]]) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            query = request.query
            try:
                start_time = _int(query, "start_time")
                if start_time is None:
                    return _error(400, "start_time is required", "start_time")
                end_time = _int(query, "end_time")
                group_by = [g for value in query.getall("group_by", []) for g in value.split(",")
                            if g]  # fmt: skip
                width = query.get("bucket_width", "1d")
                # `end_time` is exclusive; without one, every row so far (this second included).
                limit, page, now = _int(query, "limit"), query.get("page"), int(time.time()) + 1
                first, stop, _, _ = facade.window(start_time, end_time, width, limit, page, now)
                rows = await asyncio.to_thread(_rows, url, first * 1000, stop * 1000)
                return web.json_response(
                    answer(rows, start_time, end_time, width, group_by, limit, page, now)
                )
            except facade.FacadeError as error:
                return _error(400, str(error), str(error).split(":", 1)[0])

        return handler

    app.router.add_get("/admin/v1/usage", guard(usage))
    app.router.add_get(
        "/v1/organization/usage/completions", guard(openai_shaped(facade.usage_completions))
    )
    app.router.add_get("/v1/organization/costs", guard(openai_shaped(facade.costs)))
