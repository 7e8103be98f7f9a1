"""Incremental token counting is exact at any split, with real tiktoken encodings."""

from __future__ import annotations

import itertools
import os
import random

import pytest
import tiktoken
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tallygate.core.tokens import TokenCounter, count
from tallygate.runtime.encodings import TokenizerError, load_encodings, load_tokenizers

from conftest import CASES

ENCODINGS = {name: tiktoken.get_encoding(name) for name in ("o200k_base", "cl100k_base")}

# Text that stresses the pre-tokenizer: CJK, emoji (astral, joined), code, contractions,
# digit runs, and runs of spaces, tabs and line ends of every kind.
ALPHABET = st.sampled_from(
    [
        *list("ab Zé'sdt\n\r\t 0123456789.,;:!?-_()[]{}\"#"),
        "世界",
        "日本語",
        "👍",
        "👨\u200d👩\u200d👧",
        "ß",
        "İ",
        "  ",
        "\n\n",
        "\r\n",
        "'ll",
        "'S",
        "def f(x):\n    return x",
    ]
)
TEXT = st.lists(ALPHABET, max_size=120).map("".join)


def feed_in_pieces(
    encoding: tiktoken.Encoding, text: str, cuts: list[int], split_after: int = 16
) -> int:
    # A small window makes every test text go through the commit path many times.
    counter = TokenCounter(encoding, split_after)
    bounds = [0, *sorted(set(cuts)), len(text)]
    for a, b in itertools.pairwise(bounds):
        counter.feed(text[a:b])
    return counter.total()


@pytest.mark.parametrize("split_after", [1, 16, 256])
@pytest.mark.parametrize("name", sorted(ENCODINGS))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(text=st.lists(TEXT, min_size=1, max_size=8).map("".join), data=st.data())
def test_incremental_count_equals_whole_encoding(
    name: str, split_after: int, text: str, data: st.DataObject
) -> None:
    encoding = ENCODINGS[name]
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=40)) if text else []
    assert feed_in_pieces(encoding, text, cuts, split_after) == len(encoding.encode_ordinary(text))


@pytest.mark.parametrize("name", sorted(ENCODINGS))
def test_long_texts_char_by_char(name: str) -> None:
    encoding = ENCODINGS[name]
    rng = random.Random(7)
    parts = ["Hello", " world", "!", "  ", "\n", "世界", "👍", " don't", "'s", "123456", "\t", " "]
    text = "".join(rng.choice(parts) for _ in range(3000))
    assert feed_in_pieces(encoding, text, list(range(len(text)))) == len(
        encoding.encode_ordinary(text)
    )
    rng_cuts = [rng.randrange(len(text)) for _ in range(500)]
    assert feed_in_pieces(encoding, text, rng_cuts) == len(encoding.encode_ordinary(text))


def test_corpus_output_texts_as_streamed() -> None:
    encoding = ENCODINGS["o200k_base"]
    for case in CASES:
        text = case.meta["assembled"]["output_text"] or ""
        if text:
            cuts = list(range(0, len(text), 3))
            assert feed_in_pieces(encoding, text, cuts) == len(encoding.encode_ordinary(text)), (
                case.id
            )


def test_model_to_encoding() -> None:
    tokenizers = load_tokenizers(default="o200k_base", overrides=[("llama*", "cl100k_base")])
    assert tokenizers.for_model("gpt-4o-mini-2024-07-18").encoding.name == "o200k_base"
    assert tokenizers.for_model("gpt-4-0613").encoding.name == "cl100k_base"
    assert tokenizers.for_model("gpt-3.5-turbo-0125").encoding.name == "cl100k_base"
    assert tokenizers.for_model("gpt-5-2025-08-07").encoding.name == "o200k_base"
    assert tokenizers.for_model("o3-mini").encoding.name == "o200k_base"
    assert tokenizers.for_model("openai/gpt-oss-120b").encoding.name == "o200k_base"
    assert tokenizers.for_model("gpt-4.1-nano").exact
    claude = tokenizers.for_model("claude-sonnet-4-5")
    assert claude.encoding.name == "o200k_base" and not claude.exact
    assert tokenizers.for_model("llama3-8b-8192").encoding.name == "cl100k_base"
    assert tokenizers.for_model(None) is tokenizers.default


def test_missing_encoding_names_the_cache_and_the_fetch_command(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    # Any download attempt fails here; make sure of it even on a machine with internet.
    monkeypatch.setattr("tiktoken.load.read_file", _no_network)
    monkeypatch.setattr("tiktoken.registry.ENCODINGS", {})
    with pytest.raises(TokenizerError) as raised:
        load_encodings(["o200k_base"])
    message = str(raised.value)
    assert str(tmp_path) in message
    assert "tallygate tokenizers fetch --dir" in message


def _no_network(blobpath: str) -> bytes:
    raise ConnectionError(f"no network for {blobpath}")


def test_fetch_command_reports_failure_cleanly(tmp_path: os.PathLike[str]) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "tallygate", "tokenizers", "fetch", "--dir", str(tmp_path),
         "--encoding", "no_such_encoding"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("error: cannot download encodings")
    assert "Traceback" not in done.stderr


@given(text=TEXT)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_count_is_the_length_of_encode_ordinary(text: str) -> None:
    for encoding in ENCODINGS.values():
        assert count(encoding, text) == len(encoding.encode_ordinary(text))


@pytest.mark.parametrize(
    "text", ["<|endoftext|> and <|fim_prefix|> as plain text", "a lone \ud800 surrogate", ""]
)
def test_count_of_special_tokens_and_surrogates(text: str) -> None:
    for encoding in ENCODINGS.values():
        assert count(encoding, text) == len(encoding.encode_ordinary(text))
