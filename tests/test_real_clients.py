"""Real clients through tallygate: the official openai SDK and curl."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping

import pytest
from aiohttp import web
from openai import AsyncOpenAI

from conftest import CASES, FakeUpstream, ProxyFactory

CASE = next(c for c in CASES if c.id.startswith("012"))  # gpt-3.5, 124 output tokens of text


async def serve_case(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": CASE.content_type_header})
    await response.prepare(request)
    body = CASE.body
    for i in range(0, len(body), 211):
        await response.write(body[i : i + 211])
        await asyncio.sleep(0)
    await response.write_eof()
    return response


async def stream_text(base_url: str) -> tuple[str, Mapping[str, str]]:
    # The SDK's HTTP client asks for gzip by default and decodes it.
    async with AsyncOpenAI(base_url=base_url, api_key="sk-client", max_retries=0) as sdk:
        raw = await sdk.chat.completions.with_raw_response.create(
            model="gpt-3.5-turbo",
            messages=[{"role": "user", "content": "Write a story"}],
            stream=True,
        )
        text = []
        async for chunk in raw.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
        return "".join(text), raw.headers


async def test_openai_sdk_streams_the_same_text_through_tallygate_with_gzip(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.handler = serve_case
    running = await make_proxy()
    direct, direct_headers = await stream_text(f"{upstream.url}/v1")
    proxied, proxied_headers = await stream_text(f"http://127.0.0.1:{running.proxy_port}/v1")
    assert direct_headers.get("content-encoding") is None
    assert proxied_headers["content-encoding"] == "gzip"
    assert len(direct) > 200
    assert proxied == direct


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("compressed", [True, False], ids=["compressed", "plain"])
async def test_curl_receives_the_recorded_body(
    upstream: FakeUpstream, make_proxy: ProxyFactory, compressed: bool
) -> None:
    upstream.handler = serve_case
    running = await make_proxy()
    argv = [
        "curl", "-sS", "-N", "--fail-with-body", "-D", "-", "-o", "-",
        "-H", "Content-Type: application/json", "--data-binary", "@-",
        f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions",
    ]  # fmt: skip
    if compressed:
        argv.insert(1, "--compressed")
    curl = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(curl.communicate(CASE.request or b"{}"), 30)
    assert curl.returncode == 0, err
    head, _, body = out.partition(b"\r\n\r\n")
    assert (b"content-encoding: gzip" in head.lower()) is compressed
    assert body == CASE.body
