"""A simulated LLM upstream: OpenAI chat completions and Responses, Anthropic messages (and
count_tokens), Ollama chat and generate (and tags), streaming and not, in the event shapes the
recorded corpus shows and the official SDKs expect, with the usage each API reports. For the
demo, benchmarks and load tests: no key, no network.

Pacing (time to first token, tokens per second), output length, an error rate (answered before
the stream starts) and a mid-stream failure rate (the connection is cut) are settings.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken
from aiohttp import web

from tallygate.config import Metering
from tallygate.core.dialects import Dialect
from tallygate.core.prompt import PromptEstimator
from tallygate.core.tokens import Tokenizers, count

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
    """`tokenizers`: report the tokens tallygate's own estimate counts (the model's tiktoken
    encoding, the same prompt rules), so the demo's estimates and reported usage agree; None:
    about four characters a token."""

    def __init__(self, settings: SimulatorSettings, tokenizers: Tokenizers | None = None) -> None:
        self.settings = settings
        self.random = random.Random(settings.seed)
        self.tokenizers = tokenizers

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.dispatch)
        return app

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        """One handler for every path: by the path's ending, as tallygate detects dialects."""
        path = request.path.rstrip("/")
        if request.method == "GET" and path.endswith("/models"):
            return await self.models(request)
        if request.method == "GET" and path.endswith("/api/tags"):
            return await self.ollama_tags(request)
        for ending, handler in (
            ("/chat/completions", self.openai_chat),
            ("/responses", self.openai_responses),
            ("/messages", self.anthropic_messages),
            ("/messages/count_tokens", self.anthropic_count_tokens),
            ("/api/chat", self.ollama_chat),
            ("/api/generate", self.ollama_generate),
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

    def _encoding(self, body: dict[str, Any]) -> tiktoken.Encoding | None:
        if self.tokenizers is None:
            return None
        model = body.get("model")
        return self.tokenizers.for_model(model if isinstance(model, str) else None).encoding

    def _prompt_tokens(self, dialect: Dialect, body: dict[str, Any]) -> int:
        encoding = self._encoding(body)
        if encoding is None:  # about four characters a token: believable, consistent
            text = orjson.dumps(body.get("messages") or body.get("input") or body.get("prompt"))
            return max(1, len(text) // 4)
        model = body.get("model")
        estimator = PromptEstimator(encoding, Metering().image_tokens_default)
        return estimator.estimate(dialect, body, model if isinstance(model, str) else None) or 0

    def _output_tokens(self, body: dict[str, Any], words: list[str]) -> int:
        encoding = self._encoding(body)
        return len(words) if encoding is None else count(encoding, "".join(words))

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
        prompt = self._prompt_tokens("openai_chat", body)
        # OpenAI bills the end-of-turn token of a text answer when tools were offered.
        output = self._output_tokens(body, words) + bool(body.get("tools") or body.get("functions"))
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
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
        prompt = self._prompt_tokens("openai_responses", body)
        output = self._output_tokens(body, words) + 1  # the end-of-turn token, always billed
        response: dict[str, Any] = {
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
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": prompt + output,
            },
        }
        if not body.get("stream"):
            await asyncio.sleep(self.settings.ttft)
            return web.json_response(response)

        sequence = iter(range(1 << 30))

        def event(kind: str, data: dict[str, Any]) -> bytes:
            body = {"type": kind, "sequence_number": next(sequence), **data}
            return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(body) + b"\n\n"

        item: dict[str, Any] = response["output"][0]
        part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        started = {**response, "status": "in_progress", "output": [], "usage": None}
        head = (
            event("response.created", {"response": started})
            + event("response.in_progress", {"response": started})
            + event(
                "response.output_item.added",
                {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
            )
            + event("response.content_part.added", {**where, "part": part})
        )
        deltas = [
            event("response.output_text.delta", {**where, "delta": w, "logprobs": []})
            for w in words
        ]
        text = "".join(words)
        tail = [
            event("response.output_text.done", {**where, "text": text, "logprobs": []}),
            event("response.content_part.done", {**where, "part": {**part, "text": text}}),
            event("response.output_item.done", {"output_index": 0, "item": item}),
            event("response.completed", {"response": response}),
        ]
        return await self._stream(
            request, "text/event-stream; charset=utf-8", [head + deltas[0], *deltas[1:]], tail
        )

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
        prompt = self._prompt_tokens("anthropic_messages", body)
        output = self._output_tokens(body, words)
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
                        "output_tokens": output,
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
                    "usage": {"output_tokens": output},
                },
            ),
            event("message_stop", {}),
        ]
        return await self._stream(request, "text/event-stream; charset=utf-8", events, tail)

    # -- Ollama chat ----------------------------------------------------------------------------

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama(
            request, "ollama_chat", lambda text: {"message": {"role": "assistant", "content": text}}
        )

    async def ollama_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama(request, "ollama_generate", lambda text: {"response": text})

    async def _ollama(
        self, request: web.Request, dialect: Dialect, says: Callable[[str], dict[str, Any]]
    ) -> web.StreamResponse:
        """Ollama's NDJSON lines (or one JSON answer): `says` puts the text where the endpoint
        does (chat: a message; generate: `response`)."""
        body = await self._request(request)
        if self._fails(self.settings.error_rate):
            return web.json_response(
                {"error": "model is overloaded, please try again"},
                status=self.settings.error_status or 503,
            )
        words = self._words()
        model = body.get("model") or "llama3"
        prompt = self._prompt_tokens(dialect, body)
        output = self._output_tokens(body, words)

        def line(text: str, done: bool = False) -> bytes:
            message: dict[str, Any] = {
                "model": model, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                **says(text), "done": done,
            }  # fmt: skip
            if done:
                message.update({
                    "done_reason": "stop", "total_duration": 1,
                    "prompt_eval_count": prompt, "eval_count": output,
                })  # fmt: skip
                if dialect == "ollama_generate":
                    message["context"] = []
            return orjson.dumps(message) + b"\n"

        if body.get("stream") is False:
            await asyncio.sleep(self.settings.ttft)
            return web.Response(
                body=line("".join(words), done=True)[:-1], content_type="application/json"
            )
        return await self._stream(
            request, "application/x-ndjson", [line(w) for w in words], [line("", done=True)]
        )

    async def anthropic_count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await self._request(request)
        return web.json_response({"input_tokens": self._prompt_tokens("anthropic_messages", body)})

    async def ollama_tags(self, request: web.Request) -> web.StreamResponse:
        """The models this upstream has, as Ollama lists them."""
        details = {"format": "gguf", "family": "llama", "parameter_size": "8B",
                   "quantization_level": "Q4_K_M"}  # fmt: skip
        model = {"name": "llama3:latest", "model": "llama3:latest", "size": 4661224676,
                 "digest": "sim", "modified_at": "2026-01-01T00:00:00Z",
                 "details": details}  # fmt: skip
        return web.json_response({"models": [model]})

    async def models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": "gpt-4o-mini", "object": "model", "owned_by": "simulator"}],
            }
        )
