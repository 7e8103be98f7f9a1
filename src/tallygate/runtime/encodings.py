"""Loading tiktoken's encodings at start-up, from its cache directory or the network.

The one place tallygate reads tiktoken's files: counting itself (`tallygate.core.tokens`) is pure.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable

import tiktoken

from tallygate.config import Config
from tallygate.core.tokens import DEFAULT_MODEL_ENCODINGS, ENCODINGS, Tokenizers


class TokenizerError(Exception):
    pass


def cache_dir() -> str:
    """Where tiktoken keeps its downloads (its own rule)."""
    return (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or (os.path.join(tempfile.gettempdir(), "data-gym-cache"))
    )


def load_encodings(names: Iterable[str]) -> dict[str, tiktoken.Encoding]:
    """Load encodings now, at start-up, never on a first request."""
    loaded = {}
    for name in sorted(set(names)):
        try:
            loaded[name] = tiktoken.get_encoding(name)
        except Exception as error:  # tiktoken raises whatever its download raised
            raise TokenizerError(
                f"cannot load the tiktoken encoding {name!r} (cache directory: {cache_dir()}; "
                f"{type(error).__name__}). Where there is internet, run "
                f"`tallygate tokenizers fetch --dir DIR` and point TIKTOKEN_CACHE_DIR at DIR."
            ) from None
    return loaded


def fetch_encodings(directory: str, names: Iterable[str] = ENCODINGS) -> list[str]:
    """Download encodings into `directory` in tiktoken's cache format (for offline images)."""
    os.makedirs(directory, exist_ok=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = directory
    for name in names:
        tiktoken.get_encoding(name)
    return sorted(os.listdir(directory))


def load_tokenizers(
    default: str = "o200k_base", overrides: Iterable[tuple[str, str]] = ()
) -> Tokenizers:
    """Tokenizers for `default` plus every encoding an override or the built-in rules name."""
    overrides = tuple(overrides)
    needed = {default, *(name for _, name in overrides), *(n for _, n in DEFAULT_MODEL_ENCODINGS)}
    return Tokenizers(load_encodings(needed), default, overrides)


def tokenizers_for(config: Config) -> Tokenizers | None:
    """What `config` counts with, loaded now, never on a first request (TokenizerError if not);
    None when it estimates nothing."""
    if not (config.metering.enabled and config.metering.estimate):
        return None
    return load_tokenizers(config.metering.default_encoding, config.metering.encodings)
