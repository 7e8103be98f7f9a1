"""Bad clients: unparsable requests, path tricks, slowloris, slow readers, connection limits, TLS.

Each is answered in the API's error shape (or cut off), leaves exactly one usage record, and
never reaches the upstream unless it should.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from tallygate.policy.tenants import hash_key

from conftest import CASES, FakeUpstream, ProxyFactory, RecordLog

KEY = "sk-proj-HOSTILE-CLIENT-KEY-4d1e9b"


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes, read until tallygate closes the connection (5 s at most)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def request(path: bytes = b"/v1/chat/completions", extra: bytes = b"") -> bytes:
    body = b'{"model":"gpt-4o","messages":[]}'
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )  # fmt: skip


async def ok_json(_: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


@pytest.mark.parametrize(
    ("data", "status", "reason"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "request_line_too_long"),
        (
            request(extra=b"Authorization: Bearer " + KEY.encode() + b"x" * 9000 + b"\r\n"),
            431,
            "headers_too_large",
        ),
        (request(extra=b"".join(b"X-H%d: v\r\n" % i for i in range(101))), 431, "too_many_headers"),
        # CRLF injection: a bare CR or LF, or a NUL, inside a header value.
        (request(extra=b"X-Inject: a\rSet-Cookie: b\r\n"), 400, "bad_request"),
        (request(extra=b"X-Inject: a\x00b\r\n"), 400, "bad_request"),
        (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400, "bad_request"),
    ],
    ids=["request-line", "header-line", "header-count", "bare-cr", "nul", "garbage", "tls-hello"],
)
async def test_unparsable_requests_get_a_json_answer_and_a_record(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    records: RecordLog,
    caplog: pytest.LogCaptureFixture,
    data: bytes,
    status: int,
    reason: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    upstream.handler = ok_json
    running = await make_proxy()
    answer = await exchange(running.proxy_port, data)
    got, headers, body = parse(answer)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == reason
    assert upstream.requests == []
    await records.wait_for(1)
    [record] = records
    assert (record["status"], record["outcome"], record["rejected_reason"]) == (
        status, "rejected", reason,
    )  # fmt: skip
    assert record["bytes"]["client_in"] == len(data)
    assert record["bytes"]["client_out"] == len(answer)
    # aiohttp's own handler would have logged the refused line, key and all.
    assert KEY not in caplog.text
    assert KEY.encode() not in body


@pytest.mark.parametrize(
    "path",
    [b"/v1/../admin", b"/v1/%2e%2E/admin", b"/v1/.%2e/admin", b"/v1/./x", b"/v1/..;/admin",
     b"/v1/models%2F..%2Fadmin", b"/v1/a%5cb", b"/v1\\..\\admin", b"/v1/a%00b",
     b"/v1/..#x", b"/v1/chat/completions#x", b"/v1/models?q=1#x", b"/v1/%2E%2e/admin"],
)  # fmt: skip
async def test_paths_that_could_escape_a_route_are_refused(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog, path: bytes
) -> None:
    upstream.handler = ok_json
    running = await make_proxy(
        routes=[{"path_prefix": "/v1/", "upstream": "main"}],
        upstreams={"main": {"url": upstream.url + "/base"}},
    )
    status, _, body = parse(
        await exchange(running.proxy_port, request(path, b"Connection: close\r\n"))
    )
    assert status == 400
    assert orjson.loads(body)["error"]["code"] == "path_refused"
    assert upstream.requests == []
    await records.wait_for(1)
    assert records[0]["rejected_reason"] == "path_refused"


@pytest.mark.parametrize(
    ("path", "seen", "dialect"),
    [(b"/v1/chat/%63ompletions", "/v1/chat/completions", "openai_chat"),
     (b"/v1/chat/c%6Fmpletions?x=%41", "/v1/chat/completions?x=%41", "openai_chat"),
     (b"/v1/%6Dessages", "/anthropic/v1/messages", "anthropic_messages")],
)  # fmt: skip
async def test_an_escaped_spelling_is_routed_metered_and_forwarded_as_the_path_it_means(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog,
    path: bytes, seen: str, dialect: str,
) -> None:  # fmt: skip
    upstream.handler = ok_json
    running = await make_proxy(
        routes=[{"path_prefix": "/v1/messages", "upstream": "anthropic"},
                {"path_prefix": "/v1/", "upstream": "main"}],
        upstreams={"main": {"url": upstream.url}, "anthropic": {"url": upstream.url + "/anthropic"}},
    )  # fmt: skip
    status, _, _ = parse(
        await exchange(running.proxy_port, request(path, b"Connection: close\r\n"))
    )
    assert status == 200
    [(forwarded, _)] = upstream.requests
    assert forwarded.raw_path == seen
    await records.wait_for(1)
    assert records[0]["dialect"] == dialect
    assert records[0]["estimated"]["input"] is not None  # metered as what it is


async def test_ordinary_paths_with_dots_and_escapes_pass(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> None:
    upstream.handler = ok_json
    running = await make_proxy()
    path = b"/v1/models/ft:gpt-4o-mini:org.v2:abc/x%20y?q=a/../b"
    status, _, _ = parse(
        await exchange(running.proxy_port, request(path, b"Connection: close\r\n"))
    )
    assert status == 200
    [(seen, _)] = upstream.requests
    assert seen.raw_path == path.decode()


async def test_malformed_bodies_are_forwarded_and_metering_counts_the_problem(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    upstream.handler = ok_json
    running = await make_proxy()
    garbage = b'\xff\xfe{"model": "gpt-4o", "messages": [unterminated'
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(garbage) + garbage
    )
    status, _, _ = parse(await exchange(running.proxy_port, data))
    assert status == 200
    assert upstream.requests[0][1] == garbage  # the upstream decides, not tallygate
    await records.wait_for(1)
    assert records[0]["outcome"] == "ok"
    assert records[0]["metering_errors"] == {"request": 1}


async def test_slowloris_head_is_cut_off_with_408(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    upstream.handler = ok_json
    running = await make_proxy(limits={"header_timeout": "300ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
    head = request()[:60]
    started = time.monotonic()
    sent = 0
    answer = b""
    for byte in head:  # a byte every 50 ms: each arrives well within any per-read timeout
        if reader.at_eof():
            break
        writer.write(bytes([byte]))
        sent += 1
        try:
            answer += await asyncio.wait_for(reader.read(65536), 0.05)
        except TimeoutError:
            continue
        if answer:
            break
    answer += await asyncio.wait_for(reader.read(), 2)
    elapsed = time.monotonic() - started
    writer.close()
    status, headers, body = parse(answer)
    assert status == 408
    assert headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "header_timeout"
    assert 0.3 <= elapsed < 1.0
    await records.wait_for(1)
    [record] = records
    assert (record["rejected_reason"], record["method"]) == ("header_timeout", "")
    assert record["bytes"]["client_in"] == sent
    assert upstream.requests == []


async def test_a_silent_connection_is_closed_without_a_record(
    make_proxy: ProxyFactory, records: RecordLog
) -> None:
    running = await make_proxy(limits={"header_timeout": "200ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, nothing said
    writer.close()
    await asyncio.sleep(0.1)
    assert records == []


async def test_head_timeout_applies_to_the_next_request_on_a_kept_alive_connection(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    upstream.handler = ok_json
    running = await make_proxy(limits={"header_timeout": "300ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
    writer.write(request())
    first = await asyncio.wait_for(reader.readuntil(b"true}"), 2)
    assert first.startswith(b"HTTP/1.1 200")
    await asyncio.sleep(0.5)  # idle between requests is keep-alive's business, not the head's
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHo")
    answer = await asyncio.wait_for(reader.read(), 2)
    writer.close()
    assert parse(answer)[0] == 408
    await records.wait_for(2)
    assert [r["outcome"] for r in records] == ["ok", "rejected"]


async def test_slow_body_is_cut_off_with_408_and_not_forwarded(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    upstream.handler = ok_json
    running = await make_proxy(limits={"body_timeout": "300ms"})
    reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{")
    answer = b""
    for _ in range(40):  # a byte every 50 ms
        try:
            answer = await asyncio.wait_for(reader.read(65536), 0.05)
        except TimeoutError:
            writer.write(b" ")
            continue
        break
    answer += await asyncio.wait_for(reader.read(), 2)
    writer.close()
    status, headers, body = parse(answer)
    assert status == 408
    assert headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "body_timeout"
    assert upstream.requests == []
    await records.wait_for(1)
    assert records[0]["rejected_reason"] == "body_timeout"


async def small_window_request(port: int, receive_buffer: int) -> socket.socket:
    """A client socket with a small receive buffer (so that TCP pushes back soon), its request
    sent; it reads only when the test does."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, request())
    return sock


