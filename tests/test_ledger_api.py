"""The ledger on the admin listener: the native usage endpoint, and the shapes of OpenAI's
organization Usage and Costs APIs, read by a client written against OpenAI's documentation."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from test_ledger import CHAT, stream

from tallygate.ledger.facade import costs, usage_completions
from tallygate.ledger.rows import NANO
from tallygate.ledger.store import SqliteStore
from tallygate.policy.tenants import hash_key

from conftest import FakeUpstream, ProxyFactory, RecordLog

TOKEN = "metrics-secret"
KEYS = {"acme": "tg-acme-key", "globex": "tg-globex-key"}


@dataclass
class CompletionsResult:
    """One result of OpenAI's `GET /v1/organization/usage/completions`, as documented."""

    input_tokens: int
    output_tokens: int
    input_cached_tokens: int
    num_model_requests: int
    project_id: str | None
    user_id: str | None
    api_key_id: str | None
    model: str | None


async def read_all_pages(session: aiohttp.ClientSession, url: str, params: dict[str, Any],
                         headers: dict[str, str]) -> list[dict[str, Any]]:  # fmt: skip
    """What a client of OpenAI's usage endpoints does: follow `next_page` while `has_more`."""
    buckets: list[dict[str, Any]] = []
    page: str | None = None
    while True:
        query = {**params, **({"page": page} if page else {})}
        async with session.get(url, params=query, headers=headers) as r:
            assert r.status == 200, await r.text()
            body = await r.json()
        assert body["object"] == "page"
        for bucket in body["data"]:
            assert bucket["object"] == "bucket"
            assert bucket["end_time"] > bucket["start_time"]
        buckets += body["data"]
        if not body["has_more"]:
            assert body["next_page"] is None
            return buckets
        page = body["next_page"]


async def test_usage_and_costs_read_as_openai_documents_them(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog, tmp_path: Path
) -> None:
    upstream.handler = stream
    url = f"sqlite:///{tmp_path}/usage.db"
    running = await make_proxy(
        ledger={"url": url, "commit_interval": "20ms"}, admin={"metrics_token": TOKEN},
        tenants={name: {"keys": [hash_key(key)]} for name, key in KEYS.items()},
    )  # fmt: skip
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    sent = [("acme", "alice"), ("acme", "alice"), ("acme", "bob"), ("globex", "carol")]
    async with aiohttp.ClientSession() as session:
        for tenant, user in sent:
            headers = {"Authorization": f"Bearer {KEYS[tenant]}", "X-User-Id": user}
            async with session.post(f"http://127.0.0.1:{running.proxy_port}{CHAT}", json=body,
                                    headers=headers) as r:  # fmt: skip
                await r.read()
        await records.wait_for(len(sent))
        async with asyncio.timeout(5):
            while len(list(SqliteStore(url).rows())) < len(sent):  # noqa: ASYNC110 (a file)
                await asyncio.sleep(0.02)
        admin = f"http://127.0.0.1:{running.admin_port}"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        async with session.get(f"{admin}/v1/organization/costs?start_time=0") as r:
            assert r.status == 401  # the metrics token guards the ledger too

        start = int(time.time()) - 3 * 86400
        buckets = await read_all_pages(
            session, f"{admin}/v1/organization/usage/completions",
            {"start_time": start, "bucket_width": "1d", "group_by": "project_id,user_id",
             "limit": 2}, auth,
        )  # fmt: skip
        assert len(buckets) == 4  # three days back and today, two a page
        results = [CompletionsResult(**{k: v for k, v in result.items()
                                        if k in CompletionsResult.__dataclass_fields__})
                   for bucket in buckets for result in bucket["results"]]  # fmt: skip
        by_user = {(r.project_id, r.user_id): r for r in results}
        assert by_user[("acme", "alice")].num_model_requests == 2
        assert by_user[("acme", "alice")].input_tokens == 24
        assert by_user[("globex", "carol")].output_tokens == 7

        [today] = [b for b in buckets if b["results"]]
        async with session.get(f"{admin}/v1/organization/costs", headers=auth,
                               params={"start_time": today["start_time"],
                                       "group_by": "project_id"}) as r:  # fmt: skip
            cost = await r.json()
        amounts = {x["project_id"]: x["amount"] for b in cost["data"] for x in b["results"]}
        total = sum(round(rec["cost_usd"]["total"] * NANO) for rec in records
                    if rec["tenant"] == "acme")  # fmt: skip
        assert amounts["acme"] == {"value": total / NANO, "currency": "usd"}

        async with session.get(f"{admin}/admin/v1/usage", headers=auth,
                               params={"by": "tenant,user", "limit": 2}) as r:  # fmt: skip
            first = await r.json()
        async with session.get(f"{admin}/admin/v1/usage", headers=auth,
                               params={"by": "tenant,user", "limit": 2,
                                       "page": first["next_page"]}) as r:  # fmt: skip
            second = await r.json()
        assert [(e["tenant"], e["user"], e["requests"]) for e in first["data"] + second["data"]] \
            == [("acme", "alice", 2), ("acme", "bob", 1), ("globex", "carol", 1)]  # fmt: skip
        assert second["has_more"] is False
        async with session.get(f"{admin}/v1/organization/usage/completions", headers=auth,
                               params={"start_time": 10, "bucket_width": "1w"}) as r:  # fmt: skip
            refused = await r.json()
        assert r.status == 400 and refused["error"]["param"] == "bucket_width"


def test_an_empty_ledger_answers_empty_buckets() -> None:
    page = usage_completions([], 86400 * 10, 86400 * 12, "1d", [], None, None, 86400 * 20)
    assert [b["results"] for b in page["data"]] == [[], []] and page["has_more"] is False
    assert costs([], 86400 * 10, None, "1d", [], 1, None, 86400 * 12)["next_page"] == str(
        86400 * 11
    )
