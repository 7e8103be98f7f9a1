"""Metrics equal the usage records, exactly; labels stay bounded; the exposition parses."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tallygate.policy.tenants import hash_key

from conftest import CASES, FakeUpstream, ProxyFactory, RecordLog

ACME_KEY, GLOBEX_KEY = "tg-acme-0001", "tg-globex-0002"
TENANTS = {"acme": {"keys": [hash_key(ACME_KEY)]}, "globex": {"keys": [hash_key(GLOBEX_KEY)]}}
PROVIDER_KEY = "sk-provider-secret-9999"


def case(prefix: str) -> Any:
    return next(c for c in CASES if c.id.startswith(prefix))


async def scrape(
    port: int, accept: str = "text/plain", token: str | None = None
) -> tuple[str, str]:
    headers = {"Accept": accept}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}/metrics", headers=headers) as r,
    ):
        assert r.status == 200
        return r.headers["Content-Type"], await r.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def by_labels(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str
) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: v for (n, labels), v in values.items() if n == name and v}


def model_label(record: dict[str, Any]) -> str:
    return record["priced_as"] or record["model"] or "none"


async def upstream_router(request: web.Request) -> web.StreamResponse:
    """Answers by path: recorded streams, a JSON answer, a 500, and a stream that never ends."""
    path = request.path
    if path == "/v1/chat/completions":
        body = json.loads(await request.read() or b"{}")
        if body.get("stream"):
            recorded = case("012")
            return web.Response(body=recorded.body, headers={"Content-Type": "text/event-stream"})
        if body.get("model") == "boom":
            return web.json_response(
                {"error": {"message": "internal", "type": "server_error"}}, status=500
            )
        answer = {"model": body.get("model", "gpt-4o-mini-2024-07-18"), "choices": [{"index": 0, "message": {"content": "Hello there, friend."}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 21, "completion_tokens": 5}}  # fmt: skip
        return web.json_response(answer)
    if path == "/v1/messages":
        return web.Response(body=case("046").body, headers={"Content-Type": "text/event-stream"})
    if path == "/api/chat":
        return web.Response(body=case("052").body, headers={"Content-Type": "application/x-ndjson"})
    if path == "/v1/hang":
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"index":0,"delta":{"content":"one"}}]}\n\n')
        await asyncio.sleep(30)
        return response
    return web.json_response({"error": "not found"}, status=404)


async def test_metrics_equal_the_sum_of_the_usage_records(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    upstream.handler = upstream_router
    running = await make_proxy(
        upstreams={"main": {"url": upstream.url, "api_key": PROVIDER_KEY}, "dead": {"url": "http://127.0.0.1:9"}},
        routes=[{"path_prefix": "/dead", "upstream": "dead"}, {"path_prefix": "/v1", "upstream": "main"},
                {"path_prefix": "/api", "upstream": "main"}],
        tenants=TENANTS,
        pricing={"egress": {"usd_per_gb": 0.09, "directions": ["client_out", "upstream_out"]}},
    )  # fmt: skip
    base = f"http://127.0.0.1:{running.proxy_port}"
    acme = {"Authorization": f"Bearer {ACME_KEY}"}
    globex = {"x-api-key": GLOBEX_KEY}
    stream_chat = (
        b'{"model":"gpt-3.5-turbo","stream":true,"messages":[{"role":"user","content":"Hi"}]}'
    )
    async with aiohttp.ClientSession(auto_decompress=False) as client:
        for headers, gzip in ((acme, True), (acme, False), (globex, True), ({}, False)):
            h = {**headers, "Accept-Encoding": "gzip" if gzip else "identity"}
            async with client.post(f"{base}/v1/chat/completions", data=stream_chat, headers=h) as r:
                await r.read()
        for model in ("gpt-4o-mini-2024-07-18", "gpt-4o-2024-08-06", "some-local-model", "boom"):
            async with client.post(
                f"{base}/v1/chat/completions",
                data=json.dumps({"model": model}).encode(),
                headers=acme,
            ) as r:
                await r.read()
        async with client.post(
            f"{base}/v1/messages",
            data=b'{"model":"claude-3-5-sonnet-20240620","stream":true}',
            headers={**globex, "Accept-Encoding": "gzip"},
        ) as r:
            await r.read()
        async with client.post(f"{base}/api/chat", data=b'{"model":"gemma3:1b"}') as r:
            await r.read()
        async with client.post(f"{base}/dead/v1/chat/completions", data=b"{}", headers=acme) as r:
            assert r.status == 502
        async with client.get(f"{base}/nowhere") as r:
            assert r.status == 404
        # A client that leaves mid-stream.
        reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
        writer.write(b"POST /v1/hang HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        await reader.readuntil(b"one")
        writer.close()
        await records.wait_for(13)
    # The provider key went upstream; the tenants' keys did not.
    for request, _ in upstream.requests:
        assert request.headers.get("Authorization") in (f"Bearer {PROVIDER_KEY}", None)
        assert ACME_KEY not in str(request.headers) and GLOBEX_KEY not in str(request.headers)

    assert len(records) == 13
    assert {r["tenant"] for r in records} == {"acme", "globex", "anonymous"}
    # The upstream that could not be reached was sent nothing and processed no tokens.
    dead = next(r for r in records if r["upstream"] == "dead")
    assert dead["bytes"]["upstream_out"] == 0 and dead["tokens_source"] == "none"
    assert dead["cost_usd"]["input"] == 0 and dead["cost_usd"]["egress"] > 0  # the 502 went out
    _, text = await scrape(running.admin_port)
    values = samples(text)

    def expect(
        groups: dict[tuple[tuple[str, str], ...], float], name: str, exact: bool = True
    ) -> None:
        got = by_labels(values, name)
        want = {k: v for k, v in groups.items() if v}
        assert set(got) == set(want), (name, set(got) ^ set(want))
        for key, value in want.items():
            assert got[key] == (value if exact else pytest.approx(value, rel=1e-9, abs=1e-15)), (
                name,
                key,
            )

    requests: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    tokens: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    wire: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    cost: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    durations: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    ttfts: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    saved: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    disconnects: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)
    for r in records:
        model = model_label(r)
        requests[
            tuple(
                sorted(
                    {
                        "route": r["route"],
                        "upstream": r["upstream"],
                        "model": model,
                        "tenant": r["tenant"],
                        "code": str(r["status"]),
                        "outcome": r["outcome"],
                    }.items()
                )
            )
        ] += 1
        durations[
            tuple(sorted({"route": r["route"], "upstream": r["upstream"], "model": model}.items()))
        ] += 1
        if r["timings"]["ttft_s"] is not None:
            ttfts[
                tuple(
                    sorted({"route": r["route"], "upstream": r["upstream"], "model": model}.items())
                )
            ] += 1
        for kind, value in r["tokens"].items():
            if r["tokens_source"] != "none":
                source = (
                    "estimated"
                    if r["tokens_source"] == "estimated"
                    or (r["tokens_source"] == "mixed" and kind in ("output", "reasoning"))
                    else "reported"
                )
                tokens[
                    tuple(
                        sorted(
                            {
                                "upstream": r["upstream"],
                                "model": model,
                                "tenant": r["tenant"],
                                "type": kind,
                                "source": source,
                            }.items()
                        )
                    )
                ] += value
        for direction, value in r["bytes"].items():
            wire[
                tuple(
                    sorted(
                        {
                            "direction": direction,
                            "upstream": r["upstream"],
                            "tenant": r["tenant"],
                        }.items()
                    )
                )
            ] += value
        for kind, value in r["cost_usd"].items():
            if kind != "total":
                cost[
                    tuple(
                        sorted(
                            {
                                "upstream": r["upstream"],
                                "model": model,
                                "tenant": r["tenant"],
                                "kind": kind,
                            }.items()
                        )
                    )
                ] += value
        saved[(("tenant", r["tenant"]),)] += r["compression_saved_bytes"]
        if r["outcome"] == "client_disconnect":
            disconnects[(("route", r["route"]),)] += 1

    expect(requests, "tallygate_requests_total")
    expect(tokens, "tallygate_tokens_total")
    expect(wire, "tallygate_bytes_total")
    expect(cost, "tallygate_cost_usd_total", exact=False)
    expect(durations, "tallygate_request_duration_seconds_count")
    expect(ttfts, "tallygate_time_to_first_token_seconds_count")
    expect(saved, "tallygate_compression_saved_bytes_total")
    expect(disconnects, "tallygate_client_disconnects_total")
    errors = by_labels(values, "tallygate_upstream_errors_total")
    assert errors == {
        (("reason", "status_5xx"), ("upstream", "main")): 1,
        (("reason", "unreachable"), ("upstream", "dead")): 1,
    }
    unpriced = by_labels(values, "tallygate_unpriced_tokens_total")
    # Not "boom": its 500 carried no usage, so it has no tokens to be priced or unpriced.
    assert set(dict(k)["model"] for k in unpriced) == {"some-local-model", "gemma3:1b"}
    assert sum(unpriced.values()) == sum(r["unpriced_tokens"] for r in records)
    assert all(v == 0 for (n, _), v in values.items() if n == "tallygate_streams_active")
    assert sum(r["cost_usd"]["egress"] for r in records) > 0
    assert sum(r["compression_saved_bytes"] for r in records) > 0
    # Zeros exported up front: a metering stage that never failed is still there.
    assert (("tallygate_metering_errors_total", (("stage", "framing"),))) in values
    assert values[("tallygate_build_info", (("version", "0.1.0"),))] == 1


async def test_model_labels_stay_bounded(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    upstream.handler = upstream_router
    running = await make_proxy(metrics={"max_models": 20})
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"

    async def send(names: range) -> str:
        for i in names:
            async with client.post(
                url, data=json.dumps({"model": f"unknown-model-{i}"}).encode()
            ) as r:
                await r.read()
        return (await scrape(running.admin_port))[1]

    def series(text: str) -> int:
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    after_300 = await send(range(300))
    after_1000 = await send(range(300, 1000))
    models = {
        dict(labels)["model"]
        for (name, labels) in samples(after_1000)
        if name == "tallygate_requests_total"
    }
    assert len(models) == 21 and "other" in models
    # 700 more distinct names added no series at all.
    assert series(after_1000) == series(after_300)


async def test_openmetrics_and_the_metrics_token(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    running = await make_proxy(admin={"listen": "127.0.0.1:0", "metrics_token": "scrape-me"})
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{running.admin_port}/metrics") as r,
    ):
        assert r.status == 401
    content_type, text = await scrape(
        running.admin_port, "application/openmetrics-text; version=1.0.0", "scrape-me"
    )
    assert content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    content_type, text = await scrape(running.admin_port, "text/plain", "scrape-me")
    assert content_type.startswith("text/plain")
    assert "tallygate_config_info{hash=" in text
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{running.proxy_port}/metrics") as r,
    ):
        assert (
            r.status != 200 or "tallygate_requests_total" not in await r.text()
        )  # never on the edge


async def test_a_metrics_token_with_a_byte_above_0x7f_is_a_401(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    running = await make_proxy(admin={"listen": "127.0.0.1:0", "metrics_token": "scrape-me"})
    reader, writer = await asyncio.open_connection("127.0.0.1", running.admin_port)
    writer.write(
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer scrape-m\xe9\r\n"
        b"Connection: close\r\n\r\n"
    )
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401")


async def test_junk_model_names_from_refused_requests_take_no_label_slot(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    async def not_found_unless_real(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        if body["model"].startswith("junk"):
            return web.json_response({"error": {"message": "no such model"}}, status=404)
        return web.json_response({"model": body["model"], "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 1}})  # fmt: skip

    upstream.handler = not_found_unless_real
    running = await make_proxy(metrics={"max_models": 5})
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    for model in [f"junk-{i}" for i in range(50)] + ["my-local-model"]:
        async with client.post(url, json={"model": model, "messages": []}) as r:
            await r.read()
    _, text = await scrape(running.admin_port)
    models = {
        dict(labels)["model"]
        for (name, labels) in samples(text)
        if name == "tallygate_requests_total"
    }
    assert "my-local-model" in models  # served by the upstream: it has its label
    assert not any(m.startswith("junk") for m in models)
