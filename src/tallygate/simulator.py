"""A simulated LLM upstream: OpenAI chat completions and Responses, Anthropic messages and Ollama
chat, streaming and not, in the chunk shapes the recorded corpus shows, with the usage each API
reports. For the demo, benchmarks and load tests: no key, no network.

Pacing (time to first token, tokens per second), output length, an error rate (answered before
the stream starts) and a mid-stream failure rate (the connection is cut) are settings.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

# fmt: off
WORDS = (
    "tokens", "stream", "through", "the", "proxy", "one", "event", "at", "a", "time", "while",
    "tallygate", "counts", "each", "of", "them", "prices", "the", "traffic", "and", "compresses",
    "every", "event", "so", "the", "client", "sees", "the", "text", "as", "soon", "as", "it", "is",
    "written", "and", "the", "operator", "sees", "what", "it", "cost",
)
# fmt: on


@dataclass(frozen=True)
class SimulatorSettings:
    ttft: float = 0.2  # seconds before the first token
    tokens_per_second: float = 50.0  # 0: as fast as possible
    output_tokens: int = 64
    error_rate: float = 0.0  # share of requests answered with an error before any output
    midstream_failure_rate: float = 0.0  # share of streams cut halfway
    error_status: int | None = None  # of those errors; None: each API's own (500, 529, 503)
    seed: int | None = None


class Simulator:
    def __init__(self, settings: SimulatorSettings) -> None:
        self.settings = settings
        self.random = random.Random(settings.seed)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.dispatch)
        return app

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """One handler for every path: by the path's ending, as tallygate detects dialects."""
        path = request.path.rstrip("/")
        if request.method == "GET" and path.endswith("/models"):
            return await self.models(request)
        for ending, handler in (
            ("/chat/completions", self.openai_chat),
            ("/responses", self.openai_responses),
            ("/messages", self.anthropic_messages),
            ("/api/chat", self.ollama_chat),
        ):
            if request.method == "POST" and path.endswith(ending):
                return await handler(request)
        return web.json_response({"error": {"message": f"no such path: {path}"}}, status=404)

    # -- the shape every dialect shares --------------------------------------------------------

    def _words(self) -> list[str]:
        return [
            (" " if i else "") + self.random.choice(WORDS)
            for i in range(self.settings.output_tokens)
        ]

    async def _pace(self, first: bool) -> None:
        if first:
            await asyncio.sleep(self.settings.ttft)
        elif self.settings.tokens_per_second > 0:
            await asyncio.sleep(1 / self.settings.tokens_per_second)

    def _fails(self, rate: float) -> bool:
        return rate > 0 and self.random.random() < rate

    @staticmethod
    async def _request(request: web.Request) -> dict[str, Any]:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return {}
        return body if isinstance(body, dict) else {}

    @staticmethod
    def _prompt_tokens(body: dict[str, Any]) -> int:
        # About four characters a token: enough for a believable, consistent report.
        text = orjson.dumps(body.get("messages") or body.get("input") or body.get("prompt") or "")
        return max(1, len(text) // 4)

    async def _stream(
        self, request: web.Request, content_type: str, events: list[bytes], tail: list[bytes]
    ) -> web.StreamResponse:
        """Send `events` paced (one output token each) then `tail`; maybe cut halfway."""
        response = web.StreamResponse(
            headers={"Content-Type": content_type, "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        cut = len(events) // 2 if self._fails(self.settings.midstream_failure_rate) else None
        for i, event in enumerate(events):
            await self._pace(first=i == 0)
            if i == cut:
                assert request.transport is not None
                request.transport.close()  # the upstream dies mid-stream, as real ones do
                return response
            await response.write(event)
        for event in tail:
            await response.write(event)
        await response.write_eof()
        return response

    # -- OpenAI chat completions -----------------------------------------------------------------

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        if self._fails(self.settings.error_rate):
            return web.json_response(
                {
                    "error": {
                        "message": "The server had an error while processing your request.",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=self.settings.error_status or 500,
            )
        # A dated version of the requested model, as the APIs report it (and prices resolve it).
        model = f"{body.get('model') or 'gpt-4o-mini'}-2025-01-01"
        words = self._words()
        usage = {
            "prompt_tokens": self._prompt_tokens(body),
            "completion_tokens": len(words),
            "total_tokens": self._prompt_tokens(body) + len(words),
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
        base = {
            "id": f"chatcmpl-sim{int(time.time() * 1000)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_sim",
        }
        if not body.get("stream"):
            await asyncio.sleep(self.settings.ttft)
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(words)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return (
                b"data: "
                + orjson.dumps(
                    {
                        **base,
                        "choices": [
                            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                        ],
                    }
                )
                + b"\n\n"
            )

        events = [chunk({"role": "assistant", "content": words[0]})] + [
            chunk({"content": w}) for w in words[1:]
        ]
        tail = [chunk({}, "stop")]
        if (body.get("stream_options") or {}).get("include_usage"):
            tail.append(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        tail.append(b"data: [DONE]\n\n")
        return await self._stream(request, "text/event-stream; charset=utf-8", events, tail)

    # -- OpenAI Responses -----------------------------------------------------------------------

    async def openai_responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        if self._fails(self.settings.error_rate):
            return web.json_response(
                {
                    "error": {
                        "message": "The server had an error.",
                        "type": "server_error",
                        "param": None,
                        "code": "server_error",
                    }
                },
                status=self.settings.error_status or 500,
            )
        words = self._words()
        prompt = self._prompt_tokens(body)
        response = {
            "id": f"resp_sim{int(time.time() * 1000)}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": f"{body.get('model') or 'gpt-4.1'}-2025-01-01",
            "output": [
                {
                    "type": "message",
                    "id": "msg_sim",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "".join(words), "annotations": []}],
                }
            ],
            "usage": {
                "input_tokens": prompt,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": len(words) + 1,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + len(words) + 1,
            },
        }
        if not body.get("stream"):
            await asyncio.sleep(self.settings.ttft)
            return web.json_response(response)

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return (
                b"event: "
                + kind.encode()
                + b"\ndata: "
                + orjson.dumps({"type": kind, **data})
                + b"\n\n"
            )

        started = {**response, "status": "in_progress", "output": [], "usage": None}
        events = [
            event("response.created", {"response": started})
            + event(
                "response.output_text.delta",
                {"item_id": "msg_sim", "output_index": 0, "content_index": 0, "delta": words[0]},
            )
        ]
        events += [
            event(
                "response.output_text.delta",
                {"item_id": "msg_sim", "output_index": 0, "content_index": 0, "delta": w},
            )
            for w in words[1:]
        ]
        tail = [
            event(
                "response.output_text.done",
                {
                    "item_id": "msg_sim",
                    "output_index": 0,
                    "content_index": 0,
                    "text": "".join(words),
                },
            ),
            event("response.completed", {"response": response}),
        ]
        return await self._stream(request, "text/event-stream; charset=utf-8", events, tail)

    # -- Anthropic messages ---------------------------------------------------------------------

    async def anthropic_messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        if self._fails(self.settings.error_rate):
            return web.json_response(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                status=self.settings.error_status or 529,
            )
        words = self._words()
        model = f"{body.get('model') or 'claude-sonnet-4-5'}-20250101"
        prompt = self._prompt_tokens(body)
        if not body.get("stream"):
            await asyncio.sleep(self.settings.ttft)
            return web.json_response(
                {
                    "id": "msg_sim",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [{"type": "text", "text": "".join(words)}],
                    "stop_reason": "end_turn",
                    "usage": {
                        "input_tokens": prompt,
                        "output_tokens": len(words),
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                    },
                }
            )

        def event(kind: str, data: dict[str, Any]) -> bytes:
            # Anthropic pads its JSON with spaces before the closing brace; so do we.
            return (
                b"event: "
                + kind.encode()
                + b"\ndata: "
                + orjson.dumps({"type": kind, **data})[:-1]
                + b"   }\n\n"
            )

        start = event(
            "message_start",
            {
                "message": {
                    "id": "msg_sim",
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "usage": {
                        "input_tokens": prompt,
                        "cache_creation_input_tokens": 0,
                        "cache_read_input_tokens": 0,
                        "output_tokens": 1,
                    },
                }
            },
        )
        block = event(
            "content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}
        )
        events = [
            start
            + block
            + event(
                "content_block_delta",
                {"index": 0, "delta": {"type": "text_delta", "text": words[0]}},
            )
        ]
        events += [
            event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
            for w in words[1:]
        ]
        tail = [
            event("content_block_stop", {"index": 0}),
            event(
                "message_delta",
                {
                    "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                    "usage": {"output_tokens": len(words)},
                },
            ),
            event("message_stop", {}),
        ]
        return await self._stream(request, "text/event-stream; charset=utf-8", events, tail)

    # -- Ollama chat ----------------------------------------------------------------------------

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        if self._fails(self.settings.error_rate):
            return web.json_response(
                {"error": "model is overloaded, please try again"},
                status=self.settings.error_status or 503,
            )
        words = self._words()
        model = body.get("model") or "llama3"
        prompt = self._prompt_tokens(body)

        def line(content: str, done: bool = False) -> bytes:
            message: dict[str, Any] = {
                "model": model,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "message": {"role": "assistant", "content": content},
                "done": done,
            }
            if done:
                message.update(
                    {
                        "done_reason": "stop",
                        "total_duration": 1,
                        "prompt_eval_count": prompt,
                        "eval_count": len(words),
                    }
                )
            return orjson.dumps(message) + b"\n"

        if body.get("stream") is False:
            await asyncio.sleep(self.settings.ttft)
            return web.Response(
                body=line("".join(words), done=True)[:-1], content_type="application/json"
            )
        return await self._stream(
            request, "application/x-ndjson", [line(w) for w in words], [line("", done=True)]
        )

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "gpt-4o-mini", "object": "model", "owned_by": "simulator"}],
            }
        )
