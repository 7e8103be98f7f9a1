"""The simulated upstream speaks each dialect as the real APIs do: tallygate meters it exactly."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from openai import AsyncOpenAI

from tallygate.config import Metering
from tallygate.dev.simulator import Simulator, SimulatorSettings
from tallygate.runtime.encodings import load_tokenizers

from conftest import FakeUpstream, ProxyFactory, RecordLog, gunzip

REQUESTS = {
    "/v1/chat/completions": {
        "model": "gpt-4o-mini",
        "stream": True,
        "messages": [{"role": "user", "content": "Hi"}],
    },
    "/v1/responses": {"model": "gpt-4.1", "stream": True, "input": "Hi"},
    "/v1/messages": {
        "model": "claude-sonnet-4-5",
        "stream": True,
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "Hi"}],
    },
    "/api/chat": {"model": "llama3", "messages": [{"role": "user", "content": "Hi"}]},
    "/api/generate": {"model": "llama3", "prompt": "Hi", "system": "Be brief."},
}


@pytest.fixture
def simulated(upstream: FakeUpstream) -> Simulator:
    simulator = Simulator(SimulatorSettings(ttft=0, tokens_per_second=0, output_tokens=40, seed=1))
    upstream.handler = simulator.dispatch
    return simulator


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
@pytest.mark.parametrize("path", sorted(REQUESTS))
async def test_every_dialect_is_metered_exactly(
    simulated: Simulator, make_proxy: ProxyFactory, client: aiohttp.ClientSession, records: RecordLog,
    path: str, stream: bool,
) -> None:  # fmt: skip
    running = await make_proxy()
    body: dict[str, Any] = {**REQUESTS[path], "stream": stream}
    async with client.post(
        f"http://127.0.0.1:{running.proxy_port}{path}",
        data=json.dumps(body).encode(),
        headers={"Accept-Encoding": "gzip"},
    ) as r:
        assert r.status == 200
        raw = await r.read()
        if r.headers.get("Content-Encoding") == "gzip":
            raw = gunzip(raw)
    assert raw
    record = records[-1]
    assert record["outcome"] == "ok" and record["tokens_source"] == "reported"
    assert record["stream"] is stream
    assert record["model"].startswith(body["model"])
    # Dated versions, as the APIs report them: the demo shows dollars.
    ollama = path.startswith("/api/")
    assert record["priced_as"] == (None if ollama else body["model"])
    assert (record["cost_usd"]["output"] > 0) is (not ollama)
    output = record["tokens"]["output"]
    assert output == (41 if path == "/v1/responses" else 40)
    if record["estimated"]["output"] is not None:
        assert abs(record["estimated"]["output"] - output) <= 0.1 * output


async def test_errors_and_midstream_failures(
    upstream: FakeUpstream,
    make_proxy: ProxyFactory,
    client: aiohttp.ClientSession,
    records: RecordLog,
) -> None:
    simulator = Simulator(
        SimulatorSettings(ttft=0, tokens_per_second=0, output_tokens=20, error_rate=1.0)
    )
    upstream.handler = simulator.anthropic_messages
    running = await make_proxy()
    url = f"http://127.0.0.1:{running.proxy_port}/v1/messages"
    async with client.post(url, data=json.dumps(REQUESTS["/v1/messages"]).encode()) as r:
        assert r.status == 529
    upstream.handler = Simulator(
        SimulatorSettings(ttft=0, tokens_per_second=0, output_tokens=20, midstream_failure_rate=1.0)
    ).openai_chat
    async with client.post(
        f"http://127.0.0.1:{running.proxy_port}/v1/chat/completions",
        data=json.dumps(REQUESTS["/v1/chat/completions"]).encode(),
        headers={"Accept-Encoding": "identity"},
    ) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()
    assert [(r["status"], r["outcome"]) for r in records] == [
        (529, "upstream_status"),
        (200, "upstream_error"),
    ]


async def test_the_openai_sdk_streams_from_the_simulator(
    simulated: Simulator, make_proxy: ProxyFactory
) -> None:
    running = await make_proxy()
    async with AsyncOpenAI(
        base_url=f"http://127.0.0.1:{running.proxy_port}/v1", api_key="demo", max_retries=0
    ) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text = "".join(
            [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
        )
    assert len(text.split()) == 40


async def test_the_demo_command_runs_with_no_key(tmp_path: Any) -> None:
    import asyncio
    import os
    import re
    import signal
    import socket
    import sys

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tallygate", "demo", "--listen", f"127.0.0.1:{ports[0]}",
        "--admin", f"127.0.0.1:{ports[1]}", "--ttft", "10ms", "--tokens-per-second", "0",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    assert proc.stderr is not None and proc.stdout is not None
    try:
        banner = ""
        async with asyncio.timeout(30):
            while "listening on" not in banner:
                line = (await proc.stderr.readline()).decode()
                assert line, "the demo exited"
                banner += line
        curl = re.search(r"(curl -N .*)", banner)
        assert curl and f"127.0.0.1:{ports[0]}" in curl[1]
        shell = await asyncio.create_subprocess_shell(curl[1], stdout=asyncio.subprocess.PIPE)
        out, _ = await asyncio.wait_for(shell.communicate(), 30)
        assert out.rstrip().endswith(b"data: [DONE]")
        record = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
        assert record["tokens_source"] == "reported"
        # The simulator reports what tallygate's estimate counts: the README's demo agrees.
        tokens, estimated = record["tokens"], record["estimated"]
        assert (tokens["input"], tokens["output"]) == (estimated["input"], estimated["output"])
        assert tokens["output"] >= 64  # 64 words
        assert record["encoding"] == "gzip"
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 15) == 0


async def test_error_status_chooses_the_status_of_every_dialect_s_errors(
    upstream: FakeUpstream, make_proxy: ProxyFactory, client: aiohttp.ClientSession
) -> None:
    upstream.handler = Simulator(
        SimulatorSettings(ttft=0, tokens_per_second=0, error_rate=1.0, error_status=429)
    ).dispatch
    running = await make_proxy()
    for path, request in REQUESTS.items():
        url = f"http://127.0.0.1:{running.proxy_port}{path}"
        async with client.post(url, data=json.dumps(request).encode()) as r:
            assert r.status == 429, path


@pytest.fixture
def counted(upstream: FakeUpstream) -> Simulator:
    """The simulator as the demo runs it: counting with tallygate's own tokenizers."""
    tokenizers = load_tokenizers(Metering().default_encoding)
    settings = SimulatorSettings(ttft=0, tokens_per_second=0, output_tokens=40, seed=1)
    simulator = Simulator(settings, tokenizers)
    upstream.handler = simulator.dispatch
    return simulator


