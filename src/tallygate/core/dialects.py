"""What each API dialect's responses say: model, output text, reported usage, finish reason, errors.

One extractor per dialect, fed one event's data at a time (or a whole JSON body). Output text is
collected by channel (`content:0`, `reasoning:0`, `tool:0:1`, ...) for the caller to take and
count as it passes: once per read rather than once per event, since a read often holds many.
Pure: no I/O; a malformed event raises, and the caller decides.

Usage is normalized (the OpenTelemetry GenAI convention): `input` counts every input token,
cached and cache-written ones included; `output` counts every output token, reasoning included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson

Dialect = Literal[
    "openai_chat",
    "openai_completions",
    "openai_responses",
    "anthropic_messages",
    "ollama_chat",
    "ollama_generate",
    "none",
]
DIALECTS: tuple[Dialect, ...] = get_args(Dialect)

# Path endings, most specific first; endings rather than whole paths so that base paths
# (`/openai/deployments/x/chat/completions`, `/api/v1/chat/completions`) are recognized too.
_PATH_DIALECTS: tuple[tuple[str, Dialect], ...] = (
    ("/chat/completions", "openai_chat"),
    ("/completions", "openai_completions"),
    ("/responses", "openai_responses"),
    ("/messages", "anthropic_messages"),
    ("/api/chat", "ollama_chat"),
    ("/api/generate", "ollama_generate"),
)


def detect_dialect(path: str) -> Dialect:
    path = path.rstrip("/")
    for ending, dialect in _PATH_DIALECTS:
        if path.endswith(ending):
            return dialect
    return "none"


@dataclass(frozen=True, slots=True)
class Usage:
    input: int = 0
    output: int = 0
    cached_input: int = 0
    cache_write_input: int = 0
    reasoning: int = 0


# What a provider sends is not ours to trust: a field of the wrong type reads as absent (the
# fuzz tests in tests/test_fuzz.py feed every extractor JSON of any shape).
def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def _error_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)[:500]
    return str(error)[:500]


class Extractor:
    """The common state; subclasses read their dialect's events."""

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {}  # output text not yet taken, by channel
        self.model: str | None = None
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self.errors: list[str] = []

    def event(self, data: bytes, name: str | None) -> bool:
        """One stream event's data. Returns True when the event carries usage and nothing else
        (the chunk tallygate asked for with `stream_options.include_usage`)."""
        return False

    def body(self, data: bytes) -> None:
        """A whole non-streaming JSON response."""

    def _model(self, value: object) -> None:
        if isinstance(value, str) and value:
            self.model = value

    def take_texts(self) -> dict[str, list[str]]:
        """The output text seen since the last call, by channel, in order."""
        texts, self.texts = self.texts, {}
        return texts

    def _text(self, channel: str, value: object) -> None:
        if value and type(value) is str:
            pieces = self.texts.get(channel)
            if pieces is None:
                self.texts[channel] = [value]
            else:
                pieces.append(value)


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
                    # _int() and _text() written out: two calls an event were 2% of metering's
                    # instructions (bench/instructions.py).
                    index = choice.get("index", 0)
                    if type(index) is not int or index < 0:
                        index = 0
                    text = delta.get("content")
                    if len(delta) == 1 and text and type(text) is str:  # most events: text
                        channel = _CONTENT[index] if index < 8 else f"content:{index}"
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
            self.errors.append(_error_message(chunk["error"]))
        usage = chunk.get("usage")
        if usage is None and "x_groq" in chunk:  # Groq puts it under x_groq
            usage = _dict(chunk["x_groq"]).get("usage")
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
        response = _dict(orjson.loads(data))
        self._model(response.get("model"))
        if "error" in response:
            self.errors.append(_error_message(response["error"]))
        for choice in _list(response.get("choices")):
            choice = _dict(choice)
            self._message(_dict(choice.get("message")), _int(choice.get("index")))
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
                self._text(_CONTENT[index] if index < 8 else f"content:{index}", value)
            elif key in ("reasoning_content", "reasoning"):  # DeepSeek; OpenRouter and others
                self._text(f"reasoning:{index}", value)
            elif key == "refusal":
                self._text(f"refusal:{index}", value)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    call = _dict(call)
                    function = _dict(call.get("function"))
                    channel = f"tool:{index}:{_int(call.get('index'))}"
                    self._text(channel, function.get("name"))
                    self._text(channel, function.get("arguments"))
            elif key == "function_call":  # the legacy functions API
                function_call = _dict(value)
                self._text(f"tool:{index}:f", function_call.get("name"))
                self._text(f"tool:{index}:f", function_call.get("arguments"))

    def _finish(self, choice: dict[str, Any]) -> None:
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self.finish_reason = reason


