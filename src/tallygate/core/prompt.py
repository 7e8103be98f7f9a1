"""Estimates of a request's input tokens from its JSON body, per dialect. Pure.

The formulas (documented in docs/metering.md) follow what the providers publish:
- OpenAI chat: 3 tokens per message plus its role and content, 1 more for a `name`, 3 to prime the
  reply (OpenAI's cookbook, "How to count tokens with tiktoken"); tool definitions as OpenAI
  renders them, approximated per function and per property (same source); images by tiles.
- Anthropic has no public tokenizer: the text is counted with the default encoding, images with
  Anthropic's published (width x height) / 750. Both are estimates and labelled so.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson
import tiktoken

from tallygate.core.dialects import Dialect
from tallygate.core.tokens import count

_PER_MESSAGE = 3
_PER_NAME = 1
_REPLY_PRIMING = 3

# OpenAI's rendering of tool definitions, per model family (cookbook constants).
_FUNCTION_START, _FUNCTION_END, _PROPERTIES_START, _PROPERTY, _ENUM_START, _ENUM_ITEM = (
    7, 12, 3, 3, -3, 3,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ImagePricing:
    """OpenAI's tile formula: `base + per_tile * tiles` at high detail, `base` at low."""

    base: int
    per_tile: int


_TILE_MODELS = (("gpt-4o-mini", ImagePricing(2833, 5667)),)
_TILE_DEFAULT = ImagePricing(85, 170)


class PromptEstimator:
    def __init__(self, encoding: tiktoken.Encoding, image_tokens_default: int) -> None:
        self._encoding = encoding
        self._image_default = image_tokens_default

    def estimate(self, dialect: Dialect, request: object, model: str | None = None) -> int | None:
        if not isinstance(request, dict):
            return None
        if dialect == "openai_chat":
            return self._openai_chat(request, model or "")
        if dialect == "openai_completions":
            return self._texts(_strings(request.get("prompt")))
        if dialect == "openai_responses":
            return self._responses(request, model or "")
        if dialect == "anthropic_messages":
            return self._anthropic(request)
        if dialect == "ollama_chat":
            return self._ollama_chat(request)
        if dialect == "ollama_generate":
            return self._texts([request.get("system"), request.get("prompt")])
        return None

    # -- common pieces ----------------------------------------------------------------------

    def _count(self, text: object) -> int:
        if not isinstance(text, str) or not text:
            return 0
        return count(self._encoding, text)

    def _texts(self, texts: Iterable[object]) -> int:
        return sum(self._count(t) for t in texts)

    def _json(self, value: object) -> int:
        return self._count(orjson.dumps(value).decode()) if value is not None else 0

    # -- OpenAI -----------------------------------------------------------------------------

    def _openai_chat(self, request: dict[str, Any], model: str) -> int:
        total = _REPLY_PRIMING
        for message in _list(request.get("messages")):
            if not isinstance(message, dict):
                continue
            total += _PER_MESSAGE + self._count(message.get("role"))
            total += self._openai_content(message.get("content"), model)
            if message.get("name"):
                total += _PER_NAME + self._count(message["name"])
            for call in _list(message.get("tool_calls")):
                function = _dict(_dict(call).get("function"))
                total += self._count(function.get("name")) + self._count(function.get("arguments"))
            total += self._count(_dict(message.get("function_call")).get("arguments"))
        tools = [_dict(t).get("function") for t in _list(request.get("tools"))]
        tools += list(_list(request.get("functions")))
        total += self._tools([t for t in tools if isinstance(t, dict)])
        response_format = _dict(request.get("response_format"))
        if response_format.get("type") == "json_schema":
            total += self._json(_dict(response_format.get("json_schema")).get("schema"))
        return total

    def _openai_content(self, content: object, model: str) -> int:
        if isinstance(content, str):
            return self._count(content)
        total = 0
        for part in content if isinstance(content, list) else ():
            part = _dict(part)
            kind = part.get("type")
            if kind in ("text", "input_text", "output_text"):
                total += self._count(part.get("text"))
            elif kind == "refusal":
                total += self._count(part.get("refusal"))
            elif kind in ("image_url", "input_image"):
                image = part.get("image_url")
                url = _dict(image).get("url") if isinstance(image, dict) else image
                detail = _dict(image).get("detail") or part.get("detail") or "auto"
                total += self._openai_image(url, str(detail), model)
        return total

    def _openai_image(self, url: object, detail: str, model: str) -> int:
        pricing = next((p for prefix, p in _TILE_MODELS if model.startswith(prefix)), _TILE_DEFAULT)
        if detail == "low":
            return pricing.base
        size = image_size_from_data_url(url) if isinstance(url, str) else None
        if size is None:
            return self._image_default
        return openai_image_tokens(*size, pricing)

    def _tools(self, functions: list[dict[str, Any]]) -> int:
        if not functions:
            return 0
        total = _FUNCTION_END
        for function in functions:
            total += _FUNCTION_START
            description = str(function.get("description") or "").removesuffix(".")
            total += self._count(f"{function.get('name', '')}:{description}")
            properties = _dict(_dict(function.get("parameters")).get("properties"))
            if properties:
                total += _PROPERTIES_START
            for name, spec in properties.items():
                spec = _dict(spec)
                total += _PROPERTY
                enum = spec.get("enum")
                if isinstance(enum, list):
                    total += _ENUM_START + sum(_ENUM_ITEM + self._count(str(e)) for e in enum)
                described = str(spec.get("description") or "").removesuffix(".")
                total += self._count(f"{name}:{spec.get('type', '')}:{described}")
        return total

    def _responses(self, request: dict[str, Any], model: str) -> int:
        total = _REPLY_PRIMING
        if request.get("instructions"):
            total += _PER_MESSAGE + self._count("system") + self._count(request["instructions"])
        items = request.get("input")
        if isinstance(items, str):
            items = [{"role": "user", "content": items}]
        for item in items if isinstance(items, list) else ():
            item = _dict(item)
            kind = item.get("type", "message")
            total += _PER_MESSAGE
            if kind == "message":
                total += self._count(item.get("role"))
                total += self._openai_content(item.get("content"), model)
            elif kind == "function_call":
                total += self._count(item.get("name")) + self._count(item.get("arguments"))
            elif kind == "function_call_output":
                output = item.get("output")
                total += self._count(output) if isinstance(output, str) else self._json(output)
        tools = [t for t in _list(request.get("tools")) if isinstance(t, dict)]
        total += self._tools([t for t in tools if t.get("type") == "function"])
        total += sum(self._json(t) for t in tools if t.get("type") != "function")
        return total

    # -- Anthropic and Ollama ---------------------------------------------------------------

    def _anthropic(self, request: dict[str, Any]) -> int:
        total = self._anthropic_content(request.get("system"))
        for message in _list(request.get("messages")):
            message = _dict(message)
            total += _PER_MESSAGE + self._anthropic_content(message.get("content"))
        for tool in _list(request.get("tools")):
            tool = _dict(tool)
            total += self._count(tool.get("name")) + self._count(tool.get("description"))
            total += self._json(tool.get("input_schema"))
        return total

    def _anthropic_content(self, content: object) -> int:
        if isinstance(content, str):
            return self._count(content)
        total = 0
        for block in content if isinstance(content, list) else ():
            block = _dict(block)
            kind = block.get("type")
            if kind == "text":
                total += self._count(block.get("text"))
            elif kind == "thinking":
                total += self._count(block.get("thinking"))
            elif kind in ("tool_use", "server_tool_use"):
                total += self._count(block.get("name")) + self._json(block.get("input"))
            elif kind == "tool_result":
                total += self._anthropic_content(block.get("content"))
            elif kind == "image":
                source = _dict(block.get("source"))
                size = None
                if source.get("type") == "base64" and isinstance(source.get("data"), str):
                    size = image_size(_b64_prefix(source["data"]))
                # Anthropic: tokens = width * height / 750 (after fitting in 1568 px).
                total += anthropic_image_tokens(*size) if size else self._image_default
        return total

    def _ollama_chat(self, request: dict[str, Any]) -> int:
        total = 0
        for message in _list(request.get("messages")):
            message = _dict(message)
            total += _PER_MESSAGE + self._count(message.get("content"))
            total += self._image_default * len(_list(message.get("images")))
        return total


