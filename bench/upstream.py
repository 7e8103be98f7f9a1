"""A mock OpenAI upstream for benchmarks: a realistic chat completion stream, instantly or paced.

    python bench/upstream.py --port 8001 [--pace 0.02]

68 events, ~20 KB: 64 one-token content chunks padded to ~300 bytes like real ones (OpenAI adds
an `obfuscation` field), a finish chunk, a usage chunk, `data: [DONE]`; one HTTP chunk per event.
A raw asyncio protocol with precomputed bytes, so that it is never the bottleneck (bench/run.py
measures its ceiling). Keep-alive; any method and path.
"""

from __future__ import annotations

import argparse
import asyncio
import json

WORDS = ["", "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "streaming", "tokens", "through", "a", "proxy", "that", "counts", "every", "one", "of", "them", "exactly", "and", "compresses", "each", "event"]  # fmt: skip
EVENTS_CONTENT = 64


def _chunk(delta: dict[str, object], finish: str | None = None, **extra: object) -> bytes:
    body: dict[str, object] = {
        "id": "chatcmpl-bench0000000000000000000000", "object": "chat.completion.chunk",
        "created": 1763900000, "model": "gpt-4o-mini-2024-07-18", "service_tier": "default",
        "system_fingerprint": "fp_bench0001",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }  # fmt: skip
    body.update(extra)
    data = json.dumps(body, separators=(",", ":"))
    pad = max(0, 300 - len(data) - 25)
    return b"data: " + data[:-1].encode() + b',"obfuscation":"' + b"x" * pad + b'"}\n\n'


def stream_events() -> list[bytes]:
    events = [_chunk({"role": "assistant", "content": ""})]
    for i in range(1, EVENTS_CONTENT + 1):
        events.append(_chunk({"content": " " + WORDS[i % len(WORDS)].strip()}))
    events.append(_chunk({}, finish="stop"))
    usage = {
        "prompt_tokens": 24,
        "completion_tokens": EVENTS_CONTENT,
        "total_tokens": 24 + EVENTS_CONTENT,
    }
    events.append(
        b"data: "
        + json.dumps(
            {
                "id": "chatcmpl-bench0000000000000000000000",
                "object": "chat.completion.chunk",
                "created": 1763900000,
                "model": "gpt-4o-mini-2024-07-18",
                "choices": [],
                "usage": usage,
            },
            separators=(",", ":"),
        ).encode()
        + b"\n\n"
    )
    events.append(b"data: [DONE]\n\n")
    return events


EVENTS = stream_events()
BODY = b"".join(EVENTS)
HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\nCache-Control: no-cache\r\n\r\n"
)
CHUNKS = [b"%x\r\n%s\r\n" % (len(e), e) for e in EVENTS]
LAST = b"0\r\n\r\n"
FAST_RESPONSE = HEAD + b"".join(CHUNKS) + LAST


class Upstream(asyncio.Protocol):
    def __init__(self, pace: float) -> None:
        self.pace = pace
        self.buffer = bytearray()
        self.need = 0  # bytes the request being read still lacks (its body): skip the search
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.need > len(self.buffer):
            return
        self._serve()

    def _serve(self) -> None:
        while not self.busy:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            at = head.find(b"content-length:")
            if at >= 0:
                length = int(head[at + 15 :].split(b"\r\n", 1)[0])
            if len(self.buffer) < end + 4 + length:
                self.need = end + 4 + length
                return
            self.need = 0
            del self.buffer[: end + 4 + length]
            assert self.transport is not None
            if self.pace <= 0:
                self.transport.write(FAST_RESPONSE)
            else:
                self.busy = True
                self.transport.write(HEAD + CHUNKS[0])
                asyncio.get_running_loop().call_later(self.pace, self._next, 1)

    def _next(self, index: int) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        if index < len(CHUNKS):
            self.transport.write(CHUNKS[index])
            asyncio.get_running_loop().call_later(self.pace, self._next, index + 1)
            return
        self.transport.write(LAST)
        self.busy = False
        self._serve()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def main(port: int, pace: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Upstream(pace), "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--pace", type=float, default=0.0, help="seconds between events (0: all at once)"
    )
    args = parser.parse_args()
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        uvloop.run(main(args.port, args.pace))
    except ImportError:
        asyncio.run(main(args.port, args.pace))
