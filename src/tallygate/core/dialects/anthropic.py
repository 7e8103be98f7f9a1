"""Anthropic's Messages API (`/v1/messages`): what its events say, an estimate of a request's
input tokens, and its error shape.

Anthropic publishes no tokenizer: text is counted with the default encoding, images with
Anthropic's published (width x height) / 750 after fitting in 1568 px. Both are estimates and
labelled so.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import orjson

from tallygate.core.dialects.base import (
    CONTENT,
    Extractor,
    Usage,
    as_dict,
    as_int,
    as_list,
    error_message,
)
from tallygate.core.images import b64_prefix, image_size

if TYPE_CHECKING:  # the estimator's counting tools; it calls these functions
    from tallygate.core.prompt import PromptEstimator

PER_MESSAGE = 3  # an approximation: Anthropic does not say how it frames a message


class AnthropicMessages(Extractor):
    """message_start carries the input usage (and a placeholder output count); each
    message_delta carries cumulative usage, sometimes with a larger input (server tools)."""

    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[str, int] = {}
        self._blocks: dict[int, str] = {}

    def event(self, data: bytes, name: str | None) -> bool:
        if name == "ping":
            return False
        message = as_dict(orjson.loads(data))
        kind = message.get("type")
        if kind == "content_block_delta":
            delta = as_dict(message.get("delta"))
            index = as_int(message.get("index"))
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                self._text(CONTENT[index] if index < 8 else f"content:{index}", delta.get("text"))
            elif delta_type == "thinking_delta":
                self._text(f"reasoning:{index}", delta.get("thinking"))
            elif delta_type == "input_json_delta":
                self._text(f"tool:{index}", delta.get("partial_json"))
        elif kind == "content_block_start":
            block = as_dict(message.get("content_block"))
            index = as_int(message.get("index"))
            if block.get("type") == "text":
                self._text(f"content:{index}", block.get("text"))
            elif block.get("type") in ("tool_use", "server_tool_use"):
                self._text(f"tool:{index}", block.get("name"))
        elif kind == "message_start":
            start = as_dict(message.get("message"))
            self._model(start.get("model"))
            self._usage(as_dict(start.get("usage")))
        elif kind == "message_delta":
            reason = as_dict(message.get("delta")).get("stop_reason")
            if isinstance(reason, str):
                self.finish_reason = reason
            self._usage(as_dict(message.get("usage")))
        elif kind == "error":
            self.errors.append(error_message(message.get("error")))
        return False

    def body(self, data: bytes) -> None:
        message = as_dict(orjson.loads(data))
        if message.get("type") == "error":
            self.errors.append(error_message(message.get("error")))
        self._model(message.get("model"))
        for index, block in enumerate(as_list(message.get("content"))):
            block = as_dict(block)
            kind = block.get("type")
            if kind == "text":
                self._text(f"content:{index}", block.get("text"))
            elif kind == "thinking":
                self._text(f"reasoning:{index}", block.get("thinking"))
            elif kind in ("tool_use", "server_tool_use"):
                self._text(f"tool:{index}", block.get("name"))
                self._text(f"tool:{index}", orjson.dumps(block.get("input")).decode())
        if isinstance(message.get("stop_reason"), str):
            self.finish_reason = message["stop_reason"]
        self._usage(as_dict(message.get("usage")))

    def _usage(self, usage: dict[str, Any]) -> None:
        for key in ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                    "cache_read_input_tokens"):  # fmt: skip
            if isinstance(usage.get(key), int):
                self._raw[key] = usage[key]
        if not self._raw:
            return
        written = self._raw.get("cache_creation_input_tokens", 0)
        read = self._raw.get("cache_read_input_tokens", 0)
        self.usage = Usage(
            # Anthropic's input_tokens leaves out cache reads and writes; ours includes them.
            input=self._raw.get("input_tokens", 0) + written + read,
            output=self._raw.get("output_tokens", 0),
            cached_input=read,
            cache_write_input=written,
        )


def anthropic_image_tokens(width: int, height: int) -> int:
    scale = min(1.0, 1568 / max(width, height))
    return math.ceil(width * scale * height * scale / 750)


def estimate(e: PromptEstimator, request: dict[str, Any], model: str) -> int:
    total = _content(e, request.get("system"))
    for message in as_list(request.get("messages")):
        message = as_dict(message)
        total += PER_MESSAGE + _content(e, message.get("content"))
    for tool in as_list(request.get("tools")):
        tool = as_dict(tool)
        total += e.count(tool.get("name")) + e.count(tool.get("description"))
        total += e.json(tool.get("input_schema"))
    return total


def _content(e: PromptEstimator, content: object) -> int:
    if isinstance(content, str):
        return e.count(content)
    total = 0
    for block in content if isinstance(content, list) else ():
        block = as_dict(block)
        kind = block.get("type")
        if kind == "text":
            total += e.count(block.get("text"))
        elif kind == "thinking":
            total += e.count(block.get("thinking"))
        elif kind in ("tool_use", "server_tool_use"):
            total += e.count(block.get("name")) + e.json(block.get("input"))
        elif kind == "tool_result":
            total += _content(e, block.get("content"))
        elif kind == "image":
            source = as_dict(block.get("source"))
            size = None
            if source.get("type") == "base64" and isinstance(source.get("data"), str):
                size = image_size(b64_prefix(source["data"]))
            # Anthropic: tokens = width * height / 750 (after fitting in 1568 px).
            total += anthropic_image_tokens(*size) if size else e.image_default
    return total


# The Anthropic API's error types for the statuses a proxy produces.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "request_too_large",
    414: "invalid_request_error",
    431: "invalid_request_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_body(status: int, message: str, kind: str, code: str) -> bytes:
    """Anthropic's error shape: its own error type for the status."""
    kind = ERROR_TYPES.get(status, "api_error")
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})
