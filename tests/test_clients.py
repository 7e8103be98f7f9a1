"""The client matrix: real clients stream through tallygate with gzip on, each decoding every
event on arrival. The upstream sends event k+1 only once the client has decoded event k (a gate,
not a timing): a client whose decoder waits for more bytes than the event's (Go's
`compress/flate` with zlib's partial flush did) never gets event k, and the test fails."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from conftest import FakeUpstream, ProxyFactory, RecordLog

CLIENTS = Path(__file__).parent / "clients"
WORDS = [f"w{k}" for k in range(6)]
GATE_SECONDS = 10  # a client that decodes an event on arrival needs milliseconds
CHAT = json.dumps({
    "model": "gpt-4o-mini", "stream": True,
    "messages": [{"role": "user", "content": "Say six words."}],
})  # fmt: skip


def openai_events() -> list[bytes]:
    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        body = {"id": "c", "object": "chat.completion.chunk", "created": 1,
                "model": "gpt-4o-mini",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return b"data: " + json.dumps(body).encode() + b"\n\n"

    return [
        *(chunk({"content": word}) for word in WORDS),
        chunk({}, "stop"),
        b"data: [DONE]\n\n",
    ]


def anthropic_events() -> list[bytes]:
    def event(body: dict[str, object]) -> bytes:
        name = str(body["type"]).encode()
        return b"event: %s\ndata: %s\n\n" % (name, json.dumps(body).encode())

    usage = {"input_tokens": 9, "output_tokens": 1}
    message = {"id": "m", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
               "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}  # fmt: skip
    text = {"type": "text", "text": ""}
    end = {"stop_reason": "end_turn", "stop_sequence": None}
    return [
        event({"type": "message_start", "message": message}),
        event({"type": "content_block_start", "index": 0, "content_block": text}),
        *(
            event(
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                }
            )
            for word in WORDS
        ),
        event({"type": "content_block_stop", "index": 0}),
        event({"type": "message_delta", "delta": end, "usage": {"output_tokens": 6}}),
        event({"type": "message_stop"}),
    ]


class Gate:
    """One event per word; the upstream holds the next one until the client has decoded it."""

    def __init__(self) -> None:
        self.decoded = [asyncio.Event() for _ in WORDS]

    def saw(self, text: str) -> None:
        for k, word in enumerate(WORDS):
            if f'"{word}"' in text:
                self.decoded[k].set()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        anthropic = request.path.endswith("/messages")
        events = anthropic_events() if anthropic else openai_events()
        first_word = 2 if anthropic else 0
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index, event in enumerate(events):
            await response.write(event)
            k = index - first_word
            if 0 <= k < len(WORDS) - 1:  # a word: the next is sent once this one is decoded
                try:
                    await asyncio.wait_for(self.decoded[k].wait(), GATE_SECONDS)
                except TimeoutError:
                    pytest.fail(f"the client did not decode {WORDS[k]!r} when it arrived")
        await response.write_eof()
        return response


@pytest.fixture
async def gated(
    upstream: FakeUpstream, make_proxy: ProxyFactory
) -> AsyncIterator[tuple[Gate, str]]:
    gate = Gate()
    upstream.handler = gate.handler
    running = await make_proxy()
    yield gate, f"http://127.0.0.1:{running.proxy_port}"


async def run_client(argv: list[str], gate: Gate, env: dict[str, str] | None = None) -> None:
    """Run a client that prints each decoded data line, and open the gate line by line."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    assert process.stdout is not None and process.stderr is not None
    lines = []
    async with asyncio.timeout(GATE_SECONDS * 3):
        while line := await process.stdout.readline():
            if line.startswith(b"data: "):
                lines.append(line)
                gate.saw(line.decode())
        err = await process.stderr.read()
        await process.wait()
    assert process.returncode == 0, err.decode()
    assert all(event.is_set() for event in gate.decoded)
    assert lines[-1] == b"data: [DONE]\n"


def needs(binary: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(binary) is None, reason=f"{binary} is not installed (.ci/run installs it)"
    )


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("go")
    binary = build / "stream"
    env = {**os.environ, "GOCACHE": str(build / "cache"), "GOPATH": str(build / "path"),
           "GOFLAGS": "", "GO111MODULE": "off"}  # fmt: skip
    subprocess.run(
        ["go", "build", "-o", str(binary), str(CLIENTS / "stream.go")], env=env, check=True
    )
    return binary


@needs("go")
async def test_go_net_http(gated: tuple[Gate, str], go_client: Path, records: RecordLog) -> None:
    gate, base = gated
    await run_client([str(go_client), f"{base}/v1/chat/completions", CHAT], gate)
    await records.wait_for(1)
    assert records[0]["encoding"] == "gzip"


@needs("node")
async def test_node_fetch(gated: tuple[Gate, str], records: RecordLog) -> None:
    gate, base = gated
    await run_client(
        ["node", str(CLIENTS / "stream.mjs"), f"{base}/v1/chat/completions", CHAT], gate
    )
    await records.wait_for(1)
    assert records[0]["encoding"] == "gzip"


@needs("curl")
async def test_curl(gated: tuple[Gate, str], records: RecordLog) -> None:
    gate, base = gated
    argv = ["curl", "-sSN", "--compressed", "--fail-with-body", "-H",
            "Content-Type: application/json", "--data-binary", CHAT,
            f"{base}/v1/chat/completions"]  # fmt: skip
    await run_client(argv, gate)
    await records.wait_for(1)
    assert records[0]["encoding"] == "gzip"


async def sdk_stream(
    chunks: AsyncIterator[object], gate: Gate, text: Callable[[object], str]
) -> str:
    seen = []
    async for chunk in chunks:
        piece = text(chunk)
        seen.append(piece)
        gate.saw(json.dumps(piece))
    return "".join(seen)


async def test_openai_sdk(gated: tuple[Gate, str], records: RecordLog) -> None:
    from openai import AsyncOpenAI

    gate, base = gated
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="sk-client", max_retries=0) as sdk:
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Say six words."}],
            stream=True,
        )  # fmt: skip

        def text(chunk: object) -> str:
            choices = getattr(chunk, "choices", [])
            return (choices[0].delta.content or "") if choices else ""

        assert await sdk_stream(stream, gate, text) == "".join(WORDS)
    await records.wait_for(1)
    assert records[0]["encoding"] == "gzip"


async def test_anthropic_sdk(gated: tuple[Gate, str], records: RecordLog) -> None:
    anthropic = pytest.importorskip("anthropic")
    gate, base = gated
    messages = [{"role": "user", "content": "Say six words."}]
    async with (
        anthropic.AsyncAnthropic(base_url=base, api_key="sk-client", max_retries=0) as sdk,
        sdk.messages.stream(model="claude-haiku-4-5", max_tokens=64, messages=messages) as stream,
    ):
        assert await sdk_stream(stream.text_stream, gate, str) == "".join(WORDS)
    await records.wait_for(1)
    assert records[0]["encoding"] == "gzip"
