"""The relay's contract in motion: no buffering, disconnects, timeouts, errors before the start."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import orjson
import pytest
from aiohttp import web

from tallygate.core.dialects import OpenAIChat
from tallygate.core.framing import NdjsonFramer, SseFramer

from conftest import CASES, FakeUpstream, ProxyFactory, RecordLog


def split_events(body: bytes, ndjson: bool) -> list[bytes]:
    """The recorded body cut into its events by the framers (tested on their own)."""
    framer = NdjsonFramer() if ndjson else SseFramer()
    return [event.raw for event in [*framer.feed(body), *framer.close()]]


LOCKSTEP_CASES = [
    c for c in CASES if c.id[:3] in ("007", "018", "025", "040", "052")
]  # LF, SSE comments, CRLF, Anthropic padding, NDJSON


# A streaming request that did not ask for usage: tallygate asks for it, and so relays whole
# events through its framer (the one path where it looks at event boundaries before sending).
STREAM_REQUEST = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hi"}]}'


@pytest.mark.parametrize("request_body", [b"{}", STREAM_REQUEST], ids=["plain", "usage-requested"])
@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
@pytest.mark.parametrize("case", LOCKSTEP_CASES, ids=lambda c: c.id[:3])
async def test_each_event_reaches_the_client_before_the_next_is_sent(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    case: object,
    gzip: bool,
    request_body: bytes,
) -> None:
    """Lockstep: the upstream sends event n+1 only once the client has decoded event n. A proxy
    that held anything back (a buffer, an unflushed compressor) deadlocks, and the test fails.
    Metering is on (its default), so this also proves it adds no buffering."""
    from conftest import Case

    assert isinstance(case, Case)
    events = split_events(case.body, case.content_type == "application/x-ndjson")
    assert len(events) > 3
    stripping = request_body == STREAM_REQUEST and case.path == "/v1/chat/completions"
    # What the client is to receive: everything, except (when tallygate asked for usage) the
    # usage-only chunk, the one event it removes.
    delivered = [e for e in events if not (stripping and b'"choices":[],' in e)]
    decoded_upto = asyncio.Condition()
    received = bytearray()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": case.content_type_header})
        await response.prepare(request)
        sent = b""
        for event in events:
            await response.write(event)
            if event not in delivered:
                continue
            sent += event
            expected = sent
            async with decoded_upto:
                await asyncio.wait_for(
                    decoded_upto.wait_for(lambda e=expected: bytes(received).startswith(e)), 5
                )
        await response.write_eof()
        return response

    upstream.handler = handler
    running = await make_proxy()
    headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
    url = f"http://127.0.0.1:{running.proxy_port}{case.path}"
    async with client.post(url, data=request_body, headers=headers) as response:
        assert (response.headers.get("Content-Encoding") == "gzip") is gzip
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        async with asyncio.timeout(30):
            while chunk := await response.content.readany():
                received.extend(inflate.decompress(chunk) if inflate else chunk)
                async with decoded_upto:
                    decoded_upto.notify_all()
    assert bytes(received) == b"".join(delivered)
    assert len(delivered) == len(events) - (1 if stripping and case.id.startswith("007") else 0)


async def raw_server(
    serve: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def read_head(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if length:
        await reader.readexactly(int(length[1]))
    return head


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)
EVENT_1 = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
async def test_client_disconnect_closes_the_upstream_within_100ms(
    make_proxy: ProxyFactory, gzip: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tallygate")
    upstream_saw_close = asyncio.Event()
    closed_at: list[float] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SSE_HEAD + chunk(EVENT_1))
        await writer.drain()
        # Block mid-stream; only the proxy closing the connection ends this read.
        await reader.read()
        closed_at.append(asyncio.get_running_loop().time())
        upstream_saw_close.set()
        writer.close()

    server, port = await raw_server(serve)
    async with server:
        running = await make_proxy(f"http://127.0.0.1:{port}")
        reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
        encoding = b"gzip" if gzip else b"identity"
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
            b"Accept-Encoding: " + encoding + b"\r\n\r\n{}"
        )
        await writer.drain()
        got = b""
        async with asyncio.timeout(5):
            while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < 10:
                got += await reader.read(4096)
        if not gzip:
            assert EVENT_1 in got
        left_at = asyncio.get_running_loop().time()
        writer.close()
        await asyncio.wait_for(upstream_saw_close.wait(), 5)
        assert closed_at[0] - left_at < 0.1
    assert "POST /v1/chat/completions ended: client_disconnect (status 200)" in caplog.text


def timeouts(**values: str) -> dict[str, object]:
    return {"upstreams": {"main": {"url": "", "timeouts": values}}}


async def proxy_with_timeouts(
    make_proxy: ProxyFactory, url: str, **values: str
) -> tuple[int, object]:
    running = await make_proxy(
        upstreams={"main": {"url": url, "timeouts": values}},
    )
    return running.proxy_port, running


async def test_first_byte_timeout_answers_504_in_the_api_shape(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    async def never(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response()

    upstream.handler = never
    port, _ = await proxy_with_timeouts(make_proxy, upstream.url, first_byte="300ms")
    started = asyncio.get_running_loop().time()
    async with client.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}") as r:
        assert r.status == 504
        body = orjson.loads(await r.read())
    assert body["error"]["code"] == "upstream_timeout"
    assert body["error"]["type"] == "upstream_error"
    assert "first_byte" in body["error"]["message"]
    assert 0.25 < asyncio.get_running_loop().time() - started < 2

    # The same failure on an Anthropic path comes back in Anthropic's shape.
    async with client.post(f"http://127.0.0.1:{port}/v1/messages", data=b"{}") as r:
        assert r.status == 504
        body = orjson.loads(await r.read())
    assert body["type"] == "error" and body["error"]["type"] == "timeout_error"


@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
async def test_idle_timeout_ends_a_started_stream_without_inventing_events(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession, gzip: bool
) -> None:
    sent = EVENT_1 + b'data: {"choices":[{"delta":{"content":"lo'  # stalls inside event 2

    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(sent)
        await asyncio.sleep(30)
        return response

    upstream.handler = stalls
    port, _ = await proxy_with_timeouts(make_proxy, upstream.url, idle="300ms")
    headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
    received = b""
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with client.post(url, data=b"{}", headers=headers) as r:
        assert r.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(5):
                while piece := await r.content.readany():
                    received += inflate.decompress(piece) if gzip else piece
    # Everything the upstream sent, the half event too, and nothing more: no [DONE], no error
    # event, no clean end of the chunked body or of the gzip member.
    assert received == sent
    assert not inflate.eof


async def test_total_timeout_cuts_a_stream_that_never_ends(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while True:
            await response.write(EVENT_1)
            await asyncio.sleep(0.05)

    upstream.handler = endless
    port, _ = await proxy_with_timeouts(make_proxy, upstream.url, idle="10s", total="500ms")
    started = asyncio.get_running_loop().time()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with client.post(url, data=b"{}", headers={"Accept-Encoding": "gzip"}) as r:
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        received = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(5):
                while piece := await r.content.readany():
                    received += inflate.decompress(piece)
    elapsed = asyncio.get_running_loop().time() - started
    assert 0.45 < elapsed < 2
    assert received and len(received) % len(EVENT_1) == 0
    assert set(received.split(b"\n\n")) <= {EVENT_1[:-2], b""}


@pytest.fixture
async def unaccepting_port() -> AsyncIterator[int]:
    """A port whose accept queue is full, so a new connection hangs in SYN_SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    await asyncio.sleep(0.1)
    yield port
    for filler in fillers:
        filler.close()
    listener.close()


