"""The real `tallygate serve` process: start-up, SIGTERM drain, readiness."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from conftest import FakeUpstream

EVENTS = [b'data: {"n":%d}\n\n' % i for i in range(12)]


class Process:
    def __init__(self, proc: asyncio.subprocess.Process, proxy: int, admin: int) -> None:
        self.proc, self.proxy, self.admin = proc, proxy, admin
        self.log: list[str] = []


@pytest.fixture
async def serve(tmp_path: Path, upstream: FakeUpstream) -> AsyncIterator[object]:
    started: list[Process] = []

    async def launch(grace: str) -> Process:
        config = tmp_path / "tallygate.yaml"
        config.write_text(yaml.safe_dump({
            "listen": "127.0.0.1:0",
            "admin": {"listen": "127.0.0.1:0"},
            "upstreams": {"main": {"url": upstream.url}},
            "routes": [{"path_prefix": "/", "upstream": "main"}],
            "shutdown_grace": grace,
        }))  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tallygate", "serve", "--config", str(config),
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert proc.stderr is not None
        async with asyncio.timeout(20):
            while True:
                line = (await proc.stderr.readline()).decode()
                assert line, "tallygate exited before listening"
                found = re.search(
                    r"listening on 127\.0\.0\.1:(\d+) \(admin 127\.0\.0\.1:(\d+)\)", line
                )
                if found:
                    assert "event loop uvloop" in line
                    break
        process = Process(proc, int(found[1]), int(found[2]))
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
    async def slow_stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in EVENTS:
            await response.write(event)
            await asyncio.sleep(0.1)
        await response.write_eof()
        return response

    upstream.handler = slow_stream
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
