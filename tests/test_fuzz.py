"""Fuzzing (hypothesis): the framers, every dialect extractor, the prompt counter, the response
meter and the config loader take anything and never let an exception out, and the framers
never hold more than their bound."""

from __future__ import annotations

import functools
import os
from typing import Any, get_args

import orjson
import pytest
import tiktoken
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tallygate.config import ConfigError, load_config_text
from tallygate.core.dialects import Dialect, extractor_for
from tallygate.core.framing import EventTooLarge, NdjsonFramer, SseFramer
from tallygate.core.meter import MeteringSettings, ResponseMeter
from tallygate.core.prompt import PromptEstimator
from tallygate.core.tokens import Tokenizers
from tallygate.runtime.encodings import load_tokenizers

from conftest import CASES

DIALECTS = [d for d in get_args(Dialect) if d != "none"]
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
BOUND = 512

# Bytes that look like streams: SSE field names, line ends of every kind, JSON punctuation, and
# slices of the recorded corpus, mixed with noise.
_PIECES = [b"data: ", b"event: ", b"id: ", b"retry: ", b": ", b"\n", b"\r\n", b"\r", b"\n\n",
           b"{", b"}", b'"', b"[DONE]", b"\xff", b"\xc3", b"\x00"]  # fmt: skip
_CORPUS = [c.body for c in CASES]
stream_bytes = st.lists(
    st.one_of(
        st.sampled_from(_PIECES),
        st.binary(max_size=64),
        st.builds(
            lambda body, a, n: body[a : a + n],
            st.sampled_from(_CORPUS),
            st.integers(0, 5000),
            st.integers(0, 2000),
        ),
    ),
    max_size=40,
).map(b"".join)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(
                [
                    "model",
                    "messages",
                    "content",
                    "type",
                    "text",
                    "role",
                    "usage",
                    "choices",
                    "delta",
                    "input",
                    "output",
                    "tools",
                    "image_url",
                    "url",
                    "prompt_tokens",
                    "completion_tokens",
                    "input_tokens",
                    "output_tokens",
                    "message",
                    "response",
                    "index",
                    "finish_reason",
                    "system",
                    "x",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=30,
)


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.mark.parametrize("framer_class", [SseFramer, NdjsonFramer])
@FUZZ
@given(stream_bytes, st.lists(st.integers(0, 10_000), max_size=8))
def test_framers_lose_nothing_and_stay_bounded(
    framer_class: type[SseFramer] | type[NdjsonFramer], data: bytes, cuts: list[int]
) -> None:
    framer = framer_class(max_event_bytes=BOUND)
    out = b""
    try:
        for piece in splits(data, cuts):
            out += b"".join(event.raw for event in framer.feed(piece))
            assert len(framer.pending) <= BOUND
        out += b"".join(event.raw for event in framer.close())
    except EventTooLarge as error:
        # Metering gives up; the complete events of that read are handed back, in order.
        out += b"".join(event.raw for event in error.events)
        assert data.startswith(out)
        return
    assert out == data


@FUZZ
@given(st.sampled_from(DIALECTS), json_values, st.sampled_from([None, "message_start",
       "message_delta", "content_block_delta", "response.completed", "error"]))  # fmt: skip
def test_every_extractor_takes_any_json(dialect: Dialect, value: Any, name: str | None) -> None:
    extractor = extractor_for(dialect)
    data = (
        orjson.dumps(value, option=orjson.OPT_PASSTHROUGH_SUBCLASS) if _encodable(value) else b"{"
    )
    extractor.event(data, name)
    extractor.body(data)
    texts = extractor.take_texts()
    assert all(isinstance(t, str) and t for pieces in texts.values() for t in pieces)


@FUZZ
@given(st.sampled_from(DIALECTS), stream_bytes)
def test_every_extractor_takes_any_bytes(dialect: Dialect, data: bytes) -> None:
    extractor = extractor_for(dialect)
    try:
        extractor.event(data, None)
        extractor.body(data)
    except (orjson.JSONDecodeError, UnicodeDecodeError):
        pass  # not JSON: the meter counts it as a dialect error


@functools.cache
def _estimator() -> PromptEstimator:
    return PromptEstimator(tiktoken.get_encoding("o200k_base"), 765)


@FUZZ
@given(st.sampled_from(DIALECTS), json_values)
def test_the_prompt_counter_takes_any_request(dialect: Dialect, request: Any) -> None:
    estimate = _estimator().estimate(dialect, request, "gpt-4o")
    assert estimate is None or estimate >= 0


@functools.cache
def _tokenizers() -> Tokenizers:
    return load_tokenizers("o200k_base", ())


@FUZZ
@given(st.sampled_from(DIALECTS), st.sampled_from(["text/event-stream", "application/x-ndjson",
       "application/json", None]), stream_bytes, st.lists(st.integers(0, 10_000), max_size=8),
       st.booleans())  # fmt: skip
def test_the_meter_never_raises_and_relays_every_byte(
    dialect: Dialect, content_type: str | None, data: bytes, cuts: list[int], strip: bool
) -> None:
    errors: dict[str, int] = {}
    meter = ResponseMeter(
        dialect, content_type, _tokenizers(),
        MeteringSettings(estimate=True, request_usage=True, max_event_bytes=BOUND,
                         image_tokens_default=765),
        "gpt-4o", errors, strip_usage_chunk=strip,
    )  # fmt: skip
    relayed = b""
    for piece in splits(data, cuts):
        out = meter.feed(piece)
        relayed += out if out is not None else (b"" if meter.strips else piece)
    relayed += meter.close()
    facts = meter.facts()
    if not meter.strips:
        assert relayed == data
    assert facts.estimated_output is None or facts.estimated_output >= 0


_CONFIG_KEYS = ["listen", "admin", "upstreams", "routes", "limits", "compression", "metering",
                "pricing", "tenants", "workers", "url", "api_key", "timeouts", "path_prefix",
                "upstream", "main", "tls", "address", "max_connections", "header_timeout",
                "egress", "tiers", "models", "keys", "shutdown_grace", "access_log"]  # fmt: skip
config_documents = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 100_000) | st.floats(allow_nan=False)
    | st.sampled_from(["", "10s", "1MiB", "http://127.0.0.1:1", "${X}", "${X:-3}", "auto",
                       "127.0.0.1:0", "/", "main", "-1", "0"])
    | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(_CONFIG_KEYS) | st.text(max_size=5), inner, max_size=6),
    max_leaves=25,
)  # fmt: skip


@FUZZ
@given(config_documents)
def test_the_config_loader_answers_anything_with_a_config_or_a_config_error(doc: Any) -> None:
    try:
        text = yaml.safe_dump(doc)
    except yaml.YAMLError:
        return
    try:
        load_config_text(text, env={"X": "2"})
    except ConfigError as error:
        assert error.problems and all(isinstance(p, str) and p for p in error.problems)


@pytest.mark.parametrize("text", ["{", "a: [", "\t- x", "!!python/object:os.system x", "\x00"])
def test_the_config_loader_answers_broken_yaml(text: str) -> None:
    with pytest.raises(ConfigError):
        load_config_text(text, env={})


def _encodable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError):
        return False
    return True