def openai_image_tokens(width: int, height: int, pricing: ImagePricing = _TILE_DEFAULT) -> int:
    """High detail: fit in 2048x2048, then scale the shortest side down to 768, count 512 px
    tiles (OpenAI's vision pricing page)."""
    scale = min(1.0, 2048 / max(width, height))
    scale *= min(1.0, 768 / (min(width, height) * scale))
    tiles = math.ceil(width * scale / 512) * math.ceil(height * scale / 512)
    return pricing.base + pricing.per_tile * tiles


def anthropic_image_tokens(width: int, height: int) -> int:
    scale = min(1.0, 1568 / max(width, height))
    return math.ceil(width * scale * height * scale / 750)


def image_size_from_data_url(url: str) -> tuple[int, int] | None:
    if not url.startswith("data:") or ";base64," not in url[:100]:
        return None
    return image_size(_b64_prefix(url.split(",", 1)[1]))


def _b64_prefix(data: str, limit: int = 256 * 1024) -> bytes:
    """Enough of a base64 image to find its size (JPEG may put EXIF before its frame header)."""
    prefix = data[: limit - limit % 4]
    try:
        return base64.b64decode(prefix + "=" * (-len(prefix) % 4), validate=False)
    except (binascii.Error, ValueError):
        return b""


def image_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a PNG, GIF, WebP or JPEG header; None when unreadable, or when a
    side is 0 (no image a provider would bill as one)."""
    size = _header_size(data)
    return size if size is not None and min(size) > 0 else None


def _header_size(data: bytes) -> tuple[int, int] | None:
    try:
        if data.startswith(b"\x89PNG\r\n\x1a\n"):
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if data[:6] in (b"GIF87a", b"GIF89a"):
            width, height = struct.unpack("<HH", data[6:10])
            return width, height
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    """A request's field of the wrong type reads as absent (tests/test_fuzz.py)."""
    return value if isinstance(value, list) else []


def _strings(value: object) -> list[object]:
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return [value]