async def test_connect_timeout_answers_504(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession, unaccepting_port: int
) -> None:
    url = f"http://127.0.0.1:{unaccepting_port}"
    port, _ = await proxy_with_timeouts(make_proxy, url, connect="300ms")
    started = asyncio.get_running_loop().time()
    async with client.post(f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}") as r:
        assert r.status == 504
        body = orjson.loads(await r.read())
    assert body["error"]["code"] == "upstream_timeout"
    assert "connect" in body["error"]["message"]
    assert asyncio.get_running_loop().time() - started < 2


async def test_upstream_down_answers_502(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    running = await make_proxy(f"http://127.0.0.1:{dead_port}")
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with client.post(url, data=b"{}") as r:
        assert r.status == 502
        assert r.headers["Content-Type"].startswith("application/json")
        body = orjson.loads(await r.read())
    assert body["error"]["code"] == "upstream_unreachable"
    # What failed, never where the upstream lives.
    assert body["error"]["message"] == "upstream 'main' is unreachable: the connection was refused"
    assert str(dead_port) not in body["error"]["message"]
    # Ollama's clients expect {"error": "..."}.
    async with client.post(f"http://127.0.0.1:{running.proxy_port}/api/chat", data=b"{}") as r:
        assert r.status == 502
        assert isinstance(orjson.loads(await r.read())["error"], str)


async def test_upstream_errors_are_relayed_untouched(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    error = b'{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit"}}'

    async def limited(request: web.Request) -> web.StreamResponse:
        return web.Response(
            status=429, body=error, content_type="application/json",
            headers={"Retry-After": "7", "x-ratelimit-remaining-requests": "0"},
        )  # fmt: skip

    upstream.handler = limited
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with client.post(url, data=b"{}") as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "7"
        assert r.headers["x-ratelimit-remaining-requests"] == "0"
        assert await r.read() == error


async def test_no_route_answers_404(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    running = await make_proxy(routes=[{"path_prefix": "/v1", "upstream": "main"}])
    async with client.get(f"http://127.0.0.1:{running.proxy_port}/v2/models") as r:
        assert r.status == 404
        body = orjson.loads(await r.read())
    assert body["error"]["code"] == "route_not_found"
    # Prefixes match whole segments.
    async with client.get(f"http://127.0.0.1:{running.proxy_port}/v1x/models") as r:
        assert r.status == 404
    assert upstream.requests == []


async def test_oversized_request_bodies_get_413_and_are_not_forwarded(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    upstream.handler = lambda request: _ok()
    running = await make_proxy(limits={"max_request_bytes": "1KiB"})
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with client.post(url, data=b"x" * 1024) as r:
        assert r.status == 200
    async with client.post(url, data=b"x" * 1025) as r:
        assert r.status == 413
        assert orjson.loads(await r.read())["error"]["code"] == "request_too_large"

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * 200

    async with client.post(url, data=chunked()) as r:
        assert r.status == 413
    assert [len(body) for _, body in upstream.requests] == [1024]


async def _ok() -> web.StreamResponse:
    return web.json_response({"ok": True})


@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
async def test_upstream_that_dies_mid_event_is_relayed_as_cut(
    make_proxy: ProxyFactory, client: aiohttp.ClientSession, gzip: bool
) -> None:
    partial = b'data: {"choices":[{"delta":{"con'

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SSE_HEAD + chunk(EVENT_1) + chunk(partial))
        await writer.drain()
        writer.close()  # no last chunk: the upstream died

    server, port = await raw_server(serve)
    async with server:
        running = await make_proxy(f"http://127.0.0.1:{port}")
        url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
        headers = {"Accept-Encoding": "gzip" if gzip else "identity"}
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        received = b""
        async with client.post(url, data=b"{}", headers=headers) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                async with asyncio.timeout(5):
                    while piece := await r.content.readany():
                        received += inflate.decompress(piece) if gzip else piece
        assert received == EVENT_1 + partial


async def test_any_method_is_relayed_and_head_has_no_body(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    async def answer(request: web.Request) -> web.StreamResponse:
        return web.json_response({"method": request.method, "deleted": True})

    upstream.handler = answer
    running = await make_proxy()
    base = f"http://127.0.0.1:{running.proxy_port}"
    for method in ("DELETE", "PUT", "PATCH", "OPTIONS"):
        async with client.request(method, f"{base}/v1/files/file-1") as r:
            assert orjson.loads(await r.read())["method"] == method
    async with client.head(f"{base}/v1/files/file-1") as r:
        assert r.status == 200
        assert int(r.headers["Content-Length"]) > 0
        assert await r.read() == b""
    assert [req.method for req, _ in upstream.requests] == [
        "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD",
    ]  # fmt: skip


async def test_corrupt_gzip_from_the_upstream_is_an_upstream_failure(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    records: RecordLog,
) -> None:
    good = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    head = good.compress(EVENT_1) + good.flush(zlib.Z_SYNC_FLUSH)
    first_arrived = asyncio.Event()

    async def corrupt(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Content-Encoding": "gzip"}
        )
        await response.prepare(request)
        await response.write(head)
        await asyncio.wait_for(first_arrived.wait(), 5)  # a read of its own, decoded and relayed
        await response.write(b"\xff" * 64)  # not deflate
        await response.write_eof()
        return response

    upstream.handler = corrupt
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    received = b""
    async with client.post(url, data=b"{}", headers={"Accept-Encoding": "identity"}) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with asyncio.timeout(5):
                while piece := await r.content.readany():
                    received += piece
                    first_arrived.set()
    assert received == EVENT_1  # what could be decoded, and nothing invented
    await records.wait_for(1)
    assert (records[-1]["outcome"], records[-1]["status"]) == ("upstream_error", 200)


@pytest.mark.parametrize("whole", [False, True], ids=["paced", "whole"])
@pytest.mark.parametrize("request_body", [b"{}", STREAM_REQUEST], ids=["plain", "usage-requested"])
@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
async def test_bytes_go_out_before_they_are_metered(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    records: RecordLog,
    monkeypatch: pytest.MonkeyPatch,
    gzip: bool,
    request_body: bytes,
    whole: bool,
) -> None:
    """A chunk is written to the client first and metered after: a meter that blocks the event
    loop for 0.5 s on the first event delays nothing the client sees. The client is a thread
    with a plain socket, so that it reads while the loop is blocked. `whole`: the body arrives
    with its end, in one read (an answer with a Content-Length)."""
    first = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    rest = b'data: {"model":"gpt-4o","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    metered_at: list[float] = []
    original = OpenAIChat.event

    def slow_event(self: OpenAIChat, data: bytes, name: str | None) -> bool:
        if not metered_at and b'"Hi"' in data:
            metered_at.append(time.monotonic())
            time.sleep(0.5)  # the whole process waits: nothing can be sent meanwhile
        return original(self, data, name)

    monkeypatch.setattr(OpenAIChat, "event", slow_event)

    async def handler(request: web.Request) -> web.StreamResponse:
        if whole:
            body = first + rest + b"data: [DONE]\n\n"
            return web.Response(body=body, headers={"Content-Type": "text/event-stream"})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(first)
        await asyncio.sleep(0.2)
        await response.write(rest + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    upstream.handler = handler
    running = await make_proxy(compression={"gzip": gzip})

    def read_until_first_event() -> float:
        with socket.create_connection(("127.0.0.1", running.proxy_port), timeout=5) as sock:
            accept = b"Accept-Encoding: gzip\r\n" if gzip else b""
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                + accept
                + b"Content-Length: %d\r\n\r\n" % len(request_body)
                + request_body
            )
            received = b""
            decoder = zlib.decompressobj(31)
            while True:
                data = sock.recv(65536)
                assert data, "the connection closed before the first event"
                received += data
                head, _, body = received.partition(b"\r\n\r\n")
                # One chunk so far: its size line, then its bytes (unless not chunked).
                chunked = b"chunked" in head.lower()
                chunk = body.partition(b"\r\n")[2] if chunked else body
                # A whole body under compression.min_length is not compressed.
                compressed = b"content-encoding: gzip" in head.lower()
                plain = decoder.decompress(chunk) if compressed and chunk else chunk
                decoder = zlib.decompressobj(31)
                if first in plain:
                    return time.monotonic()

    arrived = await asyncio.to_thread(read_until_first_event)
    await records.wait_for(1)
    assert metered_at, "the meter never saw the first event"
    assert arrived < metered_at[0] + 0.4, "the first event waited for the meter"
    assert records[0]["estimated"]["output"] > 0  # and it was metered all the same


@pytest.mark.parametrize("gzip", [False, True], ids=["identity", "gzip"])
async def test_the_end_of_a_response_goes_out_in_one_write(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    records: RecordLog,
    monkeypatch: pytest.MonkeyPatch,
    gzip: bool,
) -> None:
    """Every read is written as it comes; at the end, gzip's trailer and the last chunk go in
    one write (one TCP segment), not two."""
    writes: list[tuple[str, int]] = []
    write, write_eof = web.StreamResponse.write, web.StreamResponse.write_eof

    # tallygate's responses only (the fake upstream is aiohttp too): it marks event streams.
    async def spy_write(self: web.StreamResponse, data: bytes) -> None:
        if self.headers.get("X-Accel-Buffering") == "no":
            writes.append(("write", len(data)))
        await write(self, data)

    async def spy_write_eof(self: web.StreamResponse, data: bytes = b"") -> None:
        if self.headers.get("X-Accel-Buffering") == "no" and data:
            writes.append(("write_eof", len(data)))
        await write_eof(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", spy_write)
    monkeypatch.setattr(web.StreamResponse, "write_eof", spy_write_eof)
    text = b"x" * 100  # 9 events of ~150 bytes: past compression.min_length
    events = [
        b'data: {"choices":[{"index":0,"delta":{"content":"%d %s"}}]}\n\n' % (i, text)
        for i in range(9)
    ]
    pace = False

    async def handler(request: web.Request) -> web.StreamResponse:
        if not pace:  # a whole answer, with a Content-Length
            return web.Response(body=b"".join(events), content_type="text/event-stream")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
            await asyncio.sleep(0.01)
        return response

    upstream.handler = handler
    running = await make_proxy(compression={"gzip": gzip})
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    accept = {"Accept-Encoding": "gzip" if gzip else "identity"}
    for pace in (False, True):
        writes.clear()
        async with client.post(url, data=b"{}", headers=accept) as response:
            assert response.headers.get("Content-Encoding") == ("gzip" if gzip else None)
            body = await response.read()  # the test client does not decode
            assert (zlib.decompress(body, 31) if gzip else body) == b"".join(events)
        kinds = [kind for kind, _ in writes]
        # write_eof() is noted when it carries bytes: the trailer, with gzip.
        end = ["write_eof"] if gzip else []
        assert kinds == (["write"] if not pace else ["write"] * len(events)) + end
    await records.wait_for(2)
    assert [r["estimated"]["output"] for r in records] == [records[0]["estimated"]["output"]] * 2
    assert records[0]["estimated"]["output"] > 9
