"""The access log sink: whole lines, never blocking, failures counted."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import generate_latest
from test_metrics import by_labels, samples

from tallygate.observe.accesslog import AccessLog

from conftest import FakeUpstream, ProxyFactory


def test_file_sink_writes_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    log = AccessLog(str(path))
    for i in range(1000):
        log.write({"n": i, "text": "é" * (i % 7)})
    log.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(1000))
    assert log.written == 1000 and log.failures == 0


def test_a_failing_sink_is_counted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog(str(tmp_path / "missing-dir" / "access.jsonl"))
    log.write({"n": 1})
    log.write({"n": 2})
    log.close()
    assert log.failures == 2 and log.written == 0
    assert "access log" in caplog.text


async def test_the_relay_goes_on_when_the_sink_fails(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    upstream.handler = ok
    running = await make_proxy(access_log=str(tmp_path / "nope" / "log.jsonl"))
    for _ in range(3):
        async with client.get(f"http://127.0.0.1:{running.proxy_port}/v1/models") as r:
            assert r.status == 200
    await running.drain_and_stop()
    assert running.proxy.access_log.failures == 3
    assert running.proxy.records == 3


async def test_records_reach_the_file_at_shutdown(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True})

    upstream.handler = ok
    path = tmp_path / "log.jsonl"
    running = await make_proxy(
        access_log=str(path), routes=[{"path_prefix": "/v1", "upstream": "main"}]
    )
    async with client.get(f"http://127.0.0.1:{running.proxy_port}/v1/models") as r:
        await r.read()
    async with client.get(f"http://127.0.0.1:{running.proxy_port}/nowhere", headers={}) as r:
        await r.read()
    await running.drain_and_stop()
    records: list[dict[str, Any]] = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["status"], r["outcome"]) for r in records] == [(200, "ok"), (404, "rejected")]
    assert records[1]["bytes"]["client_out"] > 0


def test_a_lone_surrogate_is_written_escaped(tmp_path: Path) -> None:
    """aiohttp keeps a header's undecodable byte as a lone surrogate, which JSON cannot hold."""
    path = tmp_path / "access.jsonl"
    log = AccessLog(str(path))
    log.write({"request_id": "a\udce9b", "n": [1, "\ud800"]})
    log.close()
    assert json.loads(path.read_text()) == {"request_id": "a\\udce9b", "n": [1, "\\ud800"]}


async def test_an_undecodable_header_byte_still_leaves_the_record_and_its_metrics(
    upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    async def ok(request: web.Request) -> web.StreamResponse:
        return web.json_response({"model": "gpt-4o", "choices": []})

    upstream.handler = ok
    path = tmp_path / "log.jsonl"
    running = await make_proxy(access_log=str(path))
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
    body = b'{"model":"gpt-4o","messages":[]}'
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Request-Id: caf\xe9\r\nUser-Agent: agent\xff\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await writer.drain()
    assert (await reader.read()).startswith(b"HTTP/1.1 200")
    writer.close()
    await running.drain_and_stop()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 1 and records[0]["status"] == 200
    text = generate_latest(running.proxy.metrics.registry).decode()
    requests = by_labels(samples(text), "tallygate_requests_total")
    assert [dict(labels)["code"] for labels in requests] == ["200"]
