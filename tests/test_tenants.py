"""Tenants: issued keys, the trusted header, and auth.require_key."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tallygate.config import ConfigError, load_config_text
from tallygate.policy.tenants import Tenants, hash_key

from conftest import FakeUpstream, ProxyFactory, RecordLog

KEY = "tg-live-acme-7f3c"


async def echo(request: web.Request) -> web.StreamResponse:
    return web.json_response({k.lower(): v for k, v in request.headers.items()})


@pytest.mark.parametrize(
    ("path", "shape"),
    [("/v1/chat/completions", "openai"), ("/v1/messages", "anthropic"), ("/api/chat", "ollama")],
)
async def test_require_key_refuses_before_forwarding(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession, records: RecordLog,
    path: str, shape: str,
) -> None:  # fmt: skip
    upstream.handler = echo
    running = await make_proxy(
        tenants={"acme": {"keys": [hash_key(KEY)]}}, auth={"require_key": True}
    )
    url = f"http://127.0.0.1:{running.proxy_port}{path}"
    for headers in ({}, {"Authorization": "Bearer sk-someone-elses"}, {"x-api-key": "nope"}):
        async with client.post(url, data=b"{}", headers=headers) as r:
            assert r.status == 401
            body = orjson.loads(await r.read())
        if shape == "openai":
            assert body["error"]["code"] == "invalid_api_key"
        elif shape == "anthropic":
            assert body["error"]["type"] == "authentication_error"
        else:
            assert isinstance(body["error"], str)
    assert upstream.requests == []
    assert [r["outcome"] for r in records] == ["rejected"] * 3
    async with client.post(url, data=b"{}", headers={"x-api-key": KEY}) as r:
        assert r.status == 200
        seen = orjson.loads(await r.read())
    assert "x-api-key" not in seen and "authorization" not in seen
    assert records[-1]["tenant"] == "acme"


async def test_tenant_header_only_from_trusted_peers(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    records: RecordLog,
) -> None:
    upstream.handler = echo
    tenants = {"acme": {"keys": [hash_key(KEY)]}}
    untrusted = await make_proxy(tenants=tenants, tenant_header="X-Tenant")
    trusted = await make_proxy(
        tenants=tenants, tenant_header="X-Tenant", trusted_proxies=["127.0.0.1"]
    )
    for running, named, expected in (
        (untrusted, "acme", "anonymous"),
        (trusted, "acme", "acme"),
        (trusted, "initech", "other"),
    ):
        async with client.get(
            f"http://127.0.0.1:{running.proxy_port}/v1/models", headers={"X-Tenant": named}
        ) as r:
            await r.read()
        assert records[-1]["tenant"] == expected
    # Without require_key, an unknown key is the client's own: it goes through untouched.
    async with client.get(
        f"http://127.0.0.1:{untrusted.proxy_port}/v1/models",
        headers={"Authorization": "Bearer sk-own"},
    ) as r:
        assert orjson.loads(await r.read())["authorization"] == "Bearer sk-own"


def test_identify() -> None:
    tenants = Tenants({"acme": (hash_key(KEY),)}, header=None)
    assert tenants.identify({"Authorization": f"Bearer {KEY}"}, trusted=False).tenant == "acme"  # type: ignore[union-attr]
    assert (
        tenants.identify(CIMultiDict({"authorization": f"bearer  {KEY} "}), trusted=False).tenant
        == "acme"
    )  # type: ignore[union-attr]
    assert tenants.identify({}, trusted=False).tenant == "anonymous"  # type: ignore[union-attr]


def test_config_wants_hashes_never_keys() -> None:
    base = "upstreams: {a: {url: 'http://x'}}\nroutes: [{path_prefix: /, upstream: a}]\n"
    with pytest.raises(ConfigError) as raised:
        load_config_text(base + f"tenants: {{acme: {{keys: ['{KEY}']}}}}\n", {})
    assert raised.value.problems == [
        "tenants.acme.keys[0]: expected a SHA-256 hex digest (tallygate hash-key), never the key itself"
    ]
    with pytest.raises(ConfigError) as raised:
        load_config_text(base + "auth: {require_key: true}\n", {})
    assert "auth.require_key" in raised.value.problems[0]
    config = load_config_text(
        base + f"tenants: {{acme: {{keys: ['sha256:{hash_key(KEY)}']}}}}\n", {}
    )
    assert config.tenants["acme"].keys == (hash_key(KEY),)


def test_hash_key_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tallygate", "hash-key"],
        input=KEY + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == hash_key(KEY)
    assert KEY not in done.stdout


@pytest.mark.parametrize("header", [b"Authorization: Bearer k\xe9y", b"x-api-key: k\xffy"])
async def test_a_key_with_a_byte_above_0x7f_is_refused_as_any_wrong_key(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog, header: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    upstream.handler = echo
    running = await make_proxy(
        tenants={"acme": {"keys": [hash_key(KEY)]}}, auth={"require_key": True}
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n%s\r\nConnection: close\r\n"
        b"Content-Length: 2\r\n\r\n{}" % header
    )
    answer = await reader.read()
    writer.close()
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 401")
    assert orjson.loads(body)["error"]["code"] == "invalid_api_key"
    await records.wait_for(1)
    assert (records[0]["status"], records[0]["outcome"]) == (401, "rejected")
    assert "Traceback" not in caplog.text
    assert upstream.requests == []


@pytest.mark.parametrize(
    ("dialect", "shape"),
    [("anthropic_messages", "anthropic"), ("ollama_chat", "ollama"), ("auto", "openai")],
)
async def test_an_error_takes_the_shape_of_the_routes_api_wherever_it_is_mounted(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
    dialect: str, shape: str,
) -> None:  # fmt: skip
    """A route's dialect decides whose error shape its clients get, not the path: an Anthropic
    route mounted at /claude/ answers a refused key as Anthropic's SDK expects."""
    upstream.handler = echo
    running = await make_proxy(
        routes=[{"path_prefix": "/claude/", "upstream": "main", "dialect": dialect}],
        tenants={"acme": {"keys": [hash_key(KEY)]}}, auth={"require_key": True},
    )  # fmt: skip
    url = f"http://127.0.0.1:{running.proxy_port}/claude/send"
    async with client.post(url, data=b"{}") as r:
        assert r.status == 401
        body = orjson.loads(await r.read())
    if shape == "anthropic":
        assert body == {"type": "error", "error": {"type": "authentication_error",
                                                   "message": "a valid API key is required"}}  # fmt: skip
    elif shape == "ollama":
        assert body == {"error": "a valid API key is required"}
    else:
        assert body["error"]["code"] == "invalid_api_key"
