"""Token counting with tiktoken: which encoding a model uses, and exact incremental counts.

The counter is exact because BPE tokens never span tiktoken's pre-tokenizer pieces (the split
regex of each encoding): once a piece can no longer change, its tokens are final. New text can
only change the last two pieces (a word can grow; `word'` + `s` joins into one piece under
o200k's contraction rule), so everything before them is counted and dropped. The work stays
linear in the text. Pure: the encodings
are loaded by `tallygate.runtime.encodings`, at start-up.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import regex
import tiktoken

from tallygate.compat import split_pattern, token_buffer

ENCODINGS = ("o200k_base", "cl100k_base", "p50k_base")

# Model name globs, first match wins, matched against the name after any `provider/` prefix.
# From OpenAI's model pages and tiktoken's own table: gpt-4o and later, and the o-series, use
# o200k_base; gpt-4 and gpt-3.5 (and davinci-002, babbage-002) use cl100k_base.
DEFAULT_MODEL_ENCODINGS: tuple[tuple[str, str], ...] = (
    ("gpt-4o*", "o200k_base"),
    ("chatgpt-4o*", "o200k_base"),
    ("gpt-4.1*", "o200k_base"),
    ("gpt-4.5*", "o200k_base"),
    ("gpt-5*", "o200k_base"),
    ("gpt-oss*", "o200k_base"),
    ("o1*", "o200k_base"),
    ("o3*", "o200k_base"),
    ("o4*", "o200k_base"),
    ("codex-*", "o200k_base"),
    ("gpt-4*", "cl100k_base"),
    ("gpt-3.5*", "cl100k_base"),
    ("gpt-35*", "cl100k_base"),
    ("davinci-002*", "cl100k_base"),
    ("babbage-002*", "cl100k_base"),
    ("text-embedding-*", "cl100k_base"),
    ("text-davinci-*", "p50k_base"),
    ("code-*", "p50k_base"),
)


@dataclass(frozen=True, slots=True)
class ModelEncoding:
    encoding: tiktoken.Encoding
    exact: bool  # the model's own tokenizer; False: another model family, an estimate only


class Tokenizers:
    """Which encoding counts a model's tokens."""

    def __init__(
        self,
        encodings: Mapping[str, tiktoken.Encoding],
        default: str,
        overrides: Iterable[tuple[str, str]] = (),
    ) -> None:
        self._encodings = encodings
        self._rules = (*tuple(overrides), *DEFAULT_MODEL_ENCODINGS)
        self.default = ModelEncoding(encodings[default], exact=False)
        self._override_globs = {glob for glob, _ in overrides}
        self._cache: dict[str, ModelEncoding] = {}

    def for_model(self, model: str | None) -> ModelEncoding:
        if not model:
            return self.default
        found = self._cache.get(model)
        if found is None:
            found = self._lookup(model)
            if len(self._cache) < 4096:  # model names come from clients: keep the cache bounded
                self._cache[model] = found
        return found

    def _lookup(self, model: str) -> ModelEncoding:
        name = model.rsplit("/", 1)[-1].lower()
        for glob, encoding in self._rules:
            if fnmatch.fnmatchcase(name, glob.lower()):
                # An override is the operator's statement that this is the model's tokenizer.
                return ModelEncoding(self._encodings[encoding], exact=True)
        return self.default


# Text is split into pieces only when this much is waiting. The `regex` module's pass over
# tiktoken's Unicode pattern costs about 0.3 us a character, tiktoken's own (Rust) encoder far
# less: most answers stay under this and are counted once, by tiktoken, when asked; longer ones
# commit a window at a time, so the work stays linear and the tail bounded.
_SPLIT_AFTER_CHARS = 8192
_ONE_PIECE_CHARS = 64 * 1024
_MAX_PIECES = 16


