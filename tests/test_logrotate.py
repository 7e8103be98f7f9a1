"""logrotate: the access log is moved away under load, tallygate is signalled (SIGUSR1, as
nginx; SIGHUP, a reload, too), and every request's record is in exactly one of the files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from conftest import FakeUpstream, start_serve

ROOT = Path(__file__).resolve().parent.parent


async def answer(_: web.Request) -> web.StreamResponse:
    return web.json_response({"model": "gpt-4o", "choices": []})


@pytest.mark.parametrize("workers", [1, 2])
async def test_no_record_is_lost_or_written_twice_across_rotations(
    upstream: FakeUpstream, tmp_path: Path, workers: int
) -> None:
    upstream.handler = answer
    log = tmp_path / "usage.jsonl"
    config = {
        "listen": "127.0.0.1:0", "admin": {"listen": "127.0.0.1:0"}, "workers": workers,
        "upstreams": {"main": {"url": upstream.url}},
        "routes": [{"path_prefix": "/", "upstream": "main"}],
        "access_log": str(log), "shutdown_grace": "5s",
    }  # fmt: skip
    proc, port, _, _ = await start_serve(tmp_path, config, workers)
    sent: list[str] = []
    progress = asyncio.Event()
    running = True

    async def load(client: aiohttp.ClientSession, n: int) -> None:
        i = 0
        while running:
            request_id = f"load-{n}-{i}"
            async with client.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "gpt-4o", "messages": []},
                headers={"X-Request-Id": request_id},
            ) as r:
                assert r.status == 200
                await r.read()
            sent.append(request_id)
            progress.set()
            i += 1

    async def sent_at_least(count: int) -> None:
        async with asyncio.timeout(30):
            while len(sent) < count:
                progress.clear()
                await progress.wait()

    async def written(path: Path) -> None:
        """Until records are in `path` (they are written in batches, every 50 ms)."""
        for _ in range(600):
            if has_records(path):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"nothing written to {path}")

    try:
        async with aiohttp.ClientSession() as client:
            loads = [asyncio.create_task(load(client, n)) for n in range(8)]
            await sent_at_least(100)
            await written(log)
            log.rename(tmp_path / "usage.jsonl.1")  # logrotate's move...
            proc.send_signal(signal.SIGUSR1)  # ...and its postrotate
            await sent_at_least(len(sent) + 200)
            await written(log)
            (tmp_path / "usage.jsonl.1").rename(tmp_path / "usage.jsonl.2")
            log.rename(tmp_path / "usage.jsonl.1")
            proc.send_signal(signal.SIGHUP)  # a reload reopens it too
            await sent_at_least(len(sent) + 200)
            running = False
            await asyncio.gather(*loads)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
    files = [tmp_path / name for name in ("usage.jsonl.2", "usage.jsonl.1", "usage.jsonl")]
    recorded = {
        file.name: [json.loads(line)["client_request_id"] for line in file.read_text().splitlines()]
        for file in files
    }
    every = [rid for ids in recorded.values() for rid in ids]
    assert sorted(every) == sorted(sent)  # none lost, none twice
    assert all(recorded.values())  # each file was written to


def has_records(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def test_the_logrotate_snippet_signals_usr1() -> None:
    text = (ROOT / "deploy" / "logrotate" / "tallygate").read_text()
    snippet = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "postrotate" in snippet and "USR1" in snippet and "copytruncate" not in snippet
    assert os.path.basename("/var/log/tallygate/usage.jsonl") in snippet
