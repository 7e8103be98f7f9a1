"""OpenAI's APIs and the many that copy them: Chat Completions (`/chat/completions`), the
legacy Completions (`/completions`) and Responses (`/responses`). What their answers say (model,
output text, usage, finish reason, errors), what their requests will cost in input tokens, and
the shape of their errors.

The prompt estimates follow OpenAI's cookbook ("How to count tokens with tiktoken"): 3 tokens
per message plus its role and content, 1 more for a `name`, 3 to prime the reply; tool
definitions as OpenAI renders them, approximated per function and per property; images by
tiles (OpenAI's vision pricing page). docs/metering.md has the formulas.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
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
    strings,
)
from tallygate.core.images import image_size_from_data_url

if TYPE_CHECKING:  # the estimator's counting tools; it calls these functions
    from tallygate.core.prompt import PromptEstimator

PER_MESSAGE = 3
PER_NAME = 1
REPLY_PRIMING = 3

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


def openai_image_tokens(width: int, height: int, pricing: ImagePricing = _TILE_DEFAULT) -> int:
    """High detail: fit in 2048x2048, then scale the shortest side down to 768, count 512 px
    tiles (OpenAI's vision pricing page)."""
    scale = min(1.0, 2048 / max(width, height))
    scale *= min(1.0, 768 / (min(width, height) * scale))
    tiles = math.ceil(width * scale / 512) * math.ceil(height * scale / 512)
    return pricing.base + pricing.per_tile * tiles


class OpenAIChat(Extractor):
    def __init__(self) -> None:
        super().__init__()
        self._template: ContentTemplate | None = None
        self._lessons = _LESSONS

    # This runs for every event of every stream, so it is written for speed: exact type checks
    # (orjson builds no subclasses), one look-up per field, no helper calls on the common path.
    def event(self, data: bytes, name: str | None) -> bool:
        template = self._template
        if template is not None:
            text = template.text(data)
            if text is not None:  # what parsing it would have done, without parsing it
                if template.model != self.model:
                    self._model(template.model)
                if text:
                    pieces = self.texts.get(template.channel)
                    if pieces is None:
                        self.texts[template.channel] = [text]
                    else:
                        pieces.append(text)
                return False
        if data == b"[DONE]":
            return False
        chunk = orjson.loads(data)
        if type(chunk) is not dict:
            return False
        model = chunk.get("model")
        if model != self.model:
            self._model(model)
        choices = chunk.get("choices")
        if type(choices) is list:
            for choice in choices:
                if type(choice) is not dict:
                    continue
                delta = choice.get("delta")
                if delta and type(delta) is dict:
                    # as_int() and _text() written out: two calls an event were 2% of metering's
                    # instructions (bench/instructions.py).
                    index = choice.get("index", 0)
                    if type(index) is not int or index < 0:
                        index = 0
                    text = delta.get("content")
                    if len(delta) == 1 and text and type(text) is str:  # most events: text
                        channel = CONTENT[index] if index < 8 else f"content:{index}"
                        pieces = self.texts.get(channel)
                        if pieces is None:
                            self.texts[channel] = [text]
                        else:
                            pieces.append(text)
                        if self._lessons and len(choices) == 1:
                            self._learn(data, chunk, text, channel)
                    else:
                        self._message(delta, index)
                reason = choice.get("finish_reason")
                if reason is not None and type(reason) is str:
                    self.finish_reason = reason
        if "error" in chunk:
            self.errors.append(error_message(chunk["error"]))
        usage = chunk.get("usage")
        if usage is None and "x_groq" in chunk:  # Groq puts it under x_groq
            usage = as_dict(chunk["x_groq"]).get("usage")
        if type(usage) is dict:
            # Some providers send running totals on every chunk: the last one is the truth.
            self.usage = openai_usage(usage)
            return choices == [] and set(chunk) <= _USAGE_CHUNK_KEYS
        return False

    def _learn(self, data: bytes, chunk: dict[str, Any], text: str, channel: str) -> None:
        """Take this text-only chunk as the template for the next ones, when it has nothing
        else to say: no finish reason, usage or error."""
        choice = chunk["choices"][0]
        if (
            choice.get("finish_reason") is not None
            or "error" in chunk
            or chunk.get("usage") is not None
            or "x_groq" in chunk
        ):
            return
        template = ContentTemplate.cut(data, chunk, text, channel)
        if template is not None:  # the text is plain: worth a check (a parse)
            self._lessons -= 1
            if template.holds(data):
                self._template = template

    def body(self, data: bytes) -> None:
        response = as_dict(orjson.loads(data))
        self._model(response.get("model"))
        if "error" in response:
            self.errors.append(error_message(response["error"]))
        for choice in as_list(response.get("choices")):
            choice = as_dict(choice)
            self._message(as_dict(choice.get("message")), as_int(choice.get("index")))
            self._finish(choice)
        if isinstance(response.get("usage"), dict):
            self.usage = openai_usage(response["usage"])

    def _message(self, message: dict[str, Any], index: int) -> None:
        # One pass over the few keys a delta has (usually one), rather than a look-up for each
        # field it might have: this runs for every event of every stream.
        for key, value in message.items():
            if not value:
                continue
            if key == "content":
                self._text(CONTENT[index] if index < 8 else f"content:{index}", value)
            elif key in ("reasoning_content", "reasoning"):  # DeepSeek; OpenRouter and others
                self._text(f"reasoning:{index}", value)
            elif key == "refusal":
                self._text(f"refusal:{index}", value)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    call = as_dict(call)
                    function = as_dict(call.get("function"))
                    channel = f"tool:{index}:{as_int(call.get('index'))}"
                    self._text(channel, function.get("name"))
                    self._text(channel, function.get("arguments"))
            elif key == "function_call":  # the legacy functions API
                function_call = as_dict(value)
                self._text(f"tool:{index}:f", function_call.get("name"))
                self._text(f"tool:{index}:f", function_call.get("arguments"))

    def _finish(self, choice: dict[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reason = reason


# How many chunks a stream may take as a template. A provider whose chunks differ in more than
# the text (a timestamp or an id per chunk) never matches one: it stops trying, so that it pays
# for learning a few times, not on every chunk.
_LESSONS = 4

# A byte that a JSON string holds only escaped: a control character or a backslash. A string
# without them (and without a quote) reads as its own UTF-8 bytes.
_ESCAPED = re.compile(rb"[\x00-\x1f\\]")
# The padding is read without decoding: printable ASCII only (OpenAI's is letters and digits).
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]|\\")
_PADDING_KEY = b',"obfuscation":"'


class ContentTemplate:
    """The bytes of a provider's text-only chunk around its text: `prefix`, the text, `suffix`.

    OpenAI-style streams repeat one chunk shape per token, the same bytes but for the text (and
    OpenAI's `obfuscation` padding, of random length). A chunk made of the same prefix, a text
    with nothing escaped and the same suffix (the padding aside, if plain too) is, as JSON, the
    template with only that string changed, so it means what the template meant, with this text.
    `text()` reads such a chunk with byte comparisons and a scan, for about half of what
    parsing it costs; any other chunk is parsed.

    `holds()` checks a template with orjson itself: a probe built on it must parse as the
    template with only the text (and padding) changed, so that a key written in escapes, or a
    text found elsewhere than in the delta, never makes one.
    """

    __slots__ = ("channel", "model", "padding", "prefix", "start", "suffix")

    def __init__(
        self, prefix: bytes, suffix: bytes, padding: int, channel: str, model: object
    ) -> None:
        self.prefix = prefix
        self.start = len(prefix)
        self.suffix = suffix  # from the text's closing quote to the end
        self.padding = padding  # where in the suffix the padding's value starts; 0: none
        self.channel = channel
        self.model = model

    @classmethod
    def cut(
        cls, data: bytes, chunk: dict[str, Any], text: str, channel: str
    ) -> ContentTemplate | None:
        """The template `data` would make, cut around `text`; None when `text` is not written
        plain in it, once. Not yet checked: see `holds()`."""
        key = data.find(b'"content":"')
        if key < 0 or data.find(b'"content":"', key + 1) >= 0:
            return None
        start = key + 11
        encoded = text.encode()
        end = start + len(encoded)
        if data[start:end] != encoded or data[end : end + 1] != b'"':
            return None  # written with escapes
        suffix = data[end:]
        padding = suffix.rfind(_PADDING_KEY)
        padding = padding + len(_PADDING_KEY) if padding > 0 else 0
        if padding and suffix.find(b'"', padding) != len(suffix) - 2:
            padding = 0
        return cls(data[:start], suffix, padding, channel, chunk.get("model"))

    def holds(self, data: bytes) -> bool:
        """Whether orjson reads a probe built on this template (`data`'s) as `data` with only
        the text, and the padding, changed."""
        suffix, padding = self.suffix, self.padding
        probe = (
            self.prefix
            + b"probe"
            + (suffix[:padding] + b"pad" + suffix[-2:] if padding else suffix)
        )
        expected = orjson.loads(data)
        expected["choices"][0]["delta"]["content"] = "probe"
        if padding:
            expected["obfuscation"] = "pad"
        try:
            return bool(orjson.loads(probe) == expected)
        except orjson.JSONDecodeError:
            return False

    def text(self, data: bytes) -> str | None:
        """The text of a chunk made on this template; None for any other chunk."""
        if not data.startswith(self.prefix):
            return None
        start = self.start
        end = data.find(b'"', start)
        if end < 0 or _ESCAPED.search(data, start, end) is not None:
            return None
        suffix = self.suffix
        if len(data) - end != len(suffix) or not data.endswith(suffix):
            padding = self.padding
            if not padding or not data.startswith(suffix[:padding], end):
                return None
            value = end + padding
            close = data.find(b'"', value)
            if (
                close != len(data) - 2
                or not data.endswith(suffix[-2:])
                or _NOT_PRINTABLE.search(data, value, close) is not None
            ):
                return None
        try:
            return data[start:end].decode()
        except UnicodeDecodeError:
            return None


# The keys of the usage-only chunk OpenAI sends last when include_usage is set.
_USAGE_CHUNK_KEYS = frozenset(
    {"id", "object", "created", "model", "system_fingerprint", "service_tier", "choices", "usage",
     "obfuscation", "provider"}
)  # fmt: skip


def openai_usage(usage: dict[str, Any]) -> Usage:
    prompt = as_dict(usage.get("prompt_tokens_details"))
    completion = as_dict(usage.get("completion_tokens_details"))
    cached = (
        as_int(prompt.get("cached_tokens"))
        or as_int(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
        or as_int(usage.get("cached_tokens"))
    )
    return Usage(
        input=as_int(usage.get("prompt_tokens")),
        output=as_int(usage.get("completion_tokens")),
        cached_input=cached,
        reasoning=as_int(completion.get("reasoning_tokens")),
    )


class OpenAICompletions(OpenAIChat):
    def event(self, data: bytes, name: str | None) -> bool:
        if data == b"[DONE]":
            return False
        chunk = as_dict(orjson.loads(data))
        self._legacy(chunk)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = openai_usage(usage)
            return chunk.get("choices") == [] and set(chunk) <= _USAGE_CHUNK_KEYS
        return False

    def body(self, data: bytes) -> None:
        response = as_dict(orjson.loads(data))
        self._legacy(response)
        if isinstance(response.get("usage"), dict):
            self.usage = openai_usage(response["usage"])

    def _legacy(self, chunk: dict[str, Any]) -> None:
        self._model(chunk.get("model"))
        if "error" in chunk:
            self.errors.append(error_message(chunk["error"]))
        for choice in as_list(chunk.get("choices")):
            choice = as_dict(choice)
            self._text(f"content:{as_int(choice.get('index'))}", choice.get("text"))
            self._finish(choice)


# Responses API events whose data we need; the others (`.done` events repeat the deltas,
# `content_part.added`, ...) are not parsed at all.
_RESPONSES_TEXT = {
    "response.output_text.delta": "content",
    "response.refusal.delta": "refusal",
    "response.reasoning_text.delta": "reasoning",
    "response.reasoning_summary_text.delta": "reasoning",
    "response.function_call_arguments.delta": "tool",
    "response.custom_tool_call_input.delta": "tool",
    "response.code_interpreter_call_code.delta": "tool",
    "response.mcp_call_arguments.delta": "tool",
}
_RESPONSES_FINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})
_RESPONSES_STATE = _RESPONSES_FINAL | {"response.created", "response.in_progress", "error"}


class OpenAIResponses(Extractor):
    def event(self, data: bytes, name: str | None) -> bool:
        if name is not None and name not in _RESPONSES_TEXT and name not in _RESPONSES_STATE:
            return False
        message = as_dict(orjson.loads(data))
        kind = message.get("type") or name
        if not isinstance(kind, str):
            return False
        channel = _RESPONSES_TEXT.get(kind)
        if channel is not None:
            self._text(f"{channel}:{as_int(message.get('output_index'))}", message.get("delta"))
        elif kind == "error":
            self.errors.append(error_message(message.get("error") or message))
        elif kind in _RESPONSES_STATE:
            self._response(as_dict(message.get("response")), final=kind in _RESPONSES_FINAL)
        return False

    def body(self, data: bytes) -> None:
        response = as_dict(orjson.loads(data))
        for index, item in enumerate(as_list(response.get("output"))):
            item = as_dict(item)
            kind = item.get("type")
            if kind == "message":
                for part in as_list(item.get("content")):
                    part = as_dict(part)
                    self._text(f"content:{index}", part.get("text"))
                    self._text(f"refusal:{index}", part.get("refusal"))
            elif kind == "reasoning":
                for part in (*(as_list(item.get("summary"))), *(as_list(item.get("content")))):
                    self._text(f"reasoning:{index}", as_dict(part).get("text"))
            elif kind in ("function_call", "custom_tool_call", "mcp_call"):
                self._text(f"tool:{index}", item.get("arguments") or item.get("input"))
        self._response(response, final=True)

    def _response(self, response: dict[str, Any], final: bool) -> None:
        self._model(response.get("model"))
        if response.get("error"):
            self.errors.append(error_message(response["error"]))
        usage = response.get("usage")
        if isinstance(usage, dict):
            details_in = as_dict(usage.get("input_tokens_details"))
            details_out = as_dict(usage.get("output_tokens_details"))
            self.usage = Usage(
                input=as_int(usage.get("input_tokens")),
                output=as_int(usage.get("output_tokens")),
                cached_input=as_int(details_in.get("cached_tokens")),
                reasoning=as_int(details_out.get("reasoning_tokens")),
            )
        if final and isinstance(response.get("status"), str):
            reason = as_dict(response.get("incomplete_details")).get("reason")
            self.finish_reason = reason if isinstance(reason, str) else response["status"]


# -- prompt estimates ---------------------------------------------------------------------------


def estimate_completions(e: PromptEstimator, request: dict[str, Any], model: str) -> int:
    return e.texts(strings(request.get("prompt")))


def estimate_chat(e: PromptEstimator, request: dict[str, Any], model: str) -> int:
    total = REPLY_PRIMING
    for message in as_list(request.get("messages")):
        if not isinstance(message, dict):
            continue
        total += PER_MESSAGE + e.count(message.get("role"))
        total += _content(e, message.get("content"), model)
        if message.get("name"):
            total += PER_NAME + e.count(message["name"])
        for call in as_list(message.get("tool_calls")):
            function = as_dict(as_dict(call).get("function"))
            total += e.count(function.get("name")) + e.count(function.get("arguments"))
        total += e.count(as_dict(message.get("function_call")).get("arguments"))
    tools = [as_dict(t).get("function") for t in as_list(request.get("tools"))]
    tools += list(as_list(request.get("functions")))
    total += _tools(e, [t for t in tools if isinstance(t, dict)])
    response_format = as_dict(request.get("response_format"))
    if response_format.get("type") == "json_schema":
        total += e.json(as_dict(response_format.get("json_schema")).get("schema"))
    return total


def _content(e: PromptEstimator, content: object, model: str) -> int:
    if isinstance(content, str):
        return e.count(content)
    total = 0
    for part in content if isinstance(content, list) else ():
        part = as_dict(part)
        kind = part.get("type")
        if kind in ("text", "input_text", "output_text"):
            total += e.count(part.get("text"))
        elif kind == "refusal":
            total += e.count(part.get("refusal"))
        elif kind in ("image_url", "input_image"):
            image = part.get("image_url")
            url = as_dict(image).get("url") if isinstance(image, dict) else image
            detail = as_dict(image).get("detail") or part.get("detail") or "auto"
            total += _image(e, url, str(detail), model)
    return total


def _image(e: PromptEstimator, url: object, detail: str, model: str) -> int:
    pricing = next((p for prefix, p in _TILE_MODELS if model.startswith(prefix)), _TILE_DEFAULT)
    if detail == "low":
        return pricing.base
    size = image_size_from_data_url(url) if isinstance(url, str) else None
    if size is None:
        return e.image_default
    return openai_image_tokens(*size, pricing)


def _tools(e: PromptEstimator, functions: list[dict[str, Any]]) -> int:
    if not functions:
        return 0
    total = _FUNCTION_END
    for function in functions:
        total += _FUNCTION_START
        description = str(function.get("description") or "").removesuffix(".")
        total += e.count(f"{function.get('name', '')}:{description}")
        properties = as_dict(as_dict(function.get("parameters")).get("properties"))
        if properties:
            total += _PROPERTIES_START
        for name, spec in properties.items():
            spec = as_dict(spec)
            total += _PROPERTY
            enum = spec.get("enum")
            if isinstance(enum, list):
                total += _ENUM_START + sum(_ENUM_ITEM + e.count(str(e)) for e in enum)
            described = str(spec.get("description") or "").removesuffix(".")
            total += e.count(f"{name}:{spec.get('type', '')}:{described}")
    return total


def estimate_responses(e: PromptEstimator, request: dict[str, Any], model: str) -> int:
    total = REPLY_PRIMING
    if request.get("instructions"):
        total += PER_MESSAGE + e.count("system") + e.count(request["instructions"])
    items = request.get("input")
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    for item in items if isinstance(items, list) else ():
        item = as_dict(item)
        kind = item.get("type", "message")
        total += PER_MESSAGE
        if kind == "message":
            total += e.count(item.get("role"))
            total += _content(e, item.get("content"), model)
        elif kind == "function_call":
            total += e.count(item.get("name")) + e.count(item.get("arguments"))
        elif kind == "function_call_output":
            output = item.get("output")
            total += e.count(output) if isinstance(output, str) else e.json(output)
    tools = [t for t in as_list(request.get("tools")) if isinstance(t, dict)]
    total += _tools(e, [t for t in tools if t.get("type") == "function"])
    total += sum(e.json(t) for t in tools if t.get("type") != "function")
    return total


def error_body(status: int, message: str, kind: str, code: str) -> bytes:
    """OpenAI's error shape, which every OpenAI-compatible SDK parses."""
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
