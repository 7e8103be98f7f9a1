"""Ollama's native API (`/api/chat`, `/api/generate`): NDJSON answers, the last line with
`done: true` and the counts; an estimate of a request's input tokens; its error shape.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson

from tallygate.core.dialects.base import Extractor, Usage, as_dict, as_int, as_list, error_message

if TYPE_CHECKING:  # the estimator's counting tools; it calls these functions
    from tallygate.core.prompt import PromptEstimator

PER_MESSAGE = 3  # as OpenAI's chat: Ollama's chat templates differ per model


class Ollama(Extractor):
    """/api/chat and /api/generate: one JSON object per line, the last with `done: true`."""

    def event(self, data: bytes, name: str | None) -> bool:
        if data and not data.isspace():  # a blank line: nothing to read (and no copy made)
            self._object(as_dict(orjson.loads(data)))
        return False

    def body(self, data: bytes) -> None:
        self._object(as_dict(orjson.loads(data)))

    def _object(self, message: dict[str, Any]) -> None:
        # Once per line of every stream: the helpers are called only for fields that are there
        # (a line carries one or two of them), which halves the calls a line costs.
        if "error" in message:
            self.errors.append(error_message(message["error"]))
        model = message.get("model")
        if model != self.model:
            self._model(model)
        if response := message.get("response"):
            self._text("content:0", response)
        if thinking := message.get("thinking"):
            self._text("reasoning:0", thinking)
        chat = message.get("message")
        if not chat or type(chat) is not dict:
            chat = {}
        if content := chat.get("content"):
            self._text("content:0", content)
        if thinking := chat.get("thinking"):
            self._text("reasoning:0", thinking)
        for i, call in enumerate(as_list(chat.get("tool_calls"))):
            function = as_dict(as_dict(call).get("function"))
            self._text(f"tool:{i}", function.get("name"))
            self._text(f"tool:{i}", orjson.dumps(function.get("arguments")).decode())
        if message.get("done") is True:
            if isinstance(message.get("done_reason"), str):
                self.finish_reason = message["done_reason"]
            if "prompt_eval_count" in message or "eval_count" in message:
                self.usage = Usage(
                    input=as_int(message.get("prompt_eval_count")),
                    output=as_int(message.get("eval_count")),
                )


def estimate_chat(e: PromptEstimator, request: dict[str, Any], model: str) -> int:
    total = 0
    for message in as_list(request.get("messages")):
        message = as_dict(message)
        total += PER_MESSAGE + e.count(message.get("content"))
        total += e.image_default * len(as_list(message.get("images")))
    return total


def estimate_generate(e: PromptEstimator, request: dict[str, Any], model: str) -> int:
    return e.texts([request.get("system"), request.get("prompt")])


def error_body(status: int, message: str, kind: str, code: str) -> bytes:
    """Ollama's error shape: a bare message."""
    return orjson.dumps({"error": message})
