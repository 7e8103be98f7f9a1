"""SIGHUP reloads the configuration file: streams in flight finish as they began, the next
requests follow the new file, and a bad file is refused while the old configuration serves on."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from conftest import FakeUpstream, paced_stream, start_serve

EVENTS = [b'data: {"n":%d}\n\n' % i for i in range(8)]


def config(upstream: str, **extra: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"},
        "upstreams": {"main": {"url": upstream}},
        "routes": [{"path_prefix": "/", "upstream": "main"}],
        "shutdown_grace": "5s", "ledger": "off", **extra,
    }  # fmt: skip


async def read_lines_until(proc: asyncio.subprocess.Process, pattern: str) -> str:
    assert proc.stderr is not None
    async with asyncio.timeout(10):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "tallygate exited"
            if re.search(pattern, line):
                return line


async def config_hash(admin: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{admin}/metrics") as r:
        found = re.search(r'tallygate_config_info\{hash="(\w+)"\}', await r.text())
    assert found
    return found[1]


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_applies_the_new_file_to_new_requests_only(
    tmp_path: Path, upstream: FakeUpstream, workers: int
) -> None:
    upstream.handler = paced_stream(EVENTS)
    other = FakeUpstream()
    await other.start()

    async def b(_: web.Request) -> web.StreamResponse:
        return web.json_response({"upstream": "b"})

    other.handler = b
    proc, port, admin, _ = await start_serve(tmp_path, config(upstream.url, workers=workers),
                                             workers=workers)  # fmt: skip
    path = tmp_path / "tallygate.yaml"
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        before = await config_hash(admin)
        async with aiohttp.ClientSession() as client:
            async with client.post(url, data=b"{}") as streaming:
                first = await streaming.content.readuntil(b"\n\n")
                path.write_text(yaml.safe_dump(
                    config(other.url, workers=workers, listen="127.0.0.1:1")
                ))  # fmt: skip
                proc.send_signal(signal.SIGHUP)
                line = await read_lines_until(proc, "need a restart|reloaded")
                if "need a restart" not in line:
                    line = await read_lines_until(proc, "need a restart")
                assert "listen" in line and "workers" not in line
                await asyncio.sleep(0.3 if workers == 1 else 1.0)  # workers re-read the file
                # New requests: the new upstream, on every worker.
                for _ in range(6):
                    async with client.post(url, data=b"{}") as r:
                        assert await r.json() == {"upstream": "b"}
                # The stream in flight finishes from the old upstream, whole.
                rest = await streaming.read()
            assert first + rest == b"".join(EVENTS)
            assert await config_hash(admin) != before

            # A bad file: refused, named, and the running configuration serves on.
            path.write_text("upstreams: {main: {url: 'ftp://nope'}}\nroutes: []\n")
            proc.send_signal(signal.SIGHUP)
            line = await read_lines_until(proc, "reload refused")
            problems = await read_lines_until(proc, "upstreams.main.url")
            assert "http:// or https://" in problems
            async with client.post(url, data=b"{}") as r:
                assert await r.json() == {"upstream": "b"}
        assert proc.returncode is None
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 15)
        await other.stop()
