"""Shared test harness: the recorded corpus, a fake upstream, and tallygate started in-process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tallygate.config import Config, load_config_text
from tallygate.core.dialects import Usage
from tallygate.proxy.server import Running, start

ROOT = Path(__file__).resolve().parent.parent
# The recorded corpus lives in the repository (see corpus/PROVENANCE.md).
CORPUS = ROOT / "tests" / "corpus"


def tiktoken_cache_dir(environ: Mapping[str, str], beside: Path) -> str | None:
    """Where tiktoken should find its encodings: `TIKTOKEN_CACHE_DIR` when set, else the copy in
    `../shared/tiktoken-cache` when there is one, else None (tiktoken downloads them)."""
    if environ.get("TIKTOKEN_CACHE_DIR"):
        return environ["TIKTOKEN_CACHE_DIR"]
    shared = beside / "shared" / "tiktoken-cache"
    return str(shared) if shared.is_dir() else None


_cache = tiktoken_cache_dir(os.environ, ROOT.parent)
if _cache is not None:
    os.environ["TIKTOKEN_CACHE_DIR"] = _cache


@dataclass(frozen=True)
class Case:
    id: str
    body: bytes
    meta: dict[str, Any]
    request: bytes | None

    @property
    def content_type(self) -> str:
        return str(self.meta["content_type"])

    @property
    def content_type_header(self) -> str:
        """The header as recorded; one case records only a note, so fall back to the type."""
        recorded = str(self.meta.get("content_type_recorded") or "")
        return recorded if recorded and "(" not in recorded else self.content_type

    @property
    def path(self) -> str:
        # One case annotates its path ("/v1/chat/completions (implied by ...)").
        return str(self.meta["endpoint_path"]).split()[0]


def load_corpus() -> list[Case]:
    cases = []
    for folder in sorted(p for p in CORPUS.iterdir() if p.is_dir()):
        request = folder / "request.json"
        cases.append(
            Case(
                id=folder.name,
                body=(folder / "response.body").read_bytes(),
                meta=json.loads((folder / "meta.json").read_text()),
                request=request.read_bytes() if request.exists() else None,
            )
        )
    return cases


CASES = load_corpus()


def expected_usage(meta: dict[str, Any]) -> Usage | None:
    """The corpus's normalized numbers, in tallygate's convention (input includes cache)."""
    usage = meta["usage"]
    if usage is None:
        return None
    if "prompt_tokens" in usage:
        return Usage(
            usage["prompt_tokens"],
            usage["completion_tokens"],
            usage.get("cached_tokens") or 0,
            0,
            usage.get("reasoning_tokens") or 0,
        )
    if "cache_creation_input_tokens" in usage:
        written, read = (
            usage["cache_creation_input_tokens"] or 0,
            usage["cache_read_input_tokens"] or 0,
        )
        return Usage(
            usage["input_tokens"] + written + read, usage["output_tokens"], read, written, 0
        )
    if "input_tokens" in usage:
        return Usage(
            usage["input_tokens"],
            usage["output_tokens"],
            usage.get("cached_tokens") or 0,
            0,
            usage.get("reasoning_tokens") or 0,
        )
    return Usage(usage["prompt_eval_count"], usage["eval_count"])


def gunzip(data: bytes) -> bytes:
    """Decode one complete gzip member and insist nothing follows it."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data) + d.flush()
    assert d.eof, "gzip stream is not complete"
    assert not d.unused_data, "bytes after the gzip trailer"
    return out


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def paced_stream(events: list[bytes], pace: float = 0.1) -> Handler:
    """An upstream handler sending `events` as an event stream, `pace` seconds apart: a stream
    that is still in flight while a test reloads, drains or signals the proxy."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            await asyncio.sleep(pace)
        await response.write_eof()
        return response

    return handler


class FakeUpstream:
    """An aiohttp server on 127.0.0.1 with an OS-chosen port; tests set `handler`."""

    def __init__(self) -> None:
        self.handler: Handler | None = None
        self.requests: list[tuple[web.Request, bytes]] = []
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append((request, body))
        assert self.handler is not None, "the test set no upstream handler"
        return await self.handler(request)

    async def start(self) -> None:
        app = web.Application(client_max_size=2**30)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def config_for(upstream_url: str, **overrides: Any) -> Config:
    """A config with both listeners on OS-chosen ports, every route to `upstream_url`."""
    doc: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin": {"listen": "127.0.0.1:0"},
        "upstreams": {"main": {"url": upstream_url}},
        "routes": [{"path_prefix": "/", "upstream": "main"}],
        "shutdown_grace": "5s",
        "access_log": "off",  # tests read records through `on_record`
        "ledger": "off",  # the ledger's own tests turn it on
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return load_config_text(yaml.safe_dump(doc), env={})


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    server = FakeUpstream()
    await server.start()
    yield server
    await server.stop()


ProxyFactory = Callable[..., Awaitable[Running]]


class RecordLog(list[dict[str, Any]]):
    """The usage records of the proxies a test started, as written to the access log."""

    def __init__(self) -> None:
        super().__init__()
        self._arrived = asyncio.Event()

    def add(self, record: dict[str, Any]) -> None:
        self.append(record)
        self._arrived.set()

    async def wait_for(self, count: int) -> None:
        """Until `count` records are in, 5 s at the most (a test that waits longer fails)."""
        async with asyncio.timeout(5):
            while len(self) < count:
                self._arrived.clear()
                await self._arrived.wait()


@pytest.fixture
def records() -> RecordLog:
    return RecordLog()


@pytest.fixture
async def make_proxy(upstream: FakeUpstream, records: RecordLog) -> AsyncIterator[ProxyFactory]:
    started: list[Running] = []

    async def factory(upstream_url: str | None = None, **overrides: Any) -> Running:
        config = config_for(upstream_url or upstream.url, **overrides)
        running = await start(config, on_record=lambda record: records.add(record.as_dict()))
        started.append(running)
        return running

    yield factory
    for running in started:
        await running.drain_and_stop()


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress off: tests look at the bytes on the wire and decode them themselves.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


async def start_serve(
    tmp_path: Path, config: dict[str, Any], workers: int = 1
) -> tuple[asyncio.subprocess.Process, int, int, str]:
    """`tallygate serve` as a process of its own: it, its proxy and admin ports, and its start-up
    line, once it listens (and, with workers, once each worker serves)."""
    path = tmp_path / "tallygate.yaml"
    path.write_text(yaml.safe_dump({"ledger": "off", **config}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tallygate", "serve", "--config", str(path),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None
    found, serving = None, 0
    async with asyncio.timeout(30):
        while found is None or (workers > 1 and serving < workers):
            line = (await proc.stderr.readline()).decode()
            assert line, "tallygate exited before listening"
            match = re.search(r"listening on 127\.0\.0\.1:(\d+) \(admin 127\.0\.0\.1:(\d+)\)", line)
            if match:
                found = (int(match[1]), int(match[2]), line)
            serving += "worker " in line and " serving" in line
    return proc, found[0], found[1], found[2]


# The kinds of test, as pytest markers (`pytest -m unit` runs in seconds):
# - system: real processes (tallygate serve/demo, Go, Node, curl, Chromium, Prometheus);
# - contract: tallygate in this process, with real sockets, clients and upstreams;
# - unit: pure functions, no socket.
_SYSTEM = re.compile(r"subprocess|start_serve|Prometheus|CHROMIUM|run_client|sys\.executable")
_CONTRACT = {"make_proxy", "upstream", "client", "running_proxy"}


def pytest_configure(config: pytest.Config) -> None:
    for kind, what in (
        ("unit", "pure functions, no socket: seconds"),
        ("contract", "tallygate in this process, with real sockets, clients and upstreams"),
        ("system", "real processes: tallygate serve/demo, Go, Node, curl, Chromium, Prometheus"),
    ):
        config.addinivalue_line("markers", f"{kind}: {what}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    import inspect

    for item in items:
        function = getattr(item, "function", None)
        source = inspect.getsource(function) if function is not None else ""
        fixtures = set(getattr(item, "fixturenames", ()))
        if _SYSTEM.search(source) or fixtures & {"go_client", "page"}:
            item.add_marker(pytest.mark.system)
        elif fixtures & _CONTRACT or "start_server" in source or "open_connection" in source:
            item.add_marker(pytest.mark.contract)
        else:
            item.add_marker(pytest.mark.unit)
