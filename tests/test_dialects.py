"""Dialect extraction on every recorded stream: model, usage and text equal what the stream says."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tallygate.dialects import Usage, detect_dialect, extractor_for
from tallygate.framing import NdjsonFramer, SseFramer

from conftest import CASES, Case, expected_usage

DIALECT_OF_ENDPOINT = {
    "chat.completions": "openai_chat",
    "completions": "openai_completions",
    "responses": "openai_responses",
    "messages": "anthropic_messages",
    "api/chat": "ollama_chat",
    "api/generate": "ollama_generate",
}


def extract(case: Case):
    texts: dict[str, list[str]] = defaultdict(list)
    extractor = extractor_for(detect_dialect(case.path))
    if case.content_type == "application/x-ndjson":
        framer = NdjsonFramer()
        usage_only = [
            extractor.event(line.data, None) for line in framer.feed(case.body) + framer.close()
        ]
    else:
        framer = SseFramer()
        usage_only = [
            extractor.event(e.data, e.event)
            for e in framer.feed(case.body) + framer.close()
            if e.data is not None
        ]
    for channel, pieces in extractor.take_texts().items():
        texts[channel] += pieces
    return extractor, {k: "".join(v) for k, v in texts.items()}, usage_only


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id[:3])
def test_corpus_extraction(case: Case) -> None:
    assert detect_dialect(case.path) == DIALECT_OF_ENDPOINT[case.meta["endpoint"]]
    extractor, texts, _ = extract(case)
    assert extractor.usage == expected_usage(case.meta)
    assert extractor.errors == []
    reported = case.meta["model"]["reported_in_stream"]
    assert extractor.model == reported
    content = "".join(v for k, v in sorted(texts.items()) if k.startswith("content:"))
    assert content == case.meta["assembled"]["output_text"]
    reasoning = sum(len(v) for k, v in texts.items() if k.startswith("reasoning:"))
    if "reasoning_chars" in case.meta["assembled"]:
        assert reasoning == case.meta["assembled"]["reasoning_chars"], (
            reasoning,
            case.meta["assembled"]["reasoning_chars"],
        )
    tools = "".join(v for k, v in sorted(texts.items()) if k.startswith("tool:"))
    for call in case.meta["assembled"]["tool_calls"]:
        assert call["arguments"] in tools


def test_usage_only_chunk_is_recognized() -> None:
    case = next(c for c in CASES if c.id.startswith("001"))
    _, _, usage_only = extract(case)
    assert usage_only[-2:] == [True, False]  # the usage chunk, then [DONE]
    assert sum(usage_only) == 1
    # Usage on a chunk that still has choices (OpenRouter, Groq...) is never "usage only".
    for case in CASES:
        if case.id[:3] in ("018", "022", "024", "025"):
            assert not any(extract(case)[2]), case.id


def test_detect_dialect() -> None:
    assert detect_dialect("/v1/chat/completions") == "openai_chat"
    assert detect_dialect("/openai/deployments/gpt4/chat/completions") == "openai_chat"
    assert detect_dialect("/api/v1/chat/completions") == "openai_chat"
    assert detect_dialect("/v1/completions") == "openai_completions"
    assert detect_dialect("/v1/responses") == "openai_responses"
    assert detect_dialect("/v1/messages") == "anthropic_messages"
    assert detect_dialect("/v1/messages/count_tokens") == "none"
    assert detect_dialect("/api/chat") == "ollama_chat"
    assert detect_dialect("/api/generate") == "ollama_generate"
    assert detect_dialect("/v1/models") == "none"


def test_non_streaming_bodies() -> None:
    chat = extractor_for("openai_chat")
    chat.body(
        b'{"model":"gpt-4o","choices":[{"index":0,"message":{"content":"Hi","tool_calls":[{"index":0,"function":{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":3,"prompt_tokens_details":{"cached_tokens":2}}}'
    )
    assert chat.usage == Usage(5, 3, 2) and chat.finish_reason == "stop" and chat.model == "gpt-4o"
    assert chat.take_texts() == {"content:0": ["Hi"], "tool:0:0": ["f", "{}"]}
    assert chat.texts == {}
    anthropic = extractor_for("anthropic_messages")
    anthropic.body(
        b'{"type":"message","model":"claude-3-haiku","content":[{"type":"text","text":"x"}],"stop_reason":"end_turn","usage":{"input_tokens":10,"output_tokens":4,"cache_read_input_tokens":100}}'
    )
    assert anthropic.usage == Usage(110, 4, 100, 0)
    responses = extractor_for("openai_responses")
    responses.body(
        b'{"model":"gpt-4.1","status":"completed","output":[{"type":"message","content":[{"type":"output_text","text":"ok"}]}],"usage":{"input_tokens":9,"output_tokens":2,"output_tokens_details":{"reasoning_tokens":1}}}'
    )
    assert responses.usage == Usage(9, 2, 0, 0, 1) and responses.finish_reason == "completed"
    ollama = extractor_for("ollama_generate")
    ollama.body(
        b'{"model":"llama3","response":"hi","done":true,"done_reason":"stop","prompt_eval_count":7,"eval_count":2}'
    )
    assert ollama.usage == Usage(7, 2)


def test_in_stream_errors_are_reported() -> None:
    chat = extractor_for("openai_chat")
    chat.event(b'{"error":{"message":"The server had an error","type":"server_error"}}', None)
    anthropic = extractor_for("anthropic_messages")
    anthropic.event(
        b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}', "error"
    )
    assert chat.errors == ["The server had an error"]
    assert anthropic.errors == ["Overloaded"]
