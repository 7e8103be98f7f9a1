"""Byte for byte: every recorded stream goes through tallygate, split at awkward points."""

from __future__ import annotations

import asyncio
import itertools
import json
import random

import aiohttp
import pytest
from aiohttp import web

from conftest import CASES, Case, FakeUpstream, ProxyFactory, gunzip


def awkward_pieces(body: bytes, seed: int) -> list[bytes]:
    """Random pieces, plus cuts inside multi-byte UTF-8 characters and between CR and LF."""
    rng = random.Random(seed)
    cuts = {rng.randrange(1, len(body)) for _ in range(max(1, len(body) // 200))}
    inside_utf8 = [i for i in range(1, len(body)) if 0x80 <= body[i] < 0xC0]
    cuts.update(rng.sample(inside_utf8, min(5, len(inside_utf8))))
    crlf = [i + 1 for i in range(len(body) - 1) if body[i : i + 2] == b"\r\n"]
    cuts.update(rng.sample(crlf, min(5, len(crlf))))
    bounds = [0, *sorted(cuts), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def piecewise(case: Case, seed: int) -> web.StreamResponse:
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": case.content_type_header})
        await response.prepare(request)
        for piece in awkward_pieces(case.body, seed):
            await response.write(piece)
            await asyncio.sleep(0)
        await response.write_eof()
        return response

    return handler  # type: ignore[return-value]


@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
async def test_every_corpus_case_arrives_byte_for_byte(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession, gzip: bool
) -> None:
    running = await make_proxy()
    assert len(CASES) == 58
    for seed, case in enumerate(CASES):
        upstream.handler = piecewise(case, seed)
        headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
        async with client.post(
            f"http://127.0.0.1:{running.proxy_port}{case.path}",
            data=case.request or b"{}",
            headers=headers,
        ) as response:
            assert response.status == 200, case.id
            raw = await response.read()
            if gzip:
                assert response.headers["Content-Encoding"] == "gzip", case.id
                assert "Accept-Encoding" in response.headers["Vary"]
                assert "Content-Length" not in response.headers
                assert gunzip(raw) == case.body, case.id
            else:
                assert "Content-Encoding" not in response.headers
                assert raw == case.body, case.id
            if case.content_type == "text/event-stream":
                assert response.headers["Cache-Control"] == "no-cache"
                assert response.headers["X-Accel-Buffering"] == "no"
        # What reached the upstream is the client's request, byte for byte, except where
        # tallygate asked an OpenAI-style stream for its usage.
        sent = upstream.requests[-1][1]
        if sent != (case.request or b"{}"):
            asked = json.loads(case.request or b"{}")
            assert asked.get("stream") is True and "stream_options" not in asked, case.id
            assert json.loads(sent) == {**asked, "stream_options": {"include_usage": True}}


async def test_non_streaming_json_with_length_is_relayed_with_its_length(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    payload = b'{"id":"chatcmpl-1","choices":[{"message":{"content":"hi"}}]}'

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=payload, content_type="application/json")

    upstream.handler = handler
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with client.post(url, data=b"{}", headers={"Accept-Encoding": "gzip"}) as response:
        # Small: not worth gzip, so the length survives.
        assert response.headers["Content-Length"] == str(len(payload))
        assert "Content-Encoding" not in response.headers
        assert await response.read() == payload

    big = b'{"text":"' + b"lorem ipsum " * 500 + b'"}'
    upstream.handler = lambda request: _json(big)
    async with client.post(url, data=b"{}", headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert gunzip(await response.read()) == big


async def _json(body: bytes) -> web.StreamResponse:
    return web.Response(body=body, content_type="application/json")


async def test_gzip_encoded_upstream_is_decoded_then_recompressed(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    import gzip as gzip_module

    case = next(c for c in CASES if c.id.startswith("039"))

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.headers["Accept-Encoding"] == "identity"
        encoded = gzip_module.compress(case.body)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
        )
        await response.prepare(request)
        for i in range(0, len(encoded), 97):
            await response.write(encoded[i : i + 97])
        await response.write_eof()
        return response

    upstream.handler = handler
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/messages"
    identity = {"Accept-Encoding": "identity"}
    async with client.post(url, data=b"{}", headers=identity) as response:
        assert "Content-Encoding" not in response.headers
        assert await response.read() == case.body
    async with client.post(url, data=b"{}", headers={"Accept-Encoding": "gzip"}) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert gunzip(await response.read()) == case.body
