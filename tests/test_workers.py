"""`workers: 2`: both processes serve, metrics add up exactly, SIGTERM drains both."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from conftest import FakeUpstream, start_serve

EVENTS = [b'data: {"choices":[{"index":0,"delta":{"content":"w%d"}}]}\n\n' % i for i in range(10)]


async def start_tallygate(
    tmp_path: Path, upstream_url: str, log: Path
) -> tuple[asyncio.subprocess.Process, int, int]:
    proc, port, admin, line = await start_serve(tmp_path, {
        "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "workers": 2,
        "upstreams": {"main": {"url": upstream_url}}, "routes": [{"path_prefix": "/", "upstream": "main"}],
        "shutdown_grace": "10s", "access_log": str(log),
    }, workers=2)  # fmt: skip
    assert "2 workers" in line
    return proc, port, admin


def requests_total(text: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "tallygate_requests_total"
    )


async def test_two_workers_serve_aggregate_and_drain(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        slow = request.path == "/slow"
        for event in EVENTS:
            await response.write(event)
            if slow:
                await asyncio.sleep(0.1)
        await response.write_eof()
        return response

    upstream.handler = stream
    log = tmp_path / "access.jsonl"
    proc, port, admin = await start_tallygate(tmp_path, upstream.url, log)
    try:
        requests = 60
        # A new connection each time, so the kernel spreads them over both workers.
        for _ in range(requests):
            async with (
                aiohttp.ClientSession() as client,
                client.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}") as r,
            ):
                assert await r.read() == b"".join(EVENTS)
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"http://127.0.0.1:{admin}/metrics") as r,
        ):
            assert requests_total(await r.text()) == requests

        # Two slow streams, one per worker with luck; SIGTERM while they run: both finish.
        async def slow() -> bytes:
            async with (
                aiohttp.ClientSession() as client,
                client.post(f"http://127.0.0.1:{port}/slow", data=b"{}") as r,
            ):
                return await r.read()

        streams = [asyncio.create_task(slow()) for _ in range(4)]
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert [await s for s in streams] == [b"".join(EVENTS)] * 4
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    lines = log.read_bytes().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole: none interleaved
    assert len(records) == requests + 4
    workers = {r["request_id"].split("-")[0] for r in records}
    assert len(workers) == 2, "both workers served"
