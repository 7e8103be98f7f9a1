"""The access log sink: whole lines, never blocking, failures counted."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tallygate.accesslog import AccessLog

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