async def test_a_client_that_stops_reading_gets_backpressure_then_is_cut_off(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    """The upstream could send 1 GiB; the client reads nothing. tallygate must stop reading the
    upstream (TCP backpressure) rather than buffer, then cut the client off at write_timeout."""
    written = 0
    upstream_done = asyncio.Event()
    chunk = b"data: " + b"x" * 65530 + b"\n\n"

    async def firehose(request: web.Request) -> web.StreamResponse:
        nonlocal written
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while written < 2**30:
                await response.write(chunk)
                written += len(chunk)
        finally:
            upstream_done.set()
        return response

    upstream.handler = firehose
    running = await make_proxy(limits={"write_timeout": "1s"}, compression={"gzip": False})
    sock = await small_window_request(running.proxy_port, 4096)
    await asyncio.sleep(0.6)
    stalled_at = written
    await asyncio.sleep(0.2)
    # Stalled: what is in flight is the sockets' buffers and a read or two, not the body.
    assert written == stalled_at
    assert written < 32 * 2**20
    await asyncio.wait_for(upstream_done.wait(), 3)  # cut off: the upstream is closed too
    sock.close()
    await records.wait_for(1)
    [record] = records
    assert record["outcome"] == "client_timeout"
    assert record["status"] == 200
    assert record["bytes"]["upstream_in"] < 32 * 2**20


def dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's payload (the whole body, last chunk included)."""
    payload = bytearray()
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            return bytes(payload)
        payload += body[:size]
        body = body[size + 2 :]


async def test_a_slow_reader_gets_every_byte_while_the_upstream_is_paused_and_resumed(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    """A fast upstream, a client that reads slowly: tallygate's reading of the upstream is
    paused (aiohttp's buffer is full while the client lags) and resumed as the client catches
    up, over and over, and the whole stream arrives. A pause never resumed stalls it."""
    events = [b"data: %d %s\n\n" % (i, b"x" * 16000) for i in range(400)]  # 6.4 MB

    async def firehose(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await response.write(event)
        return response

    upstream.handler = firehose
    running = await make_proxy(compression={"gzip": False})
    sock = await small_window_request(running.proxy_port, 16384)
    loop = asyncio.get_running_loop()
    received = bytearray()
    try:
        while not received.endswith(b"\r\n0\r\n\r\n"):
            data = await asyncio.wait_for(loop.sock_recv(sock, 32768), 5)
            assert data, "the connection closed before the stream ended"
            received += data
            await asyncio.sleep(0.0005)  # a slow reader
    finally:
        sock.close()
    status, _, body = parse(bytes(received))
    assert status == 200
    assert dechunk(body) == b"".join(events)
    await records.wait_for(1)
    [record] = records
    assert record["outcome"] == "ok"


async def test_connections_past_the_limit_get_503_with_retry_after(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    upstream.handler = ok_json
    running = await make_proxy(limits={"max_connections": 2, "retry_after": 7})
    held = [await asyncio.open_connection("127.0.0.1", running.proxy_port) for _ in range(2)]
    await asyncio.sleep(0.05)
    status, headers, body = parse(await exchange(running.proxy_port, request()))
    assert status == 503
    assert headers["retry-after"] == "7"
    assert headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "too_many_connections"
    for reader, writer in held:  # the ones within the limit are served
        writer.write(request())
        assert (await asyncio.wait_for(reader.readuntil(b"}"), 2)).startswith(b"HTTP/1.1 200")
        writer.close()
    await records.wait_for(3)
    assert sorted(r["status"] for r in records) == [200, 200, 503]
    assert len(upstream.requests) == 2


async def test_streams_past_the_limit_get_503_and_are_not_forwarded(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: 1\n\n")
        await release.wait()
        return response

    upstream.handler = slow
    running = await make_proxy(limits={"max_streams": 1})
    url = f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions"
    async with aiohttp.ClientSession() as session, session.post(url, data=b"{}") as first:
        assert await first.content.readline() == b"data: 1\n"
        async with session.post(url, data=b"{}") as second:
            assert second.status == 503
            assert second.headers["Retry-After"] == "1"
            assert (await second.json())["error"]["code"] == "too_many_streams"
        release.set()
    await records.wait_for(2)
    assert len(upstream.requests) == 1
    assert {r["rejected_reason"] for r in records} == {None, "too_many_streams"}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_listener_relays_a_stream_byte_for_byte(
    upstream: FakeUpstream, make_proxy: ProxyFactory, certificate: tuple[Path, Path]
) -> None:
    case = next(c for c in CASES if c.content_type == "text/event-stream")

    async def recorded(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": case.content_type_header})
        await response.prepare(request)
        await response.write(case.body)
        return response

    upstream.handler = recorded
    cert, key = certificate
    running = await make_proxy(
        listen={"address": "127.0.0.1:0", "tls": {"cert": str(cert), "key": str(key)}}
    )
    trust = ssl.create_default_context(cafile=str(cert))
    url = f"https://127.0.0.1:{running.proxy_port}{case.path}"
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=case.request or b"{}", ssl=trust) as r:
            assert await r.read() == case.body
        # Plain HTTP on the TLS port is not served.
        with pytest.raises(aiohttp.ClientError):
            async with session.post(url.replace("https", "http"), data=b"{}") as r:
                await r.read()


def test_tls_config_errors_name_the_key(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    from tallygate.config import ConfigError, load_config_text

    cert, _ = certificate
    text = (
        "upstreams: {main: {url: 'http://127.0.0.1:1'}}\n"
        "routes: [{path_prefix: /, upstream: main}]\n"
        f"listen: {{address: '127.0.0.1:0', tls: {{cert: '{cert}', key: '{tmp_path}/nope.pem'}}}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config_text(text, {})
    assert caught.value.problems[0].startswith("listen.tls: cannot load")


async def test_bytes_above_0x7f_in_the_path_and_headers_get_an_answer_and_exact_counts(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    # obs-text in a header: aiohttp hands it over as a lone surrogate, which strict UTF-8
    # encoding (counting the head's bytes) refused, and the request ended in aiohttp's bare 500.
    upstream.handler = ok_json
    running = await make_proxy()
    for path, status in ((b"/v1/chat/completions", 200), (b"/v1/caf\xe9", 400)):
        data = request(path, b"X-Note: caf\xe9\r\nConnection: close\r\n")
        answer = await exchange(running.proxy_port, data)
        got, headers, _ = parse(answer)
        assert got == status and headers["content-type"].startswith("application/json")
        await records.wait_for(1 if status == 200 else 2)
        record = records[-1]
        assert record["bytes"]["client_in"] == len(data)
        assert record["bytes"]["client_out"] == len(answer)


async def test_expect_100_continue_is_answered_after_the_checks(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog
) -> None:
    upstream.handler = ok_json
    running = await make_proxy(
        tenants={"acme": {"keys": [hash_key(KEY)]}}, auth={"require_key": True}
    )
    body = b'{"model":"gpt-4o","messages":[]}'

    async def ask(key: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\n" + key + b"Content-Length: %d\r\n\r\n" % len(body)
        )
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)  # curl waits 1 s
        return reader, writer, first

    reader, writer, first = await ask(b"Authorization: Bearer %s\r\n" % KEY.encode())
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(body)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    writer.close()
    reader, writer, first = await ask(b"")  # no key: refused before the body is sent
    assert first.startswith(b"HTTP/1.1 401")
    writer.close()
    await records.wait_for(2)
    assert upstream.requests[0][1] == body and len(upstream.requests) == 1


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-le", "utf-32"])
async def test_a_body_with_a_bom_or_in_utf16_is_metered_and_forwarded_as_sent(
    upstream: FakeUpstream, make_proxy: ProxyFactory, records: RecordLog, encoding: str
) -> None:
    upstream.handler = ok_json
    running = await make_proxy()
    body = '{"model":"gpt-4o","messages":[{"role":"user","content":"héllo"}]}'.encode(encoding)
    data = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    )
    status, _, _ = parse(await exchange(running.proxy_port, data))
    assert status == 200
    assert upstream.requests[0][1] == body  # as sent: the upstream decides what it accepts
    await records.wait_for(1)
    record = records[0]
    assert record["model"] == "gpt-4o" and record["estimated"]["input"] is not None
    assert record["metering_errors"] == {}
