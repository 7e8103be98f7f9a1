"""Prompt estimates: the published formulas, image headers, tools."""

from __future__ import annotations

import base64
import struct
import zlib

import pytest
import tiktoken

from tallygate.core.dialects.anthropic import anthropic_image_tokens
from tallygate.core.dialects.openai import openai_image_tokens
from tallygate.core.images import image_size, image_size_from_data_url
from tallygate.core.prompt import PromptEstimator

O200K = tiktoken.get_encoding("o200k_base")


def png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", 13)
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )


def jpeg(width: int, height: int) -> bytes:
    app0 = (
        b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + b"\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    )
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + sof


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png(1024, 768), (1024, 768)),
        (jpeg(4032, 3024), (4032, 3024)),
        (b"GIF89a" + struct.pack("<HH", 320, 200), (320, 200)),
        (
            b"RIFF\x00\x00\x00\x00WEBPVP8X"
            + b"\x00" * 8
            + (99).to_bytes(3, "little")
            + (49).to_bytes(3, "little"),
            (100, 50),
        ),
        (b"not an image", None),
        (b"\x89PNG\r\n\x1a\n", None),
        (png(0, 0), None),  # a 0x0 image: none to bill (it divided by zero)
        (png(0, 10), None),
        (b"GIF89a" + struct.pack("<HH", 0, 200), None),
    ],
)
def test_image_headers(data: bytes, size: tuple[int, int] | None) -> None:
    assert image_size(data) == size


def test_openai_tile_formula() -> None:
    # OpenAI's worked examples: 1024x1024 high = 765; 2048x4096 -> 768x1536 = 6 tiles = 1105.
    assert openai_image_tokens(1024, 1024) == 765
    assert openai_image_tokens(2048, 4096) == 1105
    assert openai_image_tokens(100, 100) == 85 + 170
    assert anthropic_image_tokens(1000, 1000) == 1334
    assert anthropic_image_tokens(3000, 3000) == anthropic_image_tokens(1568, 1568)


def test_openai_chat_estimate_with_image_and_tools() -> None:
    estimator = PromptEstimator(O200K, image_tokens_default=765)
    url = "data:image/png;base64," + base64.b64encode(png(2048, 4096)).decode()
    request = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "name": "ann", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": url}},
                {"type": "image_url", "image_url": {"url": "https://example.com/x.png", "detail": "low"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/y.png"}},
            ]},
        ],
    }  # fmt: skip
    # Priming, two messages, the name (1 + its tokens), a 6-tile image, a low-detail image, and
    # an image by URL at the default.
    expected = 3 + _chat(["system", "Be brief."]) + _chat(["user", "What is this?"]) + 1 + _n("ann")
    assert estimator.estimate("openai_chat", request, "gpt-4o") == expected + 1105 + 85 + 765
    tools = {"messages": [], "tools": [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "The city"},
            "unit": {"type": "string", "enum": ["c", "f"]}}}}}]}  # fmt: skip
    expected_tools = (
        3
        + 12
        + 7
        + _n("get_weather:Weather in a city")
        + 3
        + 3
        + _n("city:string:The city")
        + 3
        + (-3)
        + 3
        + _n("c")
        + 3
        + _n("f")
        + _n("unit:string:")
    )
    assert estimator.estimate("openai_chat", tools, "gpt-4o") == expected_tools
    assert image_size_from_data_url("https://x/y.png") is None


def _n(text: str) -> int:
    return len(O200K.encode_ordinary(text))


def _chat(parts: list[str]) -> int:
    return 3 + sum(_n(p) for p in parts)


def test_other_dialects() -> None:
    estimator = PromptEstimator(O200K, image_tokens_default=100)
    anthropic = {"system": "S", "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there"}]}],
                 "tools": [{"name": "t", "description": "d", "input_schema": {"type": "object"}}]}  # fmt: skip
    assert estimator.estimate("anthropic_messages", anthropic) == _n("S") + 3 + _n("Hi there") + _n(
        "t"
    ) + _n("d") + _n('{"type":"object"}')
    assert estimator.estimate("ollama_generate", {"prompt": "Why?", "system": "Be kind"}) == _n(
        "Why?"
    ) + _n("Be kind")
    assert (
        estimator.estimate(
            "ollama_chat", {"messages": [{"role": "user", "content": "a", "images": ["..."]}]}
        )
        == 3 + _n("a") + 100
    )
    responses = {"instructions": "I", "input": "Hello"}
    assert estimator.estimate("openai_responses", responses) == 3 + (3 + _n("system") + _n("I")) + (
        3 + _n("user") + _n("Hello")
    )
    assert estimator.estimate("openai_completions", {"prompt": ["a", "b"]}) == 2
    assert estimator.estimate("none", {"x": 1}) is None
    assert estimator.estimate("openai_chat", ["not", "a", "dict"]) is None


def test_a_zero_sized_image_is_counted_at_the_default_without_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    encoding = tiktoken.get_encoding("o200k_base")
    url = "data:image/png;base64," + base64.b64encode(png(0, 0)).decode()
    request = {"model": "gpt-4o", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]},
    ]}  # fmt: skip
    assert PromptEstimator(encoding, 765).estimate("openai_chat", request, "gpt-4o")
    assert "ZeroDivisionError" not in caplog.text
