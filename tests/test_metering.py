"""The response meter on its own: relay first, meter after, with the same result as at once."""

from __future__ import annotations

import pytest

from tallygate.core.dialects import Usage, detect_dialect
from tallygate.core.meter import MeteringSettings, ResponseMeter
from tallygate.core.tokens import Tokenizers
from tallygate.runtime.encodings import load_tokenizers

from conftest import CASES, Case

USAGE_ONLY = (
    b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"gpt-4o",'
    b'"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}\n\n'
)


@pytest.fixture(scope="module")
def tokenizers() -> Tokenizers:
    return load_tokenizers()


def meter_for(case: Case, tokenizers: Tokenizers, strip: bool) -> ResponseMeter:
    return ResponseMeter(
        detect_dialect(case.path), case.content_type, tokenizers, MeteringSettings(),
        None, {}, strip_usage_chunk=strip,
    )  # fmt: skip


def body_of(case: Case, strip: bool) -> bytes:
    """The recorded body; for a chat stream being stripped, with the usage-only chunk OpenAI
    sends when tallygate asks for it."""
    chat = detect_dialect(case.path) == "openai_chat" and b"data: [DONE]" in case.body
    if strip and chat and b'"choices":[],' not in case.body:
        return case.body.replace(b"data: [DONE]", USAGE_ONLY + b"data: [DONE]")
    return case.body


@pytest.mark.parametrize("strip", [False, True], ids=["plain", "stripping"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id[:3])
def test_relaying_then_settling_meters_as_feeding_does(
    case: Case, tokenizers: Tokenizers, strip: bool
) -> None:
    body = body_of(case, strip)
    at_once = meter_for(case, tokenizers, strip)
    expected = b"".join(at_once.feed(body[i : i + 97]) for i in range(0, len(body), 97))
    expected += at_once.close()

    meter = meter_for(case, tokenizers, strip)
    relayed = b""
    for i in range(0, len(body), 97):
        relayed += meter.relay(body[i : i + 97])
        meter.settle()
    relayed += meter.close()

    assert relayed == expected
    assert meter.facts() == at_once.facts()
    if USAGE_ONLY in body:
        assert relayed.replace(b"data: [DONE]", USAGE_ONLY + b"data: [DONE]") == body
        assert meter.facts().usage == Usage(11, 7)
    elif not meter.strips:
        assert relayed == body


def test_what_is_relayed_is_metered_only_once_settled(tokenizers: Tokenizers) -> None:
    """A chunk whose sending failed (the client left) is not counted as delivered."""
    case = next(
        c for c in CASES if detect_dialect(c.path) == "openai_chat" and c.body.count(b"\n\n") > 10
    )
    meter = meter_for(case, tokenizers, strip=False)
    events = case.body.split(b"\n\n")
    half = b"\n\n".join(events[: len(events) // 2]) + b"\n\n"
    meter.feed(half)
    delivered = meter.output_estimate()
    assert meter.text_seen and delivered
    meter.relay(case.body[len(half) :])
    assert meter.output_estimate() == delivered  # relayed, not settled: not delivered
    meter.settle()
    assert (meter.output_estimate() or 0) > delivered


JSON_ANSWER = (
    b'{"id":"x","object":"chat.completion","model":"gpt-4o","choices":[{"index":0,'
    b'"message":{"role":"assistant","content":"Hello there, friend."},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":9,"completion_tokens":5,"total_tokens":14}}'
)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [("application/json", JSON_ANSWER), ("text/event-stream", CASES[0].body)],
    ids=["json", "stream"],
)
def test_closing_twice_meters_nothing_twice(
    tokenizers: Tokenizers, content_type: str, body: bytes
) -> None:
    """A second close adds nothing (a JSON answer is read at close): the relay's paths that
    end an exchange need not know whether another one closed the meter first."""
    meters = [
        ResponseMeter("openai_chat", content_type, tokenizers, MeteringSettings(), None, {})
        for _ in range(2)
    ]
    for meter in meters:
        meter.feed(body)
        meter.close()
    assert meters[1].close() == b""
    assert meters[1].facts() == meters[0].facts()
    assert meters[0].facts().estimated_output
