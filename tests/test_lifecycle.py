"""The real `tallygate serve` process: start-up, SIGTERM drain, readiness."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from conftest import FakeUpstream, paced_stream, start_serve

EVENTS = [b'data: {"n":%d}\n\n' % i for i in range(12)]


class Process:
    def __init__(
        self, proc: asyncio.subprocess.Process, proxy: int, admin: int, access_log: Path
    ) -> None:
        self.proc, self.proxy, self.admin = proc, proxy, admin
        self.access_log = access_log
        self.log: list[str] = []

    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]


@pytest.fixture
async def serve(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[object]:
    started: list[Process] = []

    async def launch(grace: str) -> Process:
        proc, proxy, admin, line = await start_serve(tmp_path, {
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": {"main": {"url": upstream.url}},
            "routes": [{"path_prefix": "/", "upstream": "main"}],
            "shutdown_grace": grace,
            "access_log": str(tmp_path / "access.jsonl"),
        })  # fmt: skip
        assert "event loop uvloop" in line
        process = Process(proc, proxy, admin, tmp_path / "access.jsonl")
        started.append(process)
        return process

    yield launch
    for process in started:
        if process.proc.returncode is None:
            process.proc.kill()
            await process.proc.wait()


async def status(url: str) -> int:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status


async def test_sigterm_drains_in_flight_streams_and_fails_readiness(
    upstream: FakeUpstream, serve: object
) -> None:
    upstream.handler = paced_stream(EVENTS)
    process = await serve("10s")  # type: ignore[operator]
    admin = f"http://127.0.0.1:{process.admin}"
    assert await status(f"{admin}/readyz") == 200

    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{process.proxy}/v1/chat/completions"
        async with client.post(url, data=b"{}") as r:
            received = await r.content.readuntil(b"\n\n")
            process.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            # Draining: not ready, still healthy, no new connections.
            assert await status(f"{admin}/readyz") == 503
            assert await status(f"{admin}/healthz") == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                async with aiohttp.ClientSession() as other:
                    await other.post(url, data=b"{}")
            # The stream in flight finishes, whole.
            received += await r.read()
    assert received == b"".join(EVENTS)
    assert await asyncio.wait_for(process.proc.wait(), 10) == 0
    assert [r["outcome"] for r in process.records()] == ["ok"]


async def test_streams_still_running_after_the_grace_are_cut(
    upstream: FakeUpstream, serve: object
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:
            await response.write(EVENTS[0])
            await asyncio.sleep(0.05)

    upstream.handler = endless
    process = await serve("1s")  # type: ignore[operator]
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as client:
        url = f"http://127.0.0.1:{process.proxy}/v1/chat/completions"
        async with client.post(url, data=b"{}") as r:
            await r.content.readuntil(b"\n\n")
            process.proc.send_signal(signal.SIGTERM)
            signalled = loop.time()
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    assert await asyncio.wait_for(process.proc.wait(), 10) == 0
    assert 0.9 < loop.time() - signalled < 5
    # Cut by the shutdown, and recorded as such: the log was flushed before the process went.
    [record] = process.records()
    assert (record["outcome"], record["status"]) == ("shutdown", 200)
