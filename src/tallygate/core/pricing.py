"""What tokens and traffic cost, in USD. Pure arithmetic on values; the shipped table is read by
`tallygate.config.prices`.

Token prices are USD per 1M tokens. Egress is priced per GB (`gb_bytes` bytes, 2^30 by default)
in monthly volume tiers after a monthly free allowance; the month-to-date volume is state the
caller keeps (see `EgressMeter`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone

from tallygate.core.dialects import Usage

PER_MILLION = 1_000_000
TOKEN_KINDS = ("input", "output", "cached_input", "cache_write_input")
COST_KINDS = (*TOKEN_KINDS, "egress")

# Model names carry dates and versions the table leaves out: gpt-4o-2024-08-06, claude-3-5-sonnet-
# 20240620, claude-sonnet-4-5-20250929, gpt-4o-mini-2024-07-18. The longest table name that the
# reported name starts with (at a `-` boundary) wins, so gpt-4o-mini is not priced as gpt-4o.
_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|latest)$")
# Short snapshot dates (gpt-3.5-turbo-0125, mistral-small-2503) and Anthropic's `-0` aliases
# (claude-sonnet-4-0); a bare `-6` is a newer model (claude-opus-4-6 is not claude-opus-4).
_SNAPSHOT_SUFFIX = re.compile(r"-(\d{4}|0)")


WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_OFFSET = re.compile(r"([+-])(\d{2}):(\d{2})")
_SPAN = re.compile(r"(\d{2}):(\d{2})-(\d{2}):(\d{2})")


@dataclass(frozen=True, slots=True)
class PeakHours:
    """When a provider's peak prices apply: on `days`, within `hours` (`HH:MM-HH:MM`, end not
    included), in local time at `utc_offset` (`+08:00`; a fixed offset, for a provider that
    keeps no daylight saving time). Held as written, so the effective configuration shows it."""

    utc_offset: str
    days: tuple[str, ...]
    hours: tuple[str, ...]

    def covers(self, moment: datetime) -> bool:
        sign, hh, mm = _OFFSET.fullmatch(self.utc_offset).groups()  # type: ignore[union-attr]
        offset = (int(hh) * 60 + int(mm)) * (-1 if sign == "-" else 1)
        local = moment.astimezone(timezone(timedelta(minutes=offset)))
        if WEEKDAYS[local.weekday()] not in self.days:
            return False
        minute = local.hour * 60 + local.minute
        for span in self.hours:
            h1, m1, h2, m2 = (int(x) for x in _SPAN.fullmatch(span).groups())  # type: ignore[union-attr]
            if h1 * 60 + m1 <= minute < h2 * 60 + m2:
                return True
        return False


@dataclass(frozen=True, slots=True)
class TokenPrice:
    input: float
    output: float
    cached_input: float | None = None
    cache_write_input: float | None = None
    # A provider that prices by time of day: these prices are the peak ones, `off_peak` applies
    # outside `peak`, judged at the moment the request arrived.
    off_peak: TokenPrice | None = None
    peak: PeakHours | None = None

    def at(self, moment: datetime | float | None) -> TokenPrice:
        """The prices in force at `moment` (a datetime, or Unix time; the peak prices when it
        is not known)."""
        if self.off_peak is None or self.peak is None or moment is None:
            return self
        if not isinstance(moment, datetime):
            moment = datetime.fromtimestamp(moment, UTC)
        return self if self.peak.covers(moment) else self.off_peak

    def cost(self, usage: Usage) -> dict[str, float]:
        """USD by kind. `usage.input` includes cached and cache-written tokens (normalized)."""
        cached = usage.cached_input
        written = usage.cache_write_input
        fresh = max(0, usage.input - cached - written)
        cached_price = self.input if self.cached_input is None else self.cached_input
        write_price = self.input if self.cache_write_input is None else self.cache_write_input
        return {
            "input": fresh * self.input / PER_MILLION,
            "output": usage.output * self.output / PER_MILLION,
            "cached_input": cached * cached_price / PER_MILLION,
            "cache_write_input": written * write_price / PER_MILLION,
        }


class PriceTable:
    def __init__(self, prices: Mapping[str, TokenPrice], date: str = "", source: str = "") -> None:
        self._exact = {k.lower(): (k, v) for k, v in prices.items() if not _is_glob(k)}
        self._globs = [(k.lower(), k, v) for k, v in prices.items() if _is_glob(k)]
        self.date, self.source = date, source
        self._cache: dict[str, tuple[str, TokenPrice] | None] = {}

    def __len__(self) -> int:
        return len(self._exact) + len(self._globs)

    def entries(self) -> dict[str, TokenPrice]:
        return {**{k: v for k, v in self._exact.values()}, **{k: v for _, k, v in self._globs}}

    def lookup(self, model: str | None) -> tuple[str, TokenPrice] | None:
        """(pricing key, price) for a model name as the upstream reports it, or None."""
        if not model:
            return None
        if model in self._cache:
            return self._cache[model]
        found = self._find(model)
        if len(self._cache) < 4096:  # names come from upstreams and clients: bounded
            self._cache[model] = found
        return found

    def _find(self, model: str) -> tuple[str, TokenPrice] | None:
        name = model.lower()
        candidates = [name, name.rsplit("/", 1)[-1]]  # openai/gpt-4o, anthropic/claude-...
        for candidate in candidates:
            if candidate in self._exact:
                return self._exact[candidate]
            best = None
            for key, entry in self._exact.items():
                if candidate.startswith(key + "-") and (best is None or len(key) > len(best[0])):
                    best = (key, entry)
            if best is not None and _only_version_follows(candidate, best[0]):
                return best[1]
            for glob, key, price in self._globs:
                if fnmatch.fnmatchcase(candidate, glob):
                    return key, price
        return None

    def merged(self, overrides: Mapping[str, TokenPrice]) -> PriceTable:
        return PriceTable({**self.entries(), **overrides}, self.date, self.source)


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def _only_version_follows(name: str, key: str) -> bool:
    """`gpt-4o-2024-08-06`, `gpt-3.5-turbo-0125` and `claude-sonnet-4-0` are their key's model;
    `gpt-4o-audio-preview` and `claude-opus-4-6` (a newer model, not a snapshot of
    claude-opus-4) are not priced as it."""
    rest = name[len(key) :]
    return bool(_DATE_SUFFIX.fullmatch(rest) or _SNAPSHOT_SUFFIX.fullmatch(rest))


def parse_token_price(raw: object, path: str) -> TokenPrice:
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with input and output prices")
    known = (*TOKEN_KINDS, "off_peak", "peak")
    unknown = set(raw) - set(known)
    if unknown:
        raise ValueError(f"{path}.{sorted(unknown)[0]}: unknown key (known: {', '.join(known)})")
    values: dict[str, float | None] = {}
    for kind in TOKEN_KINDS:
        value = raw.get(kind)
        if value is None:
            if kind in ("input", "output"):
                raise ValueError(f"{path}.{kind}: required")
            values[kind] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{path}.{kind}: expected USD per 1M tokens (a number >= 0)")
        values[kind] = float(value)
    off_peak, peak = raw.get("off_peak"), raw.get("peak")
    if (off_peak is None) != (peak is None):
        given, missing = ("off_peak", "peak") if peak is None else ("peak", "off_peak")
        raise ValueError(f"{path}.{missing}: required with {given}")
    return TokenPrice(
        input=values["input"] or 0.0,
        output=values["output"] or 0.0,
        cached_input=values["cached_input"],
        cache_write_input=values["cache_write_input"],
        off_peak=parse_token_price(off_peak, f"{path}.off_peak") if off_peak is not None else None,
        peak=_parse_peak(peak, f"{path}.peak") if peak is not None else None,
    )


def _parse_peak(raw: object, path: str) -> PeakHours:
    if not isinstance(raw, dict) or set(raw) != {"utc_offset", "days", "hours"}:
        raise ValueError(f"{path}: expected utc_offset, days and hours")
    offset = raw["utc_offset"]
    if not isinstance(offset, str) or not _OFFSET.fullmatch(offset):
        raise ValueError(f"{path}.utc_offset: expected +HH:MM or -HH:MM, got {offset!r}")
    days = raw["days"]
    if not isinstance(days, list) or not days or any(d not in WEEKDAYS for d in days):
        raise ValueError(f"{path}.days: expected a list of {', '.join(WEEKDAYS)}")
    hours = raw["hours"]
    for i, span in enumerate(hours if isinstance(hours, list) and hours else [None]):
        match = _SPAN.fullmatch(span) if isinstance(span, str) else None
        if match is None or not (0 <= int(match[1]) * 60 + int(match[2])
                                 < int(match[3]) * 60 + int(match[4]) <= 24 * 60):  # fmt: skip
            raise ValueError(f"{path}.hours[{i}]: expected HH:MM-HH:MM, start before end")
    return PeakHours(offset, tuple(days), tuple(hours))


def price_table_age_warning(table_date: str, today: date, max_age_days: int = 90) -> str | None:
    """What `tallygate check` says of a price table dated `table_date` (YYYY-MM-DD) on `today`:
    None while it is at most `max_age_days` old."""
    try:
        dated = date.fromisoformat(table_date)
    except ValueError:
        return f"the price table has no valid date ({table_date!r}): its prices may be out of date"
    age = (today - dated).days
    if age <= max_age_days:
        return None
    return (
        f"the shipped price table is dated {table_date}, {age} days ago (more than "
        f"{max_age_days}): providers may have changed prices and added models since; check "
        "the prices that matter to you against their pages (the sources in "
        "tallygate/data/prices.yaml) and set what differs in pricing.models"
    )


@dataclass(frozen=True, slots=True)
class EgressTier:
    up_to_gb: float | None  # cumulative monthly volume where this tier ends; None: no end
    usd_per_gb: float


@dataclass(frozen=True, slots=True)
class EgressPrice:
    """Tiered by monthly volume: after `free_gb`, the tiers in order (or `usd_per_gb` flat)."""

    usd_per_gb: float = 0.09
    free_gb: float = 0.0
    tiers: tuple[EgressTier, ...] = ()
    gb_bytes: int = 2**30

    def cost(self, month_to_date_bytes: int, new_bytes: int) -> float:
        """USD for `new_bytes` more, given what the month has carried so far."""
        if new_bytes <= 0:
            return 0.0
        start = month_to_date_bytes / self.gb_bytes
        end = (month_to_date_bytes + new_bytes) / self.gb_bytes
        return sum(
            (min(end, high) - max(start, low)) * price
            for low, high, price in self._bands()
            if end > low and start < high
        )

    def _bands(self) -> Iterable[tuple[float, float, float]]:
        low = 0.0
        if self.free_gb > 0:
            yield 0.0, self.free_gb, 0.0
            low = self.free_gb
        for tier in self.tiers:
            high = float("inf") if tier.up_to_gb is None else tier.up_to_gb
            if high > low:
                yield low, high, tier.usd_per_gb
                low = high
        if low != float("inf"):
            yield low, float("inf"), self.usd_per_gb


class EgressMeter:
    """The month-to-date egress volume of this process, and the cost of each new transfer.

    The clock is the caller's (a `YYYY-MM` key), so the arithmetic stays testable.
    """

    def __init__(self, price: EgressPrice) -> None:
        self.price = price
        self.month = ""
        self.month_bytes = 0

    def charge(self, month: str, new_bytes: int) -> float:
        if month != self.month:
            self.month, self.month_bytes = month, 0
        cost = self.price.cost(self.month_bytes, new_bytes)
        self.month_bytes += new_bytes
        return cost


@dataclass(frozen=True, slots=True)
class Cost:
    model_key: str | None  # the pricing key the model matched, None when unpriced
    usd: dict[str, float]  # by COST_KINDS, plus "total"
    unpriced_tokens: int
    first_unpriced: bool = False  # the first tokens this process saw of this unpriced model


class UnpricedModels:
    """The unpriced model names that have had tokens, so each is reported once per process.

    Bounded, as names come from upstreams and clients: past `limit` names, no more reports
    (the tokens are still counted in tallygate_unpriced_tokens_total).
    """

    def __init__(self, limit: int = 1000) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def first(self, model: str | None) -> bool:
        name = model or ""
        if name in self._seen or len(self._seen) >= self.limit:
            return False
        self._seen.add(name)
        return True


class Costing:
    """Prices one exchange's tokens and traffic."""

    def __init__(
        self,
        table: PriceTable,
        egress: EgressPrice,
        directions: Iterable[str],
        unpriced: UnpricedModels | None = None,
    ) -> None:
        self.table = table
        self.egress = EgressMeter(egress)
        self.directions = tuple(directions)
        # A reload passes the running one on, so a model is reported once per process.
        self.unpriced = UnpricedModels() if unpriced is None else unpriced

    def cost(
        self,
        model: str | None,
        usage: Usage,
        wire: Mapping[str, int],
        month: str,
        at: datetime | float | None = None,
    ) -> Cost:
        """What a request cost: its tokens at the prices in force `at` (when it arrived), its
        traffic at the egress tier `month` has reached."""
        found = self.table.lookup(model)
        usd = dict.fromkeys(COST_KINDS, 0.0)
        unpriced = 0
        if found is None:
            unpriced = usage.input + usage.output
        else:
            usd.update(found[1].at(at).cost(usage))
        usd["egress"] = self.egress.charge(month, sum(wire[d] for d in self.directions))
        usd["total"] = sum(usd[kind] for kind in COST_KINDS)
        first = unpriced > 0 and self.unpriced.first(model)
        return Cost(found[0] if found else None, usd, unpriced, first)