_CONTENT = [f"content:{i}" for i in range(8)]

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
    prompt = _dict(usage.get("prompt_tokens_details"))
    completion = _dict(usage.get("completion_tokens_details"))
    cached = (
        _int(prompt.get("cached_tokens"))
        or _int(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
        or _int(usage.get("cached_tokens"))
    )
    return Usage(
        input=_int(usage.get("prompt_tokens")),
        output=_int(usage.get("completion_tokens")),
        cached_input=cached,
        reasoning=_int(completion.get("reasoning_tokens")),
    )


class OpenAICompletions(OpenAIChat):
    def event(self, data: bytes, name: str | None) -> bool:
        if data == b"[DONE]":
            return False
        chunk = _dict(orjson.loads(data))
        self._legacy(chunk)
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = openai_usage(usage)
            return chunk.get("choices") == [] and set(chunk) <= _USAGE_CHUNK_KEYS
        return False

    def body(self, data: bytes) -> None:
        response = _dict(orjson.loads(data))
        self._legacy(response)
        if isinstance(response.get("usage"), dict):
            self.usage = openai_usage(response["usage"])

    def _legacy(self, chunk: dict[str, Any]) -> None:
        self._model(chunk.get("model"))
        if "error" in chunk:
            self.errors.append(_error_message(chunk["error"]))
        for choice in _list(chunk.get("choices")):
            choice = _dict(choice)
            self._text(f"content:{_int(choice.get('index'))}", choice.get("text"))
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
        message = _dict(orjson.loads(data))
        kind = message.get("type") or name
        if not isinstance(kind, str):
            return False
        channel = _RESPONSES_TEXT.get(kind)
        if channel is not None:
            self._text(f"{channel}:{_int(message.get('output_index'))}", message.get("delta"))
        elif kind == "error":
            self.errors.append(_error_message(message.get("error") or message))
        elif kind in _RESPONSES_STATE:
            self._response(_dict(message.get("response")), final=kind in _RESPONSES_FINAL)
        return False

    def body(self, data: bytes) -> None:
        response = _dict(orjson.loads(data))
        for index, item in enumerate(_list(response.get("output"))):
            item = _dict(item)
            kind = item.get("type")
            if kind == "message":
                for part in _list(item.get("content")):
                    part = _dict(part)
                    self._text(f"content:{index}", part.get("text"))
                    self._text(f"refusal:{index}", part.get("refusal"))
            elif kind == "reasoning":
                for part in (*(_list(item.get("summary"))), *(_list(item.get("content")))):
                    self._text(f"reasoning:{index}", _dict(part).get("text"))
            elif kind in ("function_call", "custom_tool_call", "mcp_call"):
                self._text(f"tool:{index}", item.get("arguments") or item.get("input"))
        self._response(response, final=True)

    def _response(self, response: dict[str, Any], final: bool) -> None:
        self._model(response.get("model"))
        if response.get("error"):
            self.errors.append(_error_message(response["error"]))
        usage = response.get("usage")
        if isinstance(usage, dict):
            details_in = _dict(usage.get("input_tokens_details"))
            details_out = _dict(usage.get("output_tokens_details"))
            self.usage = Usage(
                input=_int(usage.get("input_tokens")),
                output=_int(usage.get("output_tokens")),
                cached_input=_int(details_in.get("cached_tokens")),
                reasoning=_int(details_out.get("reasoning_tokens")),
            )
        if final and isinstance(response.get("status"), str):
            reason = _dict(response.get("incomplete_details")).get("reason")
            self.finish_reason = reason if isinstance(reason, str) else response["status"]


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
        message = _dict(orjson.loads(data))
        kind = message.get("type")
        if kind == "content_block_delta":
            delta = _dict(message.get("delta"))
            index = _int(message.get("index"))
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                self._text(_CONTENT[index] if index < 8 else f"content:{index}", delta.get("text"))
            elif delta_type == "thinking_delta":
                self._text(f"reasoning:{index}", delta.get("thinking"))
            elif delta_type == "input_json_delta":
                self._text(f"tool:{index}", delta.get("partial_json"))
        elif kind == "content_block_start":
            block = _dict(message.get("content_block"))
            index = _int(message.get("index"))
            if block.get("type") == "text":
                self._text(f"content:{index}", block.get("text"))
            elif block.get("type") in ("tool_use", "server_tool_use"):
                self._text(f"tool:{index}", block.get("name"))
        elif kind == "message_start":
            start = _dict(message.get("message"))
            self._model(start.get("model"))
            self._usage(_dict(start.get("usage")))
        elif kind == "message_delta":
            reason = _dict(message.get("delta")).get("stop_reason")
            if isinstance(reason, str):
                self.finish_reason = reason
            self._usage(_dict(message.get("usage")))
        elif kind == "error":
            self.errors.append(_error_message(message.get("error")))
        return False

    def body(self, data: bytes) -> None:
        message = _dict(orjson.loads(data))
        if message.get("type") == "error":
            self.errors.append(_error_message(message.get("error")))
        self._model(message.get("model"))
        for index, block in enumerate(_list(message.get("content"))):
            block = _dict(block)
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
        self._usage(_dict(message.get("usage")))

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


class Ollama(Extractor):
    """/api/chat and /api/generate: one JSON object per line, the last with `done: true`."""

    def event(self, data: bytes, name: str | None) -> bool:
        if data and not data.isspace():  # a blank line: nothing to read (and no copy made)
            self._object(_dict(orjson.loads(data)))
        return False

    def body(self, data: bytes) -> None:
        self._object(_dict(orjson.loads(data)))

    def _object(self, message: dict[str, Any]) -> None:
        # Once per line of every stream: the helpers are called only for fields that are there
        # (a line carries one or two of them), which halves the calls a line costs.
        if "error" in message:
            self.errors.append(_error_message(message["error"]))
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
        for i, call in enumerate(_list(chat.get("tool_calls"))):
            function = _dict(_dict(call).get("function"))
            self._text(f"tool:{i}", function.get("name"))
            self._text(f"tool:{i}", orjson.dumps(function.get("arguments")).decode())
        if message.get("done") is True:
            if isinstance(message.get("done_reason"), str):
                self.finish_reason = message["done_reason"]
            if "prompt_eval_count" in message or "eval_count" in message:
                self.usage = Usage(
                    input=_int(message.get("prompt_eval_count")),
                    output=_int(message.get("eval_count")),
                )


def extractor_for(dialect: Dialect) -> Extractor:
    kinds: dict[Dialect, type[Extractor]] = {
        "openai_chat": OpenAIChat,
        "openai_completions": OpenAICompletions,
        "openai_responses": OpenAIResponses,
        "anthropic_messages": AnthropicMessages,
        "ollama_chat": Ollama,
        "ollama_generate": Ollama,
    }
    return kinds.get(dialect, Extractor)()
