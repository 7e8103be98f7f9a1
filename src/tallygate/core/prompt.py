"""Estimates of a request's input tokens from its JSON body. Pure.

`PromptEstimator` holds the tools (count a text, a JSON value, an image of unknown size);
each dialect's formula lives in its own module under `tallygate.core.dialects` and is found
through the registry.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson
import tiktoken

from tallygate.core.dialects import Dialect, spec
from tallygate.core.tokens import count


class PromptEstimator:
    def __init__(self, encoding: tiktoken.Encoding, image_tokens_default: int) -> None:
        self._encoding = encoding
        self.image_default = image_tokens_default  # an image whose size cannot be read

    def estimate(self, dialect: Dialect, request: object, model: str | None = None) -> int | None:
        """The input tokens of `request` in `dialect`; None when there is no formula for it."""
        formula = spec(dialect).estimate
        if formula is None or not isinstance(request, dict):
            return None
        return formula(self, request, model or "")

    def count(self, text: object) -> int:
        if not isinstance(text, str) or not text:
            return 0
        return count(self._encoding, text)

    def texts(self, texts: Iterable[object]) -> int:
        return sum(self.count(t) for t in texts)

    def json(self, value: object) -> int:
        return self.count(orjson.dumps(value).decode()) if value is not None else 0
