"""A browser page on another origin streams a chat completion through tallygate, as NextChat and
LobeChat do: headless Chromium loads a page from one local server, which calls tallygate (another
port: another origin) with `fetch()` and reads the stream with a `ReadableStream` reader. The page
reports each decoded event to its own server, which opens the upstream's gate for the next (see
test_clients.py): the stream must arrive event by event, with gzip (Chromium asks for it)."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from test_clients import WORDS, Gate

from tallygate.policy.tenants import hash_key

from conftest import FakeUpstream, ProxyFactory, RecordLog

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)"
)
KEY = "tg-page-key"

PAGE = """<!doctype html><meta charset="utf-8"><title>chat</title><script>
const params = new URLSearchParams(location.search);
const report = (path, body) => fetch(path, {method: "POST", body});
(async () => {
  try {
    const headers = {"Content-Type": "application/json"};
    if (params.get("key")) headers["Authorization"] = "Bearer " + params.get("key");
    const response = await fetch(params.get("api") + "/v1/chat/completions", {
      method: "POST", headers,
      body: JSON.stringify({model: "gpt-4o-mini", stream: true,
                            messages: [{role: "user", content: "Say six words."}]}),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffered = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffered += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffered.indexOf("\\n\\n")) >= 0) {
        const event = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        if (event.startsWith("data: ")) await report("/seen", event.slice(6));
      }
    }
    await report("/done", "status " + response.status + " " + response.headers.get("x-request-id"));
  } catch (error) {
    await report("/done", String(error));
  }
})();
</script>"""


class Page:
    """The page's own server (its origin), where the page reports what it decoded."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.seen: list[str] = []
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_post("/seen", self._seen)
        app.router.add_post("/done", self._done)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    @property
    def origin(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _page(self, _: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html")

    async def _seen(self, request: web.Request) -> web.Response:
        text = await request.text()
        self.seen.append(text)
        self.gate.saw(text)
        return web.Response()

    async def _done(self, request: web.Request) -> web.Response:
        if not self.done.done():
            self.done.set_result(await request.text())
        return web.Response()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def page(upstream: FakeUpstream) -> AsyncIterator[Page]:
    gate = Gate()
    upstream.handler = gate.handler
    served = Page(gate)
    await served.start()
    yield served
    await served.stop()


async def browse(url: str, profile: Path, page: Page) -> str:
    """Open `url` in headless Chromium; the page's report when it is done."""
    assert CHROMIUM is not None
    browser = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}", url,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        return await asyncio.wait_for(page.done, 60)
    finally:
        browser.kill()
        await browser.wait()


@pytest.mark.parametrize("require_key", [False, True], ids=["open", "with-key"])
async def test_a_page_on_another_origin_streams_event_by_event(
    page: Page, make_proxy: ProxyFactory, records: RecordLog, tmp_path: Path, require_key: bool
) -> None:
    auth = {"tenants": {"web": {"keys": [hash_key(KEY)]}}, "auth": {"require_key": True}}
    running = await make_proxy(
        cors={"allow_origins": [page.origin]}, **(auth if require_key else {})
    )
    api = f"http://127.0.0.1:{running.proxy_port}"
    key = f"&key={KEY}" if require_key else ""
    report = await browse(f"{page.origin}/?api={api}{key}", tmp_path / "profile", page)
    assert report.startswith("status 200 "), report
    assert all(event.is_set() for event in page.gate.decoded)
    assert [s for s in page.seen if any(f'"{w}"' in s for w in WORDS)] == page.seen[: len(WORDS)]
    assert page.seen[-1] == "[DONE]"
    await records.wait_for(2)  # the preflight and the stream
    preflight, stream = records
    assert (preflight["method"], preflight["status"]) == ("OPTIONS", 204)
    assert (stream["status"], stream["encoding"]) == (200, "gzip")
    assert report.endswith(stream["request_id"])  # the page could read the exposed id
    if require_key:
        assert stream["tenant"] == "web"


async def test_without_cors_the_browser_is_refused_as_before(
    page: Page, upstream: FakeUpstream, make_proxy: ProxyFactory, tmp_path: Path
) -> None:
    running = await make_proxy()
    api = f"http://127.0.0.1:{running.proxy_port}"
    report = await browse(f"{page.origin}/?api={api}", tmp_path / "profile", page)
    assert report == "TypeError: Failed to fetch"
    assert [request.method for request, _ in upstream.requests] == ["OPTIONS"]
