"""Headers across the proxy: hop-by-hop, X-Forwarded-*, credentials, open-proxy refusal."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys

import aiohttp
import orjson
import pytest
from aiohttp import web
from multidict import CIMultiDict

from tallygate.policy.headers import ClientSide, client_address, upstream_request_headers
from tallygate.policy.routing import prefix_matches
from tallygate.policy.tenants import hash_key

from conftest import ROOT, FakeUpstream, ProxyFactory, RecordLog

SECRET = "sk-proj-TALLYGATE-TEST-SECRET-0123456789"


async def echo_headers(request: web.Request) -> web.StreamResponse:
    return web.json_response(dict(request.headers))


async def test_hop_by_hop_request_headers_are_stripped_and_forwarding_added(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    upstream.handler = echo_headers
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/models?limit=2"
    sent = {
        "Connection": "keep-alive, X-Private-Hop",
        "X-Private-Hop": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Connection": "keep-alive",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "TE": "trailers",
        "Trailer": "X-Checksum",
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Host": "evil.example",
        "X-End-To-End": "kept",
        "Accept-Encoding": "gzip, br",
    }
    async with client.get(url, headers=sent) as r:
        seen = {k.lower(): v for k, v in orjson.loads(await r.read()).items()}
    for name in ("x-private-hop", "keep-alive", "proxy-connection", "proxy-authorization",
                 "trailer"):  # fmt: skip
        assert name not in seen, name
    assert seen["te"] == "trailers"
    assert seen["x-end-to-end"] == "kept"
    assert seen["host"] == f"127.0.0.1:{upstream.port}"
    # An untrusted client's forwarding headers are replaced, not believed.
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-host"] == f"127.0.0.1:{running.proxy_port}"
    assert seen["x-forwarded-proto"] == "http"
    # The proxy reads the upstream body plain; it compresses toward the client itself.
    assert seen["accept-encoding"] == "identity"
    assert upstream.requests[-1][0].path_qs == "/v1/models?limit=2"


async def test_forwarded_for_is_appended_for_trusted_peers(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    upstream.handler = echo_headers
    running = await make_proxy(trusted_proxies=["127.0.0.0/8"])
    url = f"http://127.0.0.1:{running.proxy_port}/v1/models"
    headers = {"X-Forwarded-For": "203.0.113.9", "X-Forwarded-Proto": "https"}
    async with client.get(url, headers=headers) as r:
        seen = orjson.loads(await r.read())
    assert seen["X-Forwarded-For"] == "203.0.113.9, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "https"


def test_te_other_than_trailers_is_dropped() -> None:
    from multidict import CIMultiDict

    client = ClientSide(peer="127.0.0.1", scheme="http", host="h", trusted=False)
    out = upstream_request_headers(CIMultiDict({"TE": "gzip"}), client, None, "authorization")
    assert "TE" not in out


async def test_hop_by_hop_response_headers_are_stripped(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n"
            b"Connection: X-Upstream-Hop\r\nX-Upstream-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic\r\nTrailer: X-Sum\r\nUpgrade: h2c\r\n"
            b"X-Request-Id: req_123\r\n\r\n{}"
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        running = await make_proxy(f"http://127.0.0.1:{port}")
        async with client.get(f"http://127.0.0.1:{running.proxy_port}/v1/models") as r:
            assert await r.read() == b"{}"
            names = {k.lower() for k in r.headers}
    assert names.isdisjoint({"x-upstream-hop", "keep-alive", "proxy-authenticate", "trailer",
                             "upgrade"})  # fmt: skip
    # The provider's id goes on under its own name: X-Request-Id is the one in our record.
    assert r.headers["X-Upstream-Request-Id"] == "req_123"
    assert r.headers["X-Request-Id"] != "req_123"
    assert r.headers["Content-Length"] == "2"


@pytest.mark.parametrize(
    ("auth_header", "expected", "absent"),
    [("authorization", f"Bearer {SECRET}", "x-api-key"), ("x-api-key", SECRET, "authorization")],
)
async def test_upstream_key_replaces_the_clients_credential(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    auth_header: str,
    expected: str,
    absent: str,
) -> None:
    upstream.handler = echo_headers
    running = await make_proxy(
        upstreams={"main": {"url": upstream.url, "api_key": SECRET, "auth_header": auth_header}}
    )
    url = f"http://127.0.0.1:{running.proxy_port}/v1/models"
    client_creds = {"Authorization": "Bearer client-key", "x-api-key": "client-key"}
    async with client.get(url, headers=client_creds) as r:
        seen = {k.lower(): v for k, v in orjson.loads(await r.read()).items()}
    assert seen[auth_header] == expected
    assert absent not in seen


async def test_keys_never_reach_logs_or_error_bodies(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dead = "http://127.0.0.1:9"  # nothing listens on the discard port
    running = await make_proxy(upstreams={"main": {"url": dead, "api_key": SECRET}})
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with client.post(url, data=b"{}") as r:
        assert r.status == 502
        body = await r.read()
    assert SECRET.encode() not in body
    assert SECRET not in caplog.text


def test_check_masks_secrets_and_reports_problems(tmp_path: os.PathLike[str]) -> None:
    config = os.path.join(tmp_path, "tallygate.yaml")
    with open(config, "w") as f:
        f.write(
            "upstreams:\n"
            "  openai: {url: 'https://api.openai.com', api_key: '${KEY}'}\n"
            "  anthropic: {url: 'https://api.anthropic.com'}\n"
            "routes:\n  - {path_prefix: /, upstream: openai}\n"
        )
    env = {**os.environ, "KEY": SECRET}
    check = [sys.executable, "-m", "tallygate", "check", "--config", config]
    done = subprocess.run(check, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert "api_key: '********'" in done.stdout
    assert "auth_header: x-api-key" in done.stdout  # guessed for Anthropic's host

    with open(config, "a") as f:
        f.write("  - {path_prefix: /v1/messages, upstream: opena}\ncompresion: {level: 3}\n")
    env["TALLYGATE_CONFIG"] = config
    done = subprocess.run(check[:4], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "compresion: unknown key (did you mean 'compression'?)",
        "routes[1].upstream: unknown upstream 'opena' (known: openai, anthropic)",
    ]
    assert SECRET not in done.stdout + done.stderr

    with open(config, "w") as f:
        f.write(
            f"upstreams:\n  openai: {{url: 'https://u:{SECRET}@api.openai.com'}}\n"
            "routes:\n  - {path_prefix: /, upstream: openai}\n"
        )
    done = subprocess.run(check, capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 1
    assert "upstreams.openai.url: credentials in the URL are not supported" in done.stderr
    assert SECRET not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("request_line", "status", "code"),
    [
        (b"CONNECT api.openai.com:443 HTTP/1.1", 405, "method_not_allowed"),
        (b"GET http://api.openai.com/v1/models HTTP/1.1", 400, "not_an_open_proxy"),
        (b"OPTIONS * HTTP/1.1", 400, "not_an_open_proxy"),
    ],
)
async def test_tallygate_is_never_an_open_proxy(
    upstream: FakeUpstream, make_proxy: ProxyFactory, request_line: bytes, status: int, code: str
) -> None:
    running = await make_proxy()
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
    writer.write(request_line + b"\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status)
    assert orjson.loads(body)["error"]["code"] == code
    assert upstream.requests == []


def test_route_prefixes_match_whole_segments() -> None:
    assert prefix_matches("/v1/messages", "/v1/messages")
    assert prefix_matches("/v1/messages", "/v1/messages/count_tokens")
    assert not prefix_matches("/v1/messages", "/v1/messagesX")
    assert prefix_matches("/", "/anything")
    assert prefix_matches("/v1/", "/v1")


async def test_every_response_carries_the_request_id_of_its_record(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
    records: RecordLog,
) -> None:  # fmt: skip
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True}, headers={"Request-Id": "req_anthropic"})

    upstream.handler = ok
    running = await make_proxy(
        routes=[{"path_prefix": "/v1/", "upstream": "main"}],
        tenants={"acme": {"keys": [hash_key("tg-key")]}}, auth={"require_key": True},
    )  # fmt: skip
    base = f"http://127.0.0.1:{running.proxy_port}"
    key = {"Authorization": "Bearer tg-key"}
    cases = [
        ("/v1/models", {**key, "X-Request-Id": "client-7"}, 200),  # the client's, kept
        ("/v1/models", key, 200),  # none sent: tallygate's
        ("/v1/models", {**key, "X-Request-Id": "has space"}, 200),  # not sane: tallygate's
        ("/v1/models", {**key, "X-Request-Id": "x" * 201}, 200),
        ("/v1/models", {"X-Request-Id": "client-8"}, 401),  # refused: the id all the same
        ("/elsewhere", key, 404),
    ]
    answered = []
    for path, headers, status in cases:
        async with client.get(base + path, headers=headers) as r:
            assert r.status == status
            answered.append(r.headers["X-Request-Id"])
    await records.wait_for(len(cases))
    for record, said, (_, headers, _) in zip(records, answered, cases, strict=True):
        sent = headers.get("X-Request-Id")
        kept = sent if sent in ("client-7", "client-8") else None
        assert record["client_request_id"] == kept
        assert said == (kept or record["request_id"])
    assert records[0]["upstream_request_id"] == "req_anthropic"
    own = [r["request_id"] for r in records]
    assert len(set(own)) == len(own)


async def test_request_ids_are_unique_across_restarts(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
    records: RecordLog,
) -> None:  # fmt: skip
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    upstream.handler = ok
    for _ in range(2):  # two processes' worth of proxies: the counter starts again at 1
        running = await make_proxy()
        async with client.get(f"http://127.0.0.1:{running.proxy_port}/v1/models") as r:
            assert r.status == 200
    await records.wait_for(2)
    assert records[0]["request_id"] != records[1]["request_id"]


def test_client_address_behind_trusted_proxies() -> None:
    import ipaddress

    trusted = (ipaddress.ip_network("10.0.0.0/8"),)

    def address(peer: str | None, *forwarded: str) -> str | None:
        headers = CIMultiDict([("X-Forwarded-For", value) for value in forwarded])
        return client_address(peer, headers, trusted)

    assert address("203.0.113.9", "1.2.3.4") == "203.0.113.9"  # not believed
    assert address("10.0.0.2") == "10.0.0.2"
    assert address("10.0.0.2", "198.51.100.7") == "198.51.100.7"
    # A client may write anything left of the first untrusted hop: the rightmost untrusted wins.
    assert address("10.0.0.2", "6.6.6.6, 198.51.100.7, 10.0.0.9") == "198.51.100.7"
    assert address("10.0.0.2", "6.6.6.6", "198.51.100.7") == "198.51.100.7"
    assert address("10.0.0.2", "junk, 10.0.0.9") == "10.0.0.9"
    assert address(None, "1.2.3.4") is None


async def test_the_record_names_the_client_and_its_user_agent(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
    records: RecordLog,
) -> None:  # fmt: skip
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    upstream.handler = ok
    plain = await make_proxy()
    behind = await make_proxy(trusted_proxies=["127.0.0.1/32"])
    headers = {"User-Agent": "chat-app/1.0 " + "x" * 400, "X-Forwarded-For": "198.51.100.7"}
    for running in (plain, behind):
        async with client.get(
            f"http://127.0.0.1:{running.proxy_port}/v1/models", headers=headers
        ) as r:
            assert r.status == 200
    await records.wait_for(2)
    assert [r["client_address"] for r in records] == ["127.0.0.1", "198.51.100.7"]
    assert records[0]["user_agent"] == headers["User-Agent"][:256]


def test_the_documented_record_has_every_field_of_a_real_one(
) -> None:  # fmt: skip
    import json as jsonlib
    import re

    from tallygate.proxy.exchange import Exchange

    doc = (ROOT / "docs" / "usage-record.md").read_text()
    example = jsonlib.loads(re.search(r"```json\n(.*?)```", doc, re.S)[1])  # type: ignore[index]
    real = Exchange(request_id="x", method="POST", path="/", started=0.0)
    real.ended = 1.0
    record = real.record().as_dict()

    def shape(node: object) -> object:
        if isinstance(node, dict):
            return {k: shape(v) for k, v in node.items() if k not in ("metering_errors", "tags")}
        return None

    assert shape(example) == shape(record)
    for field in record:
        assert f"`{field}`" in doc or f"`{field}." in doc or f", `{field}`" in doc, field


def test_every_outcome_is_documented() -> None:
    from typing import get_args

    from tallygate.core.record import Outcome

    doc = (ROOT / "docs" / "usage-record.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith("| `outcome` |"))
    for outcome in get_args(Outcome):
        assert f"`{outcome}`" in row, outcome
