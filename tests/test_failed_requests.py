"""Failed and refused requests are not billed, and do not end as `ok`.

An upstream answer that is not a success (not 2xx) is priced only from the usage the provider
reported in it; without one its tokens are 0 and tallygate's estimate stays in the record's
`estimated` only. Requests tallygate refuses itself never reach a provider and cost no tokens.
A 200 whose stream breaks was served in part, and stays billed for what passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from test_metrics import by_labels, samples, scrape

from tallygate.policy.tenants import hash_key

from conftest import FakeUpstream, ProxyFactory, RecordLog

# About 2,000 input tokens for gpt-4o: a prompt that, billed, would cost something visible.
PROMPT = json.dumps(
    {"model": "gpt-4o", "messages": [{"role": "user", "content": "tokens " * 2000}]}
).encode()
NO_TOKENS = {"input": 0, "output": 0, "cached_input": 0, "cache_write_input": 0, "reasoning": 0}
TOKEN_COST_KINDS = ("input", "output", "cached_input", "cache_write_input")

# What providers answer (OpenAI's shapes): no usage in any of them.
ERRORS = {
    500: {"error": {"message": "The server had an error while processing your request.",
                    "type": "server_error", "param": None, "code": None}},
    404: {"error": {"message": "The model `gpt-9` does not exist or you do not have access to it.",
                    "type": "invalid_request_error", "param": None, "code": "model_not_found"}},
    429: {"error": {"message": "Rate limit reached for gpt-4o on tokens per min (TPM).",
                    "type": "tokens", "param": None, "code": "rate_limit_exceeded"}},
}  # fmt: skip


def assert_no_token_cost(record: dict[str, Any]) -> None:
    assert record["tokens"] == NO_TOKENS
    assert record["tokens_source"] == "none"
    assert all(record["cost_usd"][kind] == 0 for kind in TOKEN_COST_KINDS)
    # Egress is the one cost left: those bytes did cross the wire.
    assert record["cost_usd"]["total"] == record["cost_usd"]["egress"]
    assert record["unpriced_tokens"] == 0


async def metrics_of(admin_port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = await scrape(admin_port)
    return samples(text)


@pytest.mark.parametrize("status", sorted(ERRORS))
async def test_an_upstream_error_costs_no_tokens_and_keeps_its_estimate(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    records: RecordLog,
    status: int,
) -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        await request.read()
        return web.json_response(ERRORS[status], status=status)

    upstream.handler = failing
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with client.post(url, data=PROMPT) as r:
        assert r.status == status
        assert json.loads(await r.read()) == ERRORS[status]  # relayed untouched
    await records.wait_for(1)
    record = records[0]
    assert record["status"] == status
    assert record["outcome"] == "upstream_status"
    assert_no_token_cost(record)
    assert record["estimated"]["input"] > 2000  # kept, for the record only
    values = await metrics_of(running.admin_port)
    assert by_labels(values, "tallygate_tokens_total") == {}
    cost = by_labels(values, "tallygate_cost_usd_total")
    assert {dict(labels)["kind"] for labels in cost} <= {"egress"}
    assert by_labels(values, "tallygate_unpriced_tokens_total") == {}
    requests = by_labels(values, "tallygate_requests_total")
    assert [(dict(k)["code"], dict(k)["outcome"]) for k in requests] == [
        (str(status), "upstream_status")
    ]
    reasons = {dict(k)["reason"] for k in by_labels(values, "tallygate_upstream_errors_total")}
    assert reasons == (
        {"status_5xx"} if status >= 500 else {"status_429"} if status == 429 else set()
    )


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_an_upstream_error_with_reported_usage_is_priced_from_it(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    records: RecordLog,
    stream: bool,
) -> None:
    """A provider that counts a failed request says so in its answer (a synthetic upstream: a
    400 that reports the prompt it read, as a 200 would); that report, and only it, is billed."""
    usage = {"prompt_tokens": 1500, "completion_tokens": 3, "total_tokens": 1503}

    async def failing(request: web.Request) -> web.StreamResponse:
        await request.read()
        if not stream:
            body = {"error": {"message": "Invalid 'tools'", "type": "invalid_request_error"},
                    "model": "gpt-4o-2024-08-06", "usage": usage}  # fmt: skip
            return web.json_response(body, status=400)
        chunk = {"id": "x", "object": "chat.completion.chunk", "model": "gpt-4o-2024-08-06"}
        events = [
            {**chunk, "choices": [{"index": 0, "delta": {"content": "Hi "}}]},
            {**chunk, "choices": [], "usage": usage},
        ]
        text = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return web.Response(status=400, text=text, content_type="text/event-stream")

    upstream.handler = failing
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with client.post(url, data=PROMPT) as r:
        assert r.status == 400
        await r.read()
    await records.wait_for(1)
    record = records[0]
    assert record["outcome"] == "upstream_status"
    assert record["tokens_source"] == "reported"
    assert record["tokens"]["input"] == 1500 and record["tokens"]["output"] == 3
    assert record["priced_as"] == "gpt-4o"
    assert record["cost_usd"]["input"] == pytest.approx(1500 * 2.5 / 1e6)
    values = await metrics_of(running.admin_port)
    tokens = by_labels(values, "tallygate_tokens_total")
    assert {(dict(k)["type"], dict(k)["source"]): v for k, v in tokens.items()} == {
        ("input", "reported"): 1500,
        ("output", "reported"): 3,
    }


@pytest.mark.parametrize("refusal", [401, 404, 413, 503])
async def test_a_request_tallygate_refuses_costs_no_tokens(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    records: RecordLog,
    refusal: int,
) -> None:
    release = asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await release.wait()
        return response

    upstream.handler = held
    running = await make_proxy(
        tenants={"acme": {"keys": [hash_key("k-acme")]}},
        auth={"require_key": refusal == 401},
        routes=[{"path_prefix": "/v1", "upstream": "main"}],
        limits={"max_request_bytes": 1000 if refusal == 413 else 10_000_000,
                "max_streams": 1 if refusal == 503 else 0},
    )  # fmt: skip
    path = "/v2/chat/completions" if refusal == 404 else "/v1/chat/completions"
    async with contextlib.AsyncExitStack() as stack:
        if refusal == 503:  # the one stream slot, taken
            first = await stack.enter_async_context(
                client.post(
                    f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions",
                    headers={"Accept-Encoding": "identity"},
                )
            )
            assert await first.content.readline() == b"data: 1\n"
        async with client.post(f"http://127.0.0.1:{running.proxy_port}{path}", data=PROMPT) as r:
            assert r.status == refusal
            await r.read()
        release.set()
    await records.wait_for(2 if refusal == 503 else 1)
    record = next(r for r in records if r["outcome"] == "rejected")
    assert record["status"] == refusal
    assert len(upstream.requests) == (1 if refusal == 503 else 0)
    assert_no_token_cost(record)
    values = await metrics_of(running.admin_port)
    assert by_labels(values, "tallygate_tokens_total") == {}


async def test_a_200_that_breaks_mid_stream_stays_billed_for_what_passed(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    records: RecordLog,
) -> None:
    """Served in part: the provider generated it and bills it. No usage came before the cut,
    so the record carries the estimates of the prompt and of the output that passed."""

    async def breaking(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        event = {"model": "gpt-4o-2024-08-06", "choices": [{"index": 0, "delta": {"content": "one two three "}}]}  # fmt: skip
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
        assert request.transport is not None
        request.transport.close()
        return response

    upstream.handler = breaking
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with client.post(url, data=PROMPT) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    await records.wait_for(1)
    record = records[0]
    assert record["outcome"] == "upstream_error" and record["status"] == 200
    assert record["tokens_source"] == "estimated"
    assert record["tokens"]["input"] == record["estimated"]["input"] > 2000
    assert record["tokens"]["output"] > 0
    assert record["cost_usd"]["input"] > 0
