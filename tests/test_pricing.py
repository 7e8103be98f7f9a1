"""Cost arithmetic: token prices, the shipped table, egress tiers and directions."""

from __future__ import annotations

import pytest

from tallygate.config.prices import default_price_table
from tallygate.core.dialects import Usage
from tallygate.core.pricing import (
    Costing,
    EgressMeter,
    EgressPrice,
    EgressTier,
    PriceTable,
    TokenPrice,
    parse_token_price,
)

GIB = 2**30


def test_shipped_price_table_loads_and_every_entry_is_valid() -> None:
    table = default_price_table()
    assert table.date and table.source
    assert len(table) >= 20
    for name, price in table.entries().items():
        assert price.input > 0 and price.output >= price.input, name
        for cached in (price.cached_input, price.cache_write_input):
            assert cached is None or cached > 0, name
        if price.cached_input is not None:
            assert price.cached_input < price.input, name


@pytest.mark.parametrize(
    ("reported", "key"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-3.5-turbo-0125", "gpt-3.5-turbo"),
        ("claude-3-5-sonnet-20240620", "claude-3-5-sonnet"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-3-haiku-20240307", "claude-3-haiku"),
        ("anthropic/claude-sonnet-4.5", None),
        ("gpt-4o-audio-preview", None),
        ("llama3-8b-8192", None),
        (None, None),
    ],
)
def test_reported_names_find_their_price(reported: str | None, key: str | None) -> None:
    found = default_price_table().lookup(reported)
    assert (found[0] if found else None) == key


def test_token_cost_with_cache() -> None:
    price = TokenPrice(input=3.0, output=15.0, cached_input=0.3, cache_write_input=3.75)
    # input 1,000,000 of which 200,000 cache reads and 100,000 cache writes
    cost = price.cost(
        Usage(input=1_000_000, output=100_000, cached_input=200_000, cache_write_input=100_000)
    )
    assert cost == pytest.approx(
        {"input": 2.1, "output": 1.5, "cached_input": 0.06, "cache_write_input": 0.375}
    )
    # Without cache prices, cached tokens cost the input price.
    assert TokenPrice(1.0, 2.0).cost(Usage(input=10, cached_input=10))[
        "cached_input"
    ] == pytest.approx(1e-5)


def test_overrides_and_globs() -> None:
    table = default_price_table().merged(
        {"ft:gpt-4o-mini*": TokenPrice(0.3, 1.2), "gpt-4o": TokenPrice(1, 1)}
    )
    assert table.lookup("ft:gpt-4o-mini-2024-07-18:acme::abc") == (
        "ft:gpt-4o-mini*",
        TokenPrice(0.3, 1.2),
    )
    assert table.lookup("gpt-4o-2024-08-06") == ("gpt-4o", TokenPrice(1, 1))


def test_egress_flat_and_free_allowance() -> None:
    flat = EgressPrice(usd_per_gb=0.09)
    assert flat.cost(0, GIB) == pytest.approx(0.09)
    assert flat.cost(5 * GIB, GIB // 2) == pytest.approx(0.045)
    free = EgressPrice(usd_per_gb=0.09, free_gb=100)
    assert free.cost(0, 100 * GIB) == 0
    assert free.cost(99 * GIB, 2 * GIB) == pytest.approx(0.09)
    assert EgressPrice(gb_bytes=10**9).cost(0, 10**9) == pytest.approx(0.09)


def test_egress_tiers_by_monthly_volume() -> None:
    tiers = EgressPrice(
        usd_per_gb=0.05,
        free_gb=100,
        tiers=(EgressTier(10_240, 0.09), EgressTier(51_200, 0.085), EgressTier(153_600, 0.07)),
    )
    # A transfer that spans the free allowance and the first two tiers.
    cost = tiers.cost(0, 20_000 * GIB)
    assert cost == pytest.approx((10_240 - 100) * 0.09 + (20_000 - 10_240) * 0.085)
    assert tiers.cost(200_000 * GIB, GIB) == pytest.approx(0.05)
    # Split into many small transfers, the total is the same.
    meter = EgressMeter(tiers)
    total = sum(meter.charge("2026-11", 1000 * GIB) for _ in range(20))
    assert total == pytest.approx(cost)
    # A new month starts from zero.
    assert meter.charge("2026-12", 50 * GIB) == 0


def test_costing_uses_only_the_configured_directions() -> None:
    wire = {"client_in": 1000, "client_out": GIB, "upstream_out": GIB // 4, "upstream_in": 5 * GIB}
    edge = Costing(PriceTable({}), EgressPrice(0.08), ["client_out", "upstream_out"])
    sidecar = Costing(PriceTable({}), EgressPrice(0.08), ["upstream_out"])
    assert edge.cost(None, Usage(), wire, "2026-11").usd["egress"] == pytest.approx(0.1)
    assert sidecar.cost(None, Usage(), wire, "2026-11").usd["egress"] == pytest.approx(0.02)


def test_unknown_models_cost_nothing_and_are_counted() -> None:
    costing = Costing(default_price_table(), EgressPrice(0.0), [])
    cost = costing.cost(
        "mystery-model-7b",
        Usage(input=100, output=50),
        dict.fromkeys(("client_out",), 0),
        "2026-11",
    )
    assert cost.model_key is None and cost.unpriced_tokens == 150 and cost.usd["total"] == 0
    priced = costing.cost(
        "gpt-4o-mini-2024-07-18", Usage(input=1_000_000, output=1_000_000), {}, "2026-11"
    )
    assert priced.model_key == "gpt-4o-mini"
    assert priced.usd["total"] == pytest.approx(0.15 + 0.60)


@pytest.mark.parametrize(
    ("reported", "key", "price"),
    [
        ("gpt-5.1", "gpt-5.1", (1.25, 0.125, 10.0)),
        ("gpt-5.1-2025-11-13", "gpt-5.1", (1.25, 0.125, 10.0)),
        ("gpt-5-codex", "gpt-5-codex", (1.25, 0.125, 10.0)),
        ("gpt-5.1-codex", "gpt-5.1-codex", (1.25, 0.125, 10.0)),
        ("gpt-5-chat-latest", "gpt-5-chat", (1.25, 0.125, 10.0)),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini", (0.25, 0.025, 2.0)),
        ("gpt-5-pro-2025-10-06", "gpt-5-pro", (15.0, None, 120.0)),
        ("o3-pro", "o3-pro", (20.0, None, 80.0)),
        ("o3-pro-2025-06-10", "o3-pro", (20.0, None, 80.0)),
        ("o3-2025-04-16", "o3", (2.0, 0.5, 8.0)),
        ("o4-mini-2025-04-16", "o4-mini", (1.10, 0.275, 4.40)),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13", (5.0, None, 15.0)),
        ("claude-opus-4-5-20251101", "claude-opus-4-5", (5.0, 0.5, 25.0)),
        ("claude-sonnet-4-0", "claude-sonnet-4", (3.0, 0.3, 15.0)),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5", (1.0, 0.1, 5.0)),
        ("gemini-2.5-pro", "gemini-2.5-pro", (1.25, 0.125, 10.0)),
        ("gemini-2.5-flash", "gemini-2.5-flash", (0.30, 0.03, 2.50)),
        ("gemini-2.5-flash-lite", "gemini-2.5-flash-lite", (0.10, 0.01, 0.40)),
        ("deepseek-flash", "deepseek-flash", (0.30, 0.006, 1.20)),  # peak prices
        ("deepseek-v4-flash", "deepseek-v4-flash", (0.30, 0.006, 1.20)),
        ("deepseek-v4-pro", "deepseek-v4-pro", (1.32, 0.044, 3.96)),
        ("mistral-medium-2508", "mistral-medium-2508", (0.40, 0.04, 2.0)),
        ("mistral-medium-3-5", "mistral-medium-3-5", (1.50, 0.15, 7.50)),
        ("mistral-large-2512", "mistral-large-2512", (0.50, 0.05, 1.50)),
        ("ministral-8b-2512", "ministral-8b-2512", (0.15, 0.015, 0.15)),
        ("llama-3.3-70b-versatile", "llama-3.3-70b-versatile", (0.59, None, 0.79)),
        ("qwen/qwen3.8-27b", "qwen3.8-27b", (0.80, 0.40, 4.00)),
        # Models released after the first table (2025-11-30).
        ("gpt-6.1-terra", "gpt-6.1-terra", (1.0, 0.05, 5.0)),
        ("gpt-6.1-sol", "gpt-6.1-sol", (2.0, 0.10, 10.0)),
        ("gpt-6-sol", "gpt-6-sol", (2.0, 0.20, 10.0)),
        ("gpt-6-sol-2026-09-22", "gpt-6-sol", (2.0, 0.20, 10.0)),
        ("gpt-6-luna", "gpt-6-luna", (0.10, 0.01, 0.50)),
        ("gpt-6-astra", "gpt-6-astra", (10.0, 1.0, 50.0)),
        ("openai/gpt-6-astra", "gpt-6-astra", (10.0, 1.0, 50.0)),
        ("gpt-5.6-terra", "gpt-5.6-terra", (2.0, 0.20, 12.0)),
        ("gpt-5.5", "gpt-5.5", (5.0, 0.50, 30.0)),
        ("gpt-5.5-pro", "gpt-5.5-pro", (30.0, None, 180.0)),
        ("gpt-5.4-2026-03-05", "gpt-5.4", (2.50, 0.25, 15.0)),
        ("gpt-5.4-mini", "gpt-5.4-mini", (0.75, 0.075, 4.50)),
        ("gpt-5.4-nano", "gpt-5.4-nano", (0.20, 0.02, 1.25)),
        ("gpt-5.2", "gpt-5.2", (1.75, 0.175, 14.0)),
        ("claude-opus-5-5", "claude-opus-5-5", (4.0, 0.20, 20.0)),
        ("claude-opus-5", "claude-opus-5", (5.0, 0.50, 25.0)),
        ("claude-opus-4-8", "claude-opus-4-8", (5.0, 0.50, 25.0)),
        ("claude-opus-4-7-20260101", "claude-opus-4-7", (5.0, 0.50, 25.0)),
        ("claude-opus-4-6", "claude-opus-4-6", (5.0, 0.50, 25.0)),
        ("claude-sonnet-5-5", "claude-sonnet-5-5", (2.0, 0.10, 10.0)),
        ("claude-sonnet-5", "claude-sonnet-5", (2.0, 0.20, 10.0)),
        ("claude-sonnet-4-6", "claude-sonnet-4-6", (3.0, 0.30, 15.0)),
        ("claude-haiku-5-5", "claude-haiku-5-5", (0.10, 0.01, 0.50)),
        ("claude-fable-5-1", "claude-fable-5-1", (10.0, 0.25, 50.0)),
        ("claude-fable-5", "claude-fable-5", (10.0, 1.0, 50.0)),
        ("gemini-3.5-flash", "gemini-3.5-flash", (1.50, 0.15, 9.0)),
        ("gemini-3.1-pro-preview", "gemini-3.1-pro-preview", (2.0, None, 12.0)),
        ("gemini-3-flash-preview", "gemini-3-flash-preview", (0.50, 0.05, 3.0)),
    ],
)
def test_current_models_are_priced(
    reported: str, key: str, price: tuple[float, float | None, float]
) -> None:
    found = default_price_table().lookup(reported)
    assert found is not None, reported
    assert found[0] == key
    assert (found[1].input, found[1].cached_input, found[1].output) == pytest.approx(price)


@pytest.mark.parametrize(
    "reported",
    # Models whose price the table does not claim to know: unpriced (and reported), not priced
    # as an older model whose name they start with.
    [
        "claude-opus-4-9",
        "claude-opus-5-6",
        "claude-sonnet-5-6",
        "claude-haiku-5-6-20270101",
        "claude-fable-5-2",
        "gpt-5.6-sol",  # its price was cut until a date, then unknown: left out on purpose
        "gpt-5.6",
        "gpt-5.2-codex",
        "gpt-6.2-sol",
        "gemini-3.5-flash-lite",
        "gemini-3.8-flash",  # a promotional price with an end date: left out on purpose
        "mistral-medium-latest",  # an alias that moved to a model at another price
        "mistral-small-latest",
        "codestral-latest",
        "deepseek-chat",  # retired on 2026-07-24
        "openai/gpt-oss-120b",  # one name, a price per host
        "meta-llama/Llama-3.3-70B-Instruct-Turbo",  # Together: no 2026 price confirmed
        "ministral-8b-2410",  # retired: not priced as its successor
    ],
)
def test_a_newer_model_is_not_priced_as_an_older_one(reported: str) -> None:
    assert default_price_table().lookup(reported) is None


def test_anthropic_cache_prices_follow_the_page_not_the_usual_ratio() -> None:
    """The cache read is 0.1x input on most Claude models, but not on these."""
    table = default_price_table()

    def cache_read(model: str) -> float | None:
        found = table.lookup(model)
        assert found is not None, model
        return found[1].cached_input

    assert cache_read("claude-opus-5-5") == pytest.approx(0.20)  # 0.05x
    assert cache_read("claude-sonnet-5-5") == pytest.approx(0.10)  # cut on 2026-10-07
    assert cache_read("claude-fable-5-1") == pytest.approx(0.25)  # 0.025x
    assert cache_read("claude-fable-5") == pytest.approx(1.0)
    haiku = Usage(
        input=1_000_000, output=1_000_000, cached_input=500_000, cache_write_input=100_000
    )
    found = table.lookup("claude-haiku-5-5")
    assert found is not None
    # 400k fresh at 0.10, 500k cache reads at 0.01, 100k cache writes at 0.125, 1M out at 0.50
    assert sum(found[1].cost(haiku).values()) == pytest.approx(0.04 + 0.005 + 0.0125 + 0.5)


def test_each_family_is_dated_by_its_own_sources() -> None:
    """A family whose prices were re-confirmed carries that date; one that was not keeps the
    date of its old source, and the table's date (the one `check` warns on) is the oldest."""
    from importlib import resources

    import yaml

    text = resources.files("tallygate").joinpath("data/prices.yaml").read_text(encoding="utf-8")
    sources = yaml.safe_load(text)["sources"]
    assert sources["anthropic"]["date"] == "2026-10-24"
    assert sources["openai"]["date"] == "2026-10-27"
    assert sources["google"]["date"] == "2026-10-07"
    assert sources["deepseek"]["date"] == "2026-10-27"
    assert sources["mistral"]["date"] == "2026-10-20"
    assert sources["groq"]["date"] == "2026-09-10"
    assert default_price_table().date == "2026-09-10"


def test_every_family_of_the_shipped_table_has_a_date_and_a_source() -> None:
    from datetime import date
    from importlib import resources

    import yaml

    text = resources.files("tallygate").joinpath("data/prices.yaml").read_text(encoding="utf-8")
    document = yaml.safe_load(text)
    sources = document["sources"]
    expected = {"openai", "anthropic", "google", "deepseek", "mistral", "groq"}
    assert set(sources) == expected
    for family, source in sources.items():
        assert source["url"].startswith("https://"), family
        date.fromisoformat(source["date"])
        assert source["url"] in text.split("models:", 1)[1], family  # each family's comment
    # The table's date is its oldest family's, so the age check never flatters it.
    assert default_price_table().date == min(source["date"] for source in sources.values())


def test_price_table_age_warning() -> None:
    from datetime import date

    from tallygate.core.pricing import price_table_age_warning

    assert price_table_age_warning("2025-11-30", date(2025, 12, 1)) is None
    assert price_table_age_warning("2025-11-30", date(2026, 2, 28)) is None  # 90 days
    warning = price_table_age_warning("2025-11-30", date(2026, 3, 1))
    assert warning is not None and "2025-11-30, 91 days ago" in warning
    assert "pricing.models" in warning
    assert "no valid date" in (price_table_age_warning("", date(2026, 3, 1)) or "")


def test_an_unpriced_model_is_reported_once() -> None:
    costing = Costing(default_price_table(), EgressPrice(0.0), [])

    def first(model: str | None, tokens: int) -> bool:
        return costing.cost(model, Usage(input=tokens), {}, "2026-11").first_unpriced

    assert not first("mystery-model-7b", 0)  # no tokens: nothing to report yet
    assert first("mystery-model-7b", 10)
    assert not first("mystery-model-7b", 10)
    assert first("other-model", 5)
    assert not first("gpt-4o-mini", 5)  # priced
    # A reload's new Costing keeps what this process has reported.
    again = Costing(default_price_table(), EgressPrice(0.0), [], costing.unpriced)
    assert not again.cost("mystery-model-7b", Usage(input=1), {}, "2026-11").first_unpriced


PEAK = {"utc_offset": "+08:00", "days": ["mon", "tue", "wed", "thu", "fri"],
        "hours": ["09:00-12:00", "14:00-18:00"]}  # fmt: skip


@pytest.mark.parametrize(
    ("moment", "peak"),
    [
        ("2026-11-25T01:00:00+00:00", True),  # Wednesday 09:00 in Beijing
        ("2026-11-25T03:59:59+00:00", True),  # 11:59:59
        ("2026-11-25T04:00:00+00:00", False),  # 12:00: the lunch hours are off-peak
        ("2026-11-25T06:30:00+00:00", True),  # 14:30
        ("2026-11-25T10:00:00+00:00", False),  # 18:00
        ("2026-11-24T20:00:00+00:00", False),  # Wednesday 04:00 in Beijing, Tuesday in UTC
        ("2026-11-28T02:00:00+00:00", False),  # Saturday 10:00 in Beijing
        ("2026-11-30T01:30:00+00:00", True),  # Monday 09:30 in Beijing, still Monday in UTC
        ("2026-11-29T20:00:00+00:00", False),  # Monday 04:00 in Beijing, Sunday in UTC
    ],
)
def test_time_of_day_prices_follow_the_providers_clock(moment: str, peak: bool) -> None:
    from datetime import datetime

    price = parse_token_price(
        {"input": 0.30, "cached_input": 0.006, "output": 1.20, "peak": PEAK,
         "off_peak": {"input": 0.15, "cached_input": 0.003, "output": 0.60}},
        "models.deepseek-flash",
    )  # fmt: skip
    costing = Costing(PriceTable({"deepseek-flash": price}), EgressPrice(0.0), [])
    usage = Usage(input=1_000_000, output=1_000_000, cached_input=500_000)
    cost = costing.cost("deepseek-flash", usage, {}, "2026-11", datetime.fromisoformat(moment))
    expected = (0.30 * 0.5 + 0.006 * 0.5 + 1.20) * (1 if peak else 0.5)
    assert cost.usd["total"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"peak": PEAK}, "models.m.off_peak: required with peak"),
        ({"off_peak": {"input": 1, "output": 1}}, "models.m.peak: required with off_peak"),
        (
            {"peak": {**PEAK, "utc_offset": "UTC+8"}, "off_peak": {"input": 1, "output": 1}},
            "models.m.peak.utc_offset: expected +HH:MM",
        ),
        (
            {"peak": {**PEAK, "days": ["monday"]}, "off_peak": {"input": 1, "output": 1}},
            "models.m.peak.days: expected a list of mon",
        ),
        (
            {"peak": {**PEAK, "hours": ["18:00-09:00"]}, "off_peak": {"input": 1, "output": 1}},
            "models.m.peak.hours[0]: expected HH:MM-HH:MM, start before end",
        ),
        ({"peak": PEAK, "off_peak": {"input": 1}}, "models.m.off_peak.output: required"),
    ],
)
def test_time_of_day_prices_are_checked_key_by_key(raw: dict[str, object], problem: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_token_price({"input": 2, "output": 2, **raw}, "models.m")
    assert str(raised.value).startswith(problem)


def test_the_shipped_deepseek_prices_halve_off_peak() -> None:
    from datetime import datetime

    found = default_price_table().lookup("deepseek-flash")
    assert found is not None
    weekday_morning = datetime.fromisoformat("2026-11-25T09:30:00+08:00")
    saturday_morning = datetime.fromisoformat("2026-11-28T09:30:00+08:00")
    assert found[1].at(weekday_morning).input == pytest.approx(0.30)
    assert found[1].at(saturday_morning).input == pytest.approx(0.15)
    assert found[1].at(saturday_morning).cached_input == pytest.approx(0.003)
