"""What every API dialect shares: normalized usage, the extractor's common state, and the
lenient readers that make a provider's (or a client's) JSON of any shape safe to read.

Usage is normalized (the OpenTelemetry GenAI convention): `input` counts every input token,
cached and cache-written ones included; `output` counts every output token, reasoning included.
Pure: no I/O; a malformed event raises, and the caller decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Usage:
    input: int = 0
    output: int = 0
    cached_input: int = 0
    cache_write_input: int = 0
    reasoning: int = 0


# What a provider sends is not ours to trust: a field of the wrong type reads as absent (the
# fuzz tests in tests/test_fuzz.py feed every extractor JSON of any shape).
def as_int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def as_dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def error_message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error.get("type") or error)[:500]
    return str(error)[:500]


def strings(value: object) -> list[object]:
    """A field that is a string or a list of strings, as a list (of the strings only)."""
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str)]
    return [value]


# Output text channels: `content:N` for choice (or block) N; the first few are made once.
CONTENT = [f"content:{i}" for i in range(8)]


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
