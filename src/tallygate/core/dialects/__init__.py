"""The API dialects tallygate meters, one module each, and the one registry that names them.

A dialect module knows three things of its API: what its answers say (an `Extractor`: model,
output text, usage, finish reason, errors), what a request will cost in input tokens (a prompt
estimate), and the shape of its errors. Everything else in tallygate asks the registry (`spec`)
rather than naming dialects itself. To add one: write its module, add its `DialectSpec` here and
its name to `Dialect`, and a recorded stream to tests/corpus.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from tallygate.core.dialects import anthropic, ollama, openai
from tallygate.core.dialects.anthropic import AnthropicMessages
from tallygate.core.dialects.base import Extractor, Usage
from tallygate.core.dialects.ollama import Ollama
from tallygate.core.dialects.openai import OpenAIChat, OpenAICompletions, OpenAIResponses

if TYPE_CHECKING:
    from tallygate.core.prompt import PromptEstimator

__all__ = [
    "DIALECTS", "REGISTRY", "ApiFamily", "Dialect", "DialectSpec", "Extractor", "OpenAIChat",
    "Usage", "detect_dialect", "extractor_for", "family_for", "spec",
]  # fmt: skip

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
# Whose error shape a client gets: its SDK parses errors in its API's own shape.
ApiFamily = Literal["openai", "anthropic", "ollama"]
Estimate = Callable[["PromptEstimator", dict[str, Any], str], int]
ErrorBody = Callable[[int, str, str, str], bytes]  # status, message, type, code


@dataclass(frozen=True, slots=True)
class DialectSpec:
    name: Dialect
    family: ApiFamily
    extractor: type[Extractor]
    estimate: Estimate | None  # None: no formula, nothing estimated
    error_body: ErrorBody
    # Accepts `stream_options.include_usage`, which tallygate may add to get usage reported.
    usage_option: bool = False
    streams_unless_told: bool = False  # Ollama streams unless `stream: false`; others if asked


REGISTRY: dict[Dialect, DialectSpec] = {
    spec.name: spec
    for spec in (
        DialectSpec("openai_chat", "openai", OpenAIChat, openai.estimate_chat,
                    openai.error_body, usage_option=True),
        DialectSpec("openai_completions", "openai", OpenAICompletions,
                    openai.estimate_completions, openai.error_body, usage_option=True),
        DialectSpec("openai_responses", "openai", OpenAIResponses, openai.estimate_responses,
                    openai.error_body),
        DialectSpec("anthropic_messages", "anthropic", AnthropicMessages, anthropic.estimate,
                    anthropic.error_body),
        DialectSpec("ollama_chat", "ollama", Ollama, ollama.estimate_chat, ollama.error_body,
                    streams_unless_told=True),
        DialectSpec("ollama_generate", "ollama", Ollama, ollama.estimate_generate,
                    ollama.error_body, streams_unless_told=True),
        DialectSpec("none", "openai", Extractor, None, openai.error_body),
    )
}  # fmt: skip
ERROR_BODIES: dict[ApiFamily, ErrorBody] = {
    "openai": openai.error_body, "anthropic": anthropic.error_body, "ollama": ollama.error_body,
}  # fmt: skip


def spec(dialect: Dialect) -> DialectSpec:
    return REGISTRY.get(dialect, REGISTRY["none"])


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


def family_for(dialect: Dialect, path: str) -> ApiFamily:
    """The error shape for a request in `dialect` (its route's, or the one its path names).
    A path no dialect meters is judged by its API's prefix: Anthropic's `/v1/messages/...`
    (count_tokens, batches), Ollama's `/api/...` (tags, pull)."""
    if dialect != "none":
        return spec(dialect).family
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    return "openai"


def extractor_for(dialect: Dialect) -> Extractor:
    return spec(dialect).extractor()
