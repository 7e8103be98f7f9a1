"""Bad upstreams: garbage, invalid UTF-8, an event that never ends, a Content-Length that lies,
a hang after the headers. The client gets exactly what the upstream sent, memory stays bounded,
the record and the metrics say what happened, and no end is ever invented."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import re
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ProxyFactory, RecordLog

Serve = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
REQUEST = b'{"model":"gpt-4o","stream":true,"stream_options":{"include_usage":true},"messages":[]}'


async def read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


FIRST = b'data: {"choices":[{"delta":{"content":"Hel"}}]}\n\n'


async def first_event(writer: asyncio.StreamWriter) -> None:
    """A chunked event-stream head and its first event, sent and flushed."""
    writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(FIRST))
    await writer.drain()


async def relay(
    make_proxy: ProxyFactory, serve: Serve, idle: str | None = None, **overrides: object
) -> tuple[bytes, str | None, int]:
    """Start an upstream that runs `serve`, post through tallygate, and return what the client
    received, how its body ended (None: whole; else the client's error), and its status."""

    server = await asyncio.start_server(lambda r, w: _once(r, w, serve), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        url = f"http://127.0.0.1:{port}"
        if idle is not None:
            overrides["upstreams"] = {"main": {"url": url, "timeouts": {"idle": idle}}}
        running = await make_proxy(url, **overrides)
        url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
        received, ending = b"", None
        async with aiohttp.ClientSession() as client, client.post(url, data=REQUEST) as r:
            try:
                async with asyncio.timeout(10):
                    while piece := await r.content.readany():
                        received += piece
            except aiohttp.ClientPayloadError as error:
                ending = type(error).__name__
            return received, ending, r.status


async def test_garbage_and_invalid_utf8_are_relayed_exactly(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    noise = random.Random(7).randbytes(200_000)
    invalid = b'data: {"choices":[{"delta":{"content":"\xff\xfe\xc3("}}]}\n\n'
    body = invalid + noise + invalid

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Content-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 7000):
            writer.write(body[i : i + 7000])
            await writer.drain()

    received, ending, status = await relay(make_proxy, serve)
    assert (received, ending, status) == (body, None, 200)
    await records.wait_for(1)
    assert records[0]["outcome"] == "ok"  # the upstream's bytes are the upstream's business


async def test_an_event_that_never_ends_is_relayed_with_bounded_memory(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    """32 MiB with no line end: relayed as it comes; the meter gives up on the event at
    max_event_bytes instead of holding it, and says so."""
    piece = b"data: " + b"x" * (2**16 - 6)
    total = 512 * len(piece)

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(512):
            writer.write(chunk(piece))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    tracemalloc.start()
    try:
        received, ending, _ = await relay(make_proxy, serve, metering={"max_event_bytes": "1MiB"})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert ending is None
    assert len(received) == total and received == piece * 512
    # The test client itself holds the 32 MiB it received (and joins copies of it); what else is
    # allocated at peak must be far below another copy of the stream.
    assert peak < 2.5 * total
    await records.wait_for(1)
    assert records[0]["metering_errors"].get("framing") == 1
    assert records[0]["bytes"]["upstream_in"] > total


async def test_a_content_length_longer_than_the_body_is_a_cut_not_a_success(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    sent = b'data: {"choices":[{"delta":{"content":"Hello"}}]}\n\n'

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Content-Length: 5000\r\n\r\n" + sent)
        await writer.drain()  # and close: 5000 promised, fewer sent

    received, ending, status = await relay(make_proxy, serve, compression={"gzip": False})
    assert (received, status) == (sent, 200)
    assert ending is not None  # the client sees a truncated body, which is the truth
    await records.wait_for(1)
    record = records[0]
    assert (record["status"], record["outcome"]) == (200, "upstream_error")
    assert record["tokens"]["output"] >= 1  # what passed is counted
    assert record["tokens_source"] == "estimated"


async def test_a_content_length_shorter_than_the_body_ends_at_the_length(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    event = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Content-Length: %d\r\n\r\n" % len(event) + event)
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"data: extra\n\n")

    received, ending, _ = await relay(make_proxy, serve, compression={"gzip": False})
    assert (received, ending) == (event, None)  # what was declared, and nothing after it
    await records.wait_for(1)
    assert records[0]["outcome"] == "ok"


async def test_bytes_above_0x7f_in_the_status_line_and_headers_are_relayed_and_counted(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    # aiohttp hands such bytes over as lone surrogates; counting the head encoded them strictly
    # and raised, and the client got aiohttp's bare 500 instead of the upstream's answer.
    event = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    head = (b"HTTP/1.1 200 Caf\xe9\r\nContent-Type: text/event-stream\r\nX-Note: caf\xe9\r\n"
            b"Content-Length: %d\r\n\r\n" % len(event))  # fmt: skip

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(head + event)
        await writer.drain()

    received, ending, status = await relay(make_proxy, serve, compression={"gzip": False})
    assert (received, ending, status) == (event, None, 200)
    await records.wait_for(1)
    assert records[0]["bytes"]["upstream_in"] == len(head) + len(event)


async def test_a_response_that_is_not_http_is_a_502_that_quotes_nothing(
    make_proxy: ProxyFactory, records: RecordLog, caplog: pytest.LogCaptureFixture
) -> None:
    """The extra bytes arrive with the head: aiohttp's parser refuses them as a second response
    before the first is handed over. Nothing was sent yet, so the client gets a clean error."""
    secret = b"sk-echoed-SECRET-42"

    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Content-Length: 9\r\n\r\ndata: x\n\nAuthorization: " + secret)
        await writer.drain()

    received, ending, status = await relay(make_proxy, serve)
    assert status == 502 and ending is None
    assert b"upstream_invalid_response" in received and secret not in received
    assert "sent an invalid response" in caplog.text
    assert secret.decode() not in caplog.text
    await records.wait_for(1)
    assert (records[0]["outcome"], records[0]["status"]) == ("upstream_error", 502)


async def test_an_upstream_that_hangs_after_the_headers_is_cut_at_the_idle_timeout(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await first_event(writer)
        await asyncio.sleep(5)

    received, ending, status = await relay(make_proxy, serve, idle="300ms")
    assert (received, status) == (FIRST, 200)
    assert ending is not None  # no [DONE], no last chunk: a cut
    await records.wait_for(1)
    assert (records[0]["outcome"], records[0]["status"]) == ("timeout", 200)


async def test_a_failure_after_the_first_byte_never_counts_as_a_success(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await first_event(writer)
        await asyncio.sleep(0.1)  # the first byte is at the client
        writer.write(b"zz\r\n")  # a broken chunk size, then gone

    server = await asyncio.start_server(
        lambda r, w: _once(r, w, serve), "127.0.0.1", 0
    )  # fmt: skip
    port = server.sockets[0].getsockname()[1]
    async with server:
        running = await make_proxy(f"http://127.0.0.1:{port}")
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
            async with client.post(url, data=REQUEST) as r:
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
            await records.wait_for(1)
            metrics_url = f"http://127.0.0.1:{running.admin_port}/metrics"
            async with client.get(metrics_url) as m:
                text = await m.text()
    requests = {
        (s.labels["code"], s.labels["outcome"]): s.value
        for f in text_string_to_metric_families(text)
        if f.name == "tallygate_requests"
        for s in f.samples
        if s.name == "tallygate_requests_total"
    }
    assert requests == {("200", "upstream_error"): 1.0}
    assert 'tallygate_upstream_errors_total{reason="broken_body",upstream="main"} 1.0' in text


async def _once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, serve: Serve) -> None:
    await read_request(reader)
    try:
        await serve(reader, writer)
    finally:
        writer.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_a_full_disk_under_the_access_log_is_counted_and_the_relay_goes_on(
    make_proxy: ProxyFactory,
) -> None:
    async def serve(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"Content-Length: 9\r\n\r\ndata: x\n\n")
        await writer.drain()

    server = await asyncio.start_server(lambda r, w: _once(r, w, serve), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        running = await make_proxy(f"http://127.0.0.1:{port}", access_log="/dev/full")
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
                async with client.post(url, data=b"{}") as r:
                    assert await r.read() == b"data: x\n\n"
            async with asyncio.timeout(5):
                # The count belongs to the writer thread: polled, there is no event to wait on.
                while running.proxy.access_log.failures < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)
            async with client.get(f"http://127.0.0.1:{running.admin_port}/metrics") as m:
                text = await m.text()
    assert "tallygate_access_log_failures_total 3.0" in text


async def test_a_gzip_bomb_is_inflated_a_piece_at_a_time(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    """128 KiB of gzip that inflates to 128 MiB, sent in one write: the client gets every
    inflated byte, and tallygate never holds more than a few pieces of it at once."""
    inflated = 128 * 2**20
    bomb = zlib.compress(b"\0" * inflated, 9, wbits=16 + zlib.MAX_WBITS)
    assert len(bomb) < 2**18

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            HEAD + b"Content-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(bomb) + bomb
        )
        await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        running = await make_proxy(
            f"http://127.0.0.1:{port}",
            compression={"gzip": False},
            metering={"max_event_bytes": "1MiB"},
        )
        url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
        digest, received = hashlib.sha256(), 0
        tracemalloc.start()
        try:
            async with aiohttp.ClientSession() as client, client.post(url, data=REQUEST) as r:
                async with asyncio.timeout(60):
                    while piece := await r.content.readany():
                        digest.update(piece)
                        received += len(piece)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert received == inflated
    assert digest.digest() == hashlib.sha256(b"\0" * inflated).digest()
    assert peak < 16 * 2**20  # inflated in one call, the body alone is 128 MiB
    await records.wait_for(1)
    assert records[0]["bytes"]["upstream_in"] > len(bomb)  # the body and its head


PRIVATE = b'{"tenant":"A","answer":"private text meant for client A only"}'
PUBLIC = b'{"answer":"yours"}'


def answer(body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        size,
        body,
    )


async def ask_twice(make_proxy: ProxyFactory, first: Serve) -> list[bytes]:
    """Two requests in turn through one tallygate; the upstream's first connection runs
    `first`, every later connection answers PUBLIC to each request."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        if connections == 1:
            await first(reader, writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                await read_request(reader)
                writer.write(answer(PUBLIC))
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        running = await make_proxy(f"http://127.0.0.1:{port}", compression={"gzip": False})
        url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
        bodies = []
        async with aiohttp.ClientSession() as client:
            for _ in range(2):
                async with client.post(url, data=REQUEST) as response:
                    bodies.append(await response.read())
                await asyncio.sleep(0.2)  # the pushed answer of the second case arrives
        return bodies


async def test_an_answer_beyond_the_content_length_never_reaches_another_client(
    make_proxy: ProxyFactory,
) -> None:
    async def first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The body goes on past its Content-Length with a second answer, whose head is still
        # incomplete when the first answer's body ends.
        await read_request(reader)
        beyond = answer(PUBLIC) + answer(PRIVATE)
        writer.write(beyond[: len(answer(PUBLIC)) + 20])
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(beyond[len(answer(PUBLIC)) + 20 :])
        await writer.drain()

    assert await ask_twice(make_proxy, first) == [PUBLIC, PUBLIC]


async def test_an_answer_pushed_on_an_idle_connection_never_reaches_another_client(
    make_proxy: ProxyFactory,
) -> None:
    async def first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(PUBLIC))
        await writer.drain()
        await asyncio.sleep(0.1)  # tallygate has put the connection back in its pool
        writer.write(answer(PRIVATE))
        await writer.drain()

    assert await ask_twice(make_proxy, first) == [PUBLIC, PUBLIC]


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"],
    ids=["101", "gzip-transfer-coding"],
)  # fmt: skip
async def test_an_answer_that_cannot_be_relayed_faithfully_is_a_502(
    make_proxy: ProxyFactory, records: RecordLog, head: bytes
) -> None:
    coded = zlib.compress(FIRST, wbits=31)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(head + (chunk(coded) + b"0\r\n\r\n" if b"chunked" in head else b""))
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        running = await make_proxy(f"http://127.0.0.1:{port}")
        url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
        async with aiohttp.ClientSession() as client, client.post(url, data=REQUEST) as r:
            assert r.status == 502
            body = await r.json()
    assert body["error"]["code"] == "upstream_invalid_response"
    await records.wait_for(1)
    assert (records[0]["outcome"], records[0]["status"]) == ("upstream_error", 502)


async def test_a_long_request_is_not_held_while_its_answer_streams(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    """A 15 MB prompt: once forwarded and counted, nothing of it stays in tallygate's memory for
    the rest of the stream (its body, the body with the usage option added, its parsed JSON)."""
    prompt = {"model": "gpt-4o", "stream": True,
              "messages": [{"role": "user", "content": "word " * 3_000_000}]}  # fmt: skip
    body = json.dumps(prompt).encode()
    first_sent, release = asyncio.Event(), asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
        while length:  # read and forget
            length -= len(await reader.read(min(length, 2**16)))
        await first_event(writer)
        first_sent.set()
        await release.wait()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        running = await make_proxy(f"http://127.0.0.1:{port}", compression={"gzip": False})
        url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            async with aiohttp.ClientSession() as client, client.post(url, data=body) as r:
                assert await r.content.readuntil(b"\n\n") == FIRST
                held = 0
                for _ in range(200):  # the prompt is counted in a thread: until it is done
                    held = tracemalloc.get_traced_memory()[0] - before
                    if held < len(body) // 3:
                        break
                    await asyncio.sleep(0.05)
                release.set()
                await r.read()
        finally:
            tracemalloc.stop()
    assert held < len(body) // 3, (
        f"{held / 2**20:.1f} MiB held for a {len(body) / 2**20:.1f} MiB body"
    )
    await records.wait_for(1)
    assert records[0]["estimated"]["input"] > 3_000_000
