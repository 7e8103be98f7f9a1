"""`workers: 2`: both processes serve, metrics add up exactly, SIGTERM drains both."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import yaml
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from conftest import FakeUpstream

EVENTS = [b'data: {"choices":[{"index":0,"delta":{"content":"w%d"}}]}\n\n' % i for i in range(10)]


async def start_tallygate(
    tmp_path: Path, upstream_url: str, log: Path
) -> tuple[asyncio.subprocess.Process, int, int]:
    config = tmp_path / "tallygate.yaml"
    config.write_text(yaml.safe_dump({
        "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "workers": 2,
        "upstreams": {"main": {"url": upstream_url}}, "routes": [{"path_prefix": "/", "upstream": "main"}],
        "shutdown_grace": "10s", "access_log": str(log),
    }))  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tallygate", "serve", "-c", str(config),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    ports = None
    serving = 0
    async with asyncio.timeout(30):
        while ports is None or serving < 2:
            line = (await proc.stderr.readline()).decode()
            assert line, "tallygate exited"
            found = re.search(
                r"listening on 127\.0\.0\.1:(\d+) \(admin 127\.0\.0\.1:(\d+)\), 2 workers", line
            )
            if found:
                ports = int(found[1]), int(found[2])
            serving += "worker " in line and " serving" in line
    return proc, ports[0], ports[1]


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