class TokenCounter:
    """Counts the tokens of a text fed in pieces, exactly: `total()` equals
    `len(encoding.encode_ordinary(all_text_fed))`."""

    __slots__ = (
        "_committed", "_encoding", "_pattern", "_pieces", "_size", "_split_after", "_split_at",
    )  # fmt: skip

    def __init__(self, encoding: tiktoken.Encoding, split_after: int = _SPLIT_AFTER_CHARS) -> None:
        self._encoding = encoding
        self._pattern = _split_pattern(encoding)
        self._committed = 0
        # The uncounted text, as fed: joined only when it is split or counted, so that feeding
        # a token at a time does not copy the whole tail every time.
        self._pieces: list[str] = []
        self._size = 0
        self._split_after = self._split_at = split_after

    def feed(self, text: str) -> None:
        pieces = self._pieces
        pieces.append(text)
        self._size += len(text)
        if len(text) > _ONE_PIECE_CHARS:
            # A whole answer at once (a JSON body): splitting it here would run the pattern
            # over all of it on the event loop; `total()` counts it in one call instead, which
            # the relay makes off the loop when this much is waiting (see `pending`).
            self._split_at = max(self._split_at, 2 * self._size)
        elif self._size > self._split_at:
            self._split()
        elif len(pieces) > _MAX_PIECES:
            # A paced stream feeds a token at a time: a str object per token would cost a live
            # stream ~60 bytes each (4 KiB for 68 tokens); joined, it costs the characters.
            self._pieces = ["".join(pieces)]

    def _split(self) -> None:
        tail = "".join(self._pieces)
        cut = self._safe_cut(tail)
        if cut:
            self._committed += len(self._encoding.encode_ordinary(tail[:cut]))
            tail = tail[cut:]
        # Nothing safe to cut (a long run of whitespace): look again only when the tail has
        # doubled, so the work stays linear.
        self._split_at = max(self._split_after, 2 * len(tail))
        self._pieces = [tail]
        self._size = len(tail)

    def _safe_cut(self, tail: str) -> int:
        """The start of a piece before the last two, where the text before it ends in
        non-whitespace: the encodings' patterns treat whitespace at the end of a string
        specially (`\\s++$`), so the committed text must not end in whitespace to be split there
        exactly as within the whole text."""
        starts = [m.start() for m in self._pattern.finditer(tail)]
        for start in reversed(starts[1:-2]):
            if not tail[start - 1].isspace():
                return start
        return 0

    @property
    def pending(self) -> int:
        """Characters fed and not counted yet: what `total()` has to encode."""
        return self._size

    def total(self) -> int:
        """The count so far (the tail is counted now, not committed)."""
        if not self._size:
            return self._committed
        tail = "".join(self._pieces)
        self._pieces = [tail]
        return self._committed + count(self._encoding, tail)


_patterns: dict[str, regex.Pattern[str]] = {}


def _split_pattern(encoding: tiktoken.Encoding) -> regex.Pattern[str]:
    pattern = _patterns.get(encoding.name)
    if pattern is None:
        # tiktoken's own pre-tokenizer regex for this encoding.
        pattern = _patterns[encoding.name] = regex.compile(split_pattern(encoding))
    return pattern


def count(encoding: tiktoken.Encoding, text: str) -> int:
    """`len(encoding.encode_ordinary(text))`, without the list. tiktoken encodes with the GIL
    released, but builds the list of a long text's tokens with it held (about 20 ms a million
    tokens), so a prompt of megabytes counted in a thread would still pause the event loop; its
    token buffer (what `encode_to_numpy` uses) is one copy. Without that private call (another
    tiktoken), or for text tiktoken re-encodes (lone surrogates), the list it is."""
    if not text:
        return 0
    to_buffer = token_buffer(encoding)
    if to_buffer is not None:
        try:
            # No special token allowed: each is encoded as plain text, as encode_ordinary does.
            return memoryview(to_buffer(text, _NO_SPECIALS)).nbytes // 4
        except UnicodeEncodeError:
            pass
    return len(encoding.encode_ordinary(text))


_NO_SPECIALS: frozenset[str] = frozenset()
