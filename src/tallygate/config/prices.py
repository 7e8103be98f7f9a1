"""The price table shipped with tallygate (tallygate/data/prices.yaml), read from the package."""

from __future__ import annotations

from importlib import resources
from typing import Any

import yaml

from tallygate.core.pricing import PriceTable, parse_token_price


def default_price_table() -> PriceTable:
    """The table shipped in tallygate/data/prices.yaml."""
    text = resources.files("tallygate").joinpath("data/prices.yaml").read_text(encoding="utf-8")
    document: dict[str, Any] = yaml.safe_load(text)
    prices = {
        str(name): parse_token_price(raw, f"models.{name}")
        for name, raw in document["models"].items()
    }
    return PriceTable(prices, str(document.get("date", "")), str(document.get("source", "")))
