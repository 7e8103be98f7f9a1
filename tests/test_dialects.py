"""Dialect extraction on every recorded stream: model, usage and text equal what the stream says."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tallygate.core.dialects import Extractor, OpenAIChat, Usage, detect_dialect, extractor_for
from tallygate.core.framing import NdjsonFramer, SseFramer

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


# -- the text-only chunk template (ContentTemplate) ----------------------------------------------

OPENAI_CHAT_CASES = [c for c in CASES if detect_dialect(c.path) == "openai_chat"]


def state(extractor: Extractor) -> tuple:
    return (extractor.take_texts(), extractor.model, extractor.usage, extractor.finish_reason,
            extractor.errors)  # fmt: skip


def feed_all(extractor: Extractor, datas: list[bytes]) -> list[object]:
    """What each event() call gave: its value, or the exception it raised."""
    results: list[object] = []
    for data in datas:
        try:
            results.append(extractor.event(data, None))
        except Exception as error:
            results.append(type(error).__name__)
    return results


def unlearned() -> OpenAIChat:
    extractor = OpenAIChat()
    extractor._lessons = 0  # never takes a template: every chunk is parsed
    return extractor


@pytest.mark.parametrize("case", OPENAI_CHAT_CASES, ids=lambda c: c.id[:3])
def test_template_reads_every_recorded_stream_as_parsing_does(case: Case) -> None:
    framer = SseFramer()
    datas = [e.data for e in framer.feed(case.body) + framer.close() if e.data]
    learning, parsing = OpenAIChat(), unlearned()
    assert feed_all(learning, datas) == feed_all(parsing, datas)
    assert state(learning) == state(parsing)


def test_template_serves_the_recorded_openai_streams() -> None:
    # Not a correctness check (the test above is): that the fast path is taken at all.
    served = 0
    for case in OPENAI_CHAT_CASES:
        framer = SseFramer()
        extractor = OpenAIChat()
        for event in framer.feed(case.body):
            if event.data and extractor._template is not None:
                served += extractor._template.text(event.data) is not None
            extractor.event(event.data or b"", None) if event.data else None
    assert served > 100


TEMPLATES = [
    # The benchmark's chunk, OpenAI's with its padding, and other providers' shapes.
    b'{"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":'
    b'[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],'
    b'"usage":null,"obfuscation":"NA5VZ"}',
    b'{"id":"c2","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
    b'"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}]}',
    b'{"choices":[{"content_filter_results":{},"delta":{"content":"Hi"},"finish_reason":null,'
    b'"index":1,"logprobs":null}],"created":1,"id":"c3","model":"gpt-35-turbo"}',
    b'{"id":"c4","model":"x","choices":[{"index":0,"delta":{"content":"Hi"}}],'
    b'"obfuscation":"a","x":{"obfuscation":"b"}}',
]
# Raw bytes spliced in where the text goes, and where the padding goes: plain text, escapes,
# quotes, backslashes, control characters, invalid UTF-8, and the template's own bytes.
RAW = st.one_of(
    st.text().map(str.encode),
    st.binary(max_size=12),
    st.lists(st.sampled_from([b"a", b"\\", b'"', b"\\n", b"\\u0041", b"\n", b"\x00", b"\xff",
                              b"\xc3\xa9", b"}", b",", b'","x":"', b'"},"usage":{"x":1},"a":{"b":"',
                              b"obfuscation", b"\\\\", b" "]), max_size=8).map(b"".join),
)  # fmt: skip


@given(st.sampled_from(TEMPLATES), st.lists(st.tuples(RAW, RAW), max_size=6))
@example(TEMPLATES[0], [(b"ok", b"\x00")])  # a control character in the padding: not JSON
@example(TEMPLATES[0], [(b"a\\nb", b"x"), (b"\xc3", b"x"), (b"a\tb", b"x")])
def test_template_reads_any_chunk_as_parsing_does(
    template: bytes, pieces: list[tuple[bytes, bytes]]
) -> None:
    # Chunks made from the template by splicing any bytes into the text and the padding: the
    # template's reading (or its refusal, then a parse) must equal the parse, error for error.
    head, _, rest = template.partition(b'"content":"Hi"')
    datas = [template]
    for text, pad in pieces:
        chunk = head + b'"content":"' + text + b'"' + rest
        if b'"obfuscation":"' in chunk:
            before, _, after = chunk.rpartition(b'"obfuscation":"')
            chunk = before + b'"obfuscation":"' + pad + after[after.index(b'"') :]
        datas.append(chunk)
    learning, parsing = OpenAIChat(), unlearned()
    assert feed_all(learning, datas) == feed_all(parsing, datas)
    assert state(learning) == state(parsing)


def test_template_is_not_taken_from_a_misleading_chunk() -> None:
    # The text also stands under another key, and the delta's key is written in escapes: the
    # only plain `"content":"` is not the delta's, and the probe parse tells.
    tricky = (b'{"a\\"content":"Hi","model":"m","choices":[{"index":0,'
              b'"delta":{"\\u0063ontent":"Hi"},"finish_reason":null}]}')  # fmt: skip
    extractor = OpenAIChat()
    extractor.event(tricky, None)
    assert extractor._template is None
    assert extractor.take_texts() == {"content:0": ["Hi"]}


def test_a_stream_whose_chunks_never_match_stops_learning() -> None:
    extractor = OpenAIChat()
    for n in range(20):  # a timestamp per chunk: no template ever serves
        chunk = b'{"created":%d,"choices":[{"index":0,"delta":{"content":"x"}}]}' % n
        extractor.event(chunk, None)
    assert extractor._lessons == 0
    assert extractor.take_texts() == {"content:0": ["x"] * 20}