@pytest.mark.parametrize("path", sorted(REQUESTS))
async def test_the_demo_s_estimates_agree_with_its_reported_usage(
    counted: Simulator, make_proxy: ProxyFactory, client: aiohttp.ClientSession,
    records: RecordLog, path: str,
) -> None:  # fmt: skip
    running = await make_proxy()
    body = {**REQUESTS[path], "tools": [{"type": "function", "function": {"name": "f"}}]}
    if path != "/v1/chat/completions":
        del body["tools"]
    async with client.post(f"http://127.0.0.1:{running.proxy_port}{path}", json=body) as r:
        assert r.status == 200
        await r.read()
    await records.wait_for(1)
    record = records[0]
    assert record["tokens_source"] == "reported"
    tokens, estimated = record["tokens"], record["estimated"]
    assert (tokens["input"], tokens["output"]) == (estimated["input"], estimated["output"])


async def test_the_sdks_work_against_the_simulator(
    counted: Simulator, make_proxy: ProxyFactory
) -> None:
    """What a user of the demo runs: each official SDK, streaming, through tallygate."""
    running = await make_proxy()
    base = f"http://127.0.0.1:{running.proxy_port}"
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="demo", max_retries=0) as openai:
        async with openai.responses.stream(model="gpt-4.1", input="Hi") as stream:
            deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
            final = await stream.get_final_response()
        assert final.output_text == "".join(deltas) and len(deltas) == 40
        assert final.usage is not None and final.usage.output_tokens > 40

    anthropic = pytest.importorskip("anthropic")
    async with anthropic.AsyncAnthropic(base_url=base, api_key="demo", max_retries=0) as claude:
        messages = [{"role": "user", "content": "Hi"}]
        async with claude.messages.stream(
            model="claude-haiku-4-5", max_tokens=100, messages=messages
        ) as reply:
            text = "".join([piece async for piece in reply.text_stream])
        assert len(text.split()) == 40
        counted_tokens = await claude.messages.count_tokens(
            model="claude-haiku-4-5", messages=messages
        )
        assert counted_tokens.input_tokens > 0

    ollama = pytest.importorskip("ollama")
    client = ollama.AsyncClient(host=base)
    pieces = [part.response async for part in await client.generate("llama3", "Hi", stream=True)]
    assert len("".join(pieces).split()) == 40
    assert [m.model for m in (await client.list()).models] == ["llama3:latest"]
