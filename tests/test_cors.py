"""CORS: preflights answered by tallygate, CORS headers on every answer to an allowed origin,
nothing of it without `cors:`."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web

from tallygate.policy.cors import CorsPolicy
from tallygate.policy.tenants import hash_key

from conftest import FakeUpstream, ProxyFactory, RecordLog

PAGE = "https://chat.example.com"
KEY = "tg-browser-key"
PREFLIGHT = {
    "Origin": PAGE,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}


def test_the_policy() -> None:
    named = CorsPolicy(allow_origins=(PAGE,), allow_credentials=True, max_age=60)
    assert named.preflight("https://evil.example", "POST", "") is None
    assert named.preflight(PAGE, "DELETE", "") is None
    assert named.preflight(PAGE, "post", "authorization") == {
        "Access-Control-Allow-Origin": PAGE,
        "Vary": "Origin",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "GET, POST",
        "Access-Control-Allow-Headers": "authorization",
        "Access-Control-Max-Age": "60",
    }
    assert named.response_headers("https://evil.example", ["x-request-id"]) == {}
    exposed = named.response_headers(PAGE, ["Content-Type", "X-Request-Id", "Retry-After"])
    assert exposed["Access-Control-Expose-Headers"] == "retry-after, x-request-id"
    anyone = CorsPolicy(allow_origins=("*",), allow_headers=("authorization",),
                        expose_headers=("x-request-id",))  # fmt: skip
    answer = anyone.preflight("https://a.example", "GET", "x-other")
    assert answer is not None
    assert answer["Access-Control-Allow-Origin"] == "*" and "Vary" not in answer
    assert answer["Access-Control-Allow-Headers"] == "authorization"
    assert anyone.response_headers("https://a.example", ["x-a"]) == {
        "Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": "x-request-id",
    }  # fmt: skip


async def upstream_answer(request: web.Request) -> web.StreamResponse:
    return web.json_response(
        {"model": "gpt-4o", "choices": []},
        headers={"Access-Control-Allow-Origin": "https://upstream.example", "X-Ratelimit-Remaining-Requests": "9"},
    )  # fmt: skip


@pytest.fixture
async def browser_proxy(upstream: FakeUpstream, make_proxy: ProxyFactory) -> str:
    upstream.handler = upstream_answer
    running = await make_proxy(
        cors={"allow_origins": [PAGE]},
        tenants={"web": {"keys": [hash_key(KEY)]}}, auth={"require_key": True},
        routes=[{"path_prefix": "/private/", "upstream": "main", "cors": False},
                {"path_prefix": "/", "upstream": "main"}],
    )  # fmt: skip
    return f"http://127.0.0.1:{running.proxy_port}"


async def test_a_preflight_is_answered_here_without_a_key_and_not_metered(
    browser_proxy: str, upstream: FakeUpstream, client: aiohttp.ClientSession, records: RecordLog
) -> None:
    url = f"{browser_proxy}/v1/chat/completions"
    async with client.options(url, headers=PREFLIGHT) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == PAGE
        assert r.headers["Access-Control-Allow-Methods"] == "GET, POST"
        assert (
            r.headers["Access-Control-Allow-Headers"] == PREFLIGHT["Access-Control-Request-Headers"]
        )
        assert r.headers["Access-Control-Max-Age"] == "600"
        assert r.headers["Vary"] == "Origin"
        assert r.headers["X-Request-Id"]
    assert upstream.requests == []
    await records.wait_for(1)
    record = records[0]
    assert (record["method"], record["status"], record["outcome"]) == ("OPTIONS", 204, "ok")
    assert record["dialect"] == "none" and record["tokens"]["input"] == 0
    # No tokens are billed; its answer's bytes are egress like any other.
    assert record["cost_usd"]["total"] == record["cost_usd"]["egress"]


async def test_a_preflight_from_another_origin_is_refused(
    browser_proxy: str, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    url = f"{browser_proxy}/v1/chat/completions"
    async with client.options(url, headers={**PREFLIGHT, "Origin": "https://evil.example"}) as r:
        assert r.status == 403
        assert orjson.loads(await r.read())["error"]["code"] == "cors_refused"
        assert "Access-Control-Allow-Origin" not in r.headers
    assert upstream.requests == []


async def test_every_answer_to_an_allowed_origin_carries_cors_headers(
    browser_proxy: str, client: aiohttp.ClientSession
) -> None:
    url = f"{browser_proxy}/v1/chat/completions"
    body = b'{"model":"gpt-4o","messages":[]}'
    cases = [({"Authorization": f"Bearer {KEY}"}, 200), ({}, 401)]  # relayed; refused (no key)
    for headers, status in cases:
        async with client.post(url, data=body, headers={"Origin": PAGE, **headers}) as r:
            assert r.status == status
            assert r.headers.getall("Access-Control-Allow-Origin") == [PAGE]  # not the upstream's
            assert "Origin" in r.headers.getall("Vary")
            exposed = r.headers["Access-Control-Expose-Headers"].split(", ")
            assert "x-request-id" in exposed
            if status == 200:
                assert "x-ratelimit-remaining-requests" in exposed
    async with client.post(url, data=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        # Not a browser's request: no CORS headers are added (the upstream's pass).
        assert r.headers["Access-Control-Allow-Origin"] == "https://upstream.example"


async def test_a_route_with_cors_off_has_none(
    browser_proxy: str, upstream: FakeUpstream, client: aiohttp.ClientSession
) -> None:
    url = f"{browser_proxy}/private/v1/models"
    async with client.options(url, headers=PREFLIGHT) as r:
        assert r.status == 401  # no CORS here: a preflight is a request like any, and needs a key
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_without_cors_a_preflight_is_relayed_and_not_metered_as_a_chat(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
    records: RecordLog,
) -> None:  # fmt: skip
    async def no_cors(request: web.Request) -> web.StreamResponse:
        return web.Response(status=404)

    upstream.handler = no_cors
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with client.options(url, headers=PREFLIGHT) as r:
        assert r.status == 404
        assert "Access-Control-Allow-Origin" not in r.headers
    assert [req.method for req, _ in upstream.requests] == ["OPTIONS"]
    await records.wait_for(1)
    assert records[0]["dialect"] == "none"
