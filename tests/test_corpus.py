"""The recorded corpus travels with the repository, unchanged, and the harness reads it there."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import CASES, CORPUS, ROOT, tiktoken_cache_dir


def test_the_corpus_is_inside_the_repository_with_all_58_cases() -> None:
    assert CORPUS.is_relative_to(ROOT) and CORPUS.is_dir()
    assert len(CASES) == 58
    index = json.loads((CORPUS / "index.json").read_text())
    assert [case.id for case in CASES] == sorted(entry["id"] for entry in index)
    assert (CORPUS / "README.md").is_file() and (CORPUS / "PROVENANCE.md").is_file()


def test_every_recorded_body_is_the_one_its_meta_describes() -> None:
    for case in CASES:
        body = case.meta["body"]
        assert len(case.body) == body["bytes"], case.id
        assert hashlib.sha256(case.body).hexdigest() == body["sha256"], case.id


def test_tiktoken_cache_comes_from_the_environment_then_shared_then_download(
    tmp_path: Path,
) -> None:
    shared_cache = tmp_path / "shared" / "tiktoken-cache"
    assert tiktoken_cache_dir({"TIKTOKEN_CACHE_DIR": "/mine"}, tmp_path) == "/mine"
    assert tiktoken_cache_dir({}, tmp_path) is None  # tiktoken downloads
    shared_cache.mkdir(parents=True)
    assert tiktoken_cache_dir({}, tmp_path) == str(shared_cache)
    assert tiktoken_cache_dir({"TIKTOKEN_CACHE_DIR": "/mine"}, tmp_path) == "/mine"
    assert tiktoken_cache_dir({"TIKTOKEN_CACHE_DIR": ""}, tmp_path) == str(shared_cache)
