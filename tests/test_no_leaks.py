"""Nothing leaked: known keys go through every path tallygate has (served, refused, unparsable,
timed out, upstream down, upstream broken mid-stream), and then everything tallygate
wrote is searched for them: the access log, its own log, the metrics, every answer's head and
body, and `tallygate check`."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from tallygate.policy.tenants import hash_key

from conftest import FakeUpstream, ProxyFactory

PROVIDER_KEY = "sk-proj-PROVIDER-LEAKTEST-91a7c3"
TENANT_KEY = "tg-TENANT-LEAKTEST-5b22e0"
STRANGER_KEY = "sk-STRANGER-LEAKTEST-0d4f11"  # not ours: it must not be logged either
KEYS = (PROVIDER_KEY, TENANT_KEY, STRANGER_KEY)


async def test_keys_appear_nowhere_tallygate_writes(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)

    async def behave(request: web.Request) -> web.StreamResponse:
        what = request.path.rsplit("/", 1)[-1]
        if what == "slow":
            await asyncio.sleep(2)
        if what == "denied":  # the provider refuses our key (its body does not quote it)
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n')
        if what == "broken":
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(b"data: [DONE]\n\n")
        return response

    upstream.handler = behave
    log_file = tmp_path / "access.jsonl"
    running = await make_proxy(
        upstreams={
            "main": {"url": upstream.url, "api_key": PROVIDER_KEY,
                     "timeouts": {"first_byte": "300ms"}},
            "down": {"url": "http://127.0.0.1:9", "api_key": PROVIDER_KEY},
        },
        routes=[{"path_prefix": "/down", "upstream": "down"},
                {"path_prefix": "/", "upstream": "main"}],
        tenants={"acme": {"keys": [hash_key(TENANT_KEY)]}},
        access_log=str(log_file),
        limits={"header_timeout": "300ms"},
    )  # fmt: skip
    base = f"http://127.0.0.1:{running.proxy_port}"
    answers: list[bytes] = []
    bearer = {"Authorization": f"Bearer {TENANT_KEY}"}
    stranger = {"Authorization": f"Bearer {STRANGER_KEY}", "x-api-key": STRANGER_KEY}

    async with aiohttp.ClientSession() as client:

        async def post(path: str, headers: dict[str, str]) -> None:
            try:
                async with client.post(
                    base + path, data=b'{"model":"gpt-4o"}', headers=headers
                ) as r:
                    answers.append(str(r.headers).encode() + await r.read())
            except aiohttp.ClientPayloadError:
                answers.append(b"(cut)")

        await post("/v1/chat/completions", bearer)  # served, as a tenant
        await post("/v1/chat/completions", stranger)  # served, a key we do not know
        await post(f"/v1/chat/completions?key={STRANGER_KEY}", stranger)  # a key in the query
        await post("/v1/denied", bearer)  # the upstream refuses
        await post("/v1/broken", bearer)  # the upstream breaks mid-stream
        await post("/v1/slow", stranger)  # first-byte timeout: 504
        await post("/down/v1/chat/completions", stranger)  # unreachable: 502
        await post("/v1/%2e%2e/admin", stranger)  # refused path
        # Unparsable: a header line too long, holding a key.
        reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer "
            + STRANGER_KEY.encode() + b"A" * 9000 + b"\r\n\r\n"
        )  # fmt: skip
        answers.append(await asyncio.wait_for(reader.read(), 5))
        writer.close()
        # Half a head, holding a key, then silence: 408.
        reader, writer = await asyncio.open_connection("127.0.0.1", running.proxy_port)
        writer.write(b"POST /v1/x HTTP/1.1\r\nx-api-key: " + STRANGER_KEY.encode() + b"\r\n")
        answers.append(await asyncio.wait_for(reader.read(), 5))
        writer.close()
        async with client.get(f"http://127.0.0.1:{running.admin_port}/metrics") as m:
            metrics = await m.read()

    await running.drain_and_stop()
    written = log_file.read_bytes()
    assert written.count(b"\n") == 10  # every request above left its record
    check = _check_output(tmp_path)
    for key in KEYS:
        for answer in answers:
            assert key.encode() not in answer
        assert key.encode() not in written, key
        assert key.encode() not in metrics
        assert key not in caplog.text, key
        assert key not in check


def _check_output(tmp_path: Path) -> str:
    config = tmp_path / "check.yaml"
    config.write_text(yaml.safe_dump({
        "upstreams": {"main": {"url": "https://api.openai.com", "api_key": PROVIDER_KEY}},
        "routes": [{"path_prefix": "/", "upstream": "main"}],
        "admin": {"metrics_token": TENANT_KEY},
        "tenants": {"acme": {"keys": [hash_key(TENANT_KEY)]}},
    }))  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "tallygate", "check", "--config", str(config)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout + done.stderr
