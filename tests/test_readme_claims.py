"""What the README promises about token counts is what tallygate does: exact only where it is."""

from __future__ import annotations

from conftest import ROOT


def test_the_readme_says_what_is_exact_and_what_is_an_estimate() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "counts tokens exactly" not in readme
    assert "takes the token usage a provider reports as is" in readme
    assert "only for the visible text output of OpenAI models" in readme
    metering = " ".join((ROOT / "docs" / "metering.md").read_text().split())
    assert "What is exact and what is an estimate:" in metering
    assert "**Estimates**: every prompt (input) count" in metering
