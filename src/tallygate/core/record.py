"""The usage record: what one request cost, once it has ended.

Pure. The proxy keeps its notes on a request in an `Exchange` (tallygate.proxy.exchange) and,
when the request ends, builds one frozen `UsageRecord` from them; every sink (the access log,
the metrics, the ledger) reads that record. `UsageRecord.as_dict()` is the JSON object written
to the access log, documented field by field in docs/usage-record.md. The rules for which
tokens a request is billed for live here (`billed_tokens`), so every sink bills alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, NamedTuple

from tallygate.core.dialects import Usage
from tallygate.core.meter import RequestFacts, ResponseFacts
from tallygate.core.pricing import COST_KINDS

# How a request ended: the record's `outcome` and the metrics' `outcome` label (docs/metrics.md).
Outcome = Literal[
    "ok", "upstream_status", "client_disconnect", "client_timeout", "upstream_error", "timeout",
    "rejected", "shutdown",
]  # fmt: skip
TokensSource = Literal["reported", "estimated", "mixed", "none"]


def outcome_of(noted: Outcome, upstream_status: int) -> Outcome:
    """The record's outcome, the one place it is decided. `ok` is a request served: an
    upstream's error status (4xx, 5xx) relayed whole ends as `upstream_status`. What the relay
    noted otherwise (the client left, a timeout, a broken body, a refusal) says how the request
    ended, and stays."""
    if noted == "ok" and upstream_status >= 400:
        return "upstream_status"
    return noted


def billable(status: int) -> bool:
    """Whether an upstream's answer is billed from tallygate's estimates: a success (2xx).
    Any other answer (an error, a redirect) is billed only for the usage the provider reported
    in it (docs/metering.md)."""
    return 200 <= status < 300


def head_size(start_line: str, headers: Iterable[tuple[str, str]]) -> int:
    """Bytes of an HTTP/1.1 head as aiohttp serializes it: start line, `Name: value` lines,
    blank line.

    A header byte above 0x7F that a client sent (obs-text) reaches us as a lone surrogate
    (aiohttp decodes heads with surrogateescape); aiohttp's writer leaves surrogates out, and
    so does this count (strict encoding raised here, and the request ended in a bare 500)."""
    size = len(start_line.encode()) + 2 + 2
    for name, value in headers:
        size += len(name.encode("utf-8", "ignore")) + 2 + len(value.encode("utf-8", "ignore")) + 2
    return size


def received_head_size(start_line: str, raw_headers: Iterable[tuple[bytes, bytes]]) -> int:
    """The same for a head as the parser received it: the headers' own bytes (a byte above
    0x7F counts once, where decoding and re-encoding it would count two), and the start line
    encoded back as aiohttp decoded it (surrogateescape: an upstream's reason phrase may hold
    such bytes too)."""
    line = len(start_line.encode("utf-8", "surrogateescape"))
    return line + 4 + sum(len(k) + len(v) + 4 for k, v in raw_headers)


def billed_tokens(
    *,
    reached_upstream: bool,
    upstream_status: int,
    finished: bool,
    request: RequestFacts | None,
    response: ResponseFacts | None,
) -> tuple[Usage, TokensSource]:
    """The tokens a request is billed for: reported usage when the provider reported it whole,
    estimates where it did not, nothing for what the provider never had or did not bill.
    `finished`: the request ended as served, or the answer said why it stopped."""
    if not reached_upstream:
        return Usage(), "none"  # refused, or the upstream never had it: nothing to bill
    reported = response.usage if response else None
    if upstream_status and not billable(upstream_status):
        # A failed or refused request: what the provider says it counted, or nothing. The
        # estimates stay in the record's `estimated`, out of tokens, metrics and cost.
        return (reported, "reported") if reported is not None else (Usage(), "none")
    estimated_in = request.estimated_input if request else None
    estimated_out = response.estimated_output if response else None
    if reported is not None:
        if finished:
            return reported, "reported"
        # Cut short: the input was reported up front (Anthropic's message_start), the output
        # count is still running; what passed is our best knowledge of it.
        output = max(reported.output, estimated_out or 0)
        return Usage(reported.input, output, reported.cached_input,
                     reported.cache_write_input, reported.reasoning), "mixed"  # fmt: skip
    if estimated_in is not None or estimated_out is not None:
        return Usage(estimated_in or 0, estimated_out or 0), "estimated"
    return Usage(), "none"


class Estimated(NamedTuple):
    """tallygate's own counts, kept whether or not they are billed."""

    input: int | None
    output: int | None
    exact_tokenizer: bool  # counted with the model's own tokenizer


DIRECTIONS = ("client_in", "client_out", "upstream_out", "upstream_in")  # Traffic's fields


class Traffic(NamedTuple):
    """Bytes on the wire, headers included, by direction."""

    client_in: int
    client_out: int
    upstream_out: int
    upstream_in: int

    def as_dict(self) -> dict[str, int]:
        return {
            "client_in": self.client_in, "client_out": self.client_out,
            "upstream_out": self.upstream_out, "upstream_in": self.upstream_in,
        }  # fmt: skip


class Timings(NamedTuple):
    ttfb_s: float | None  # to the upstream's first response byte
    ttft_s: float | None  # to the first output token
    duration_s: float


class UsageRecord(NamedTuple):
    """One request, ended: what every sink reads. Field by field in docs/usage-record.md.

    Immutable; a NamedTuple rather than a frozen dataclass because one is built for every
    request, and a frozen dataclass of this size costs three times as much to build."""

    ts: float  # when the request arrived (Unix time)
    request_id: str
    client_request_id: str | None
    upstream_request_id: str | None
    client_address: str | None
    user_agent: str | None
    route: str
    upstream: str
    dialect: str
    method: str
    path: str
    status: int
    outcome: Outcome
    stream: bool
    model: str | None
    tenant: str
    user: str | None  # the end user, from the attribution sources
    session: str | None
    tags: tuple[tuple[str, str], ...]
    key_id: str | None  # which tallygate key, by a short id
    tokens: Usage
    tokens_source: TokensSource
    estimated: Estimated
    delivered_output_tokens: int | None
    usage_requested: bool
    finish_reason: str | None
    rejected_reason: str | None
    upstream_errors: tuple[str, ...]
    metering_errors: Mapping[str, int]
    bytes: Traffic
    client_out_uncompressed: int
    compression_saved_bytes: int
    encoding: str
    cost_usd: Mapping[str, float]
    priced_as: str | None
    unpriced_tokens: int
    timings: Timings
    error_reason: str | None = None  # why the upstream failed (metrics' reason label only)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of docs/usage-record.md."""
        tokens, estimated, timings = self.tokens, self.estimated, self.timings
        return {
            "ts": _iso(self.ts),
            "request_id": self.request_id,
            "client_request_id": self.client_request_id,
            "upstream_request_id": self.upstream_request_id,
            "client_address": self.client_address,
            "user_agent": self.user_agent,
            "route": self.route,
            "upstream": self.upstream,
            "dialect": self.dialect,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "outcome": self.outcome,
            "stream": self.stream,
            "model": self.model,
            "tenant": self.tenant,
            "user": self.user,
            "session": self.session,
            "tags": dict(self.tags),
            "key_id": self.key_id,
            "tokens": {
                "input": tokens.input,
                "output": tokens.output,
                "cached_input": tokens.cached_input,
                "cache_write_input": tokens.cache_write_input,
                "reasoning": tokens.reasoning,
            },
            "tokens_source": self.tokens_source,
            "estimated": {
                "input": estimated.input,
                "output": estimated.output,
                "exact_tokenizer": estimated.exact_tokenizer,
            },
            "delivered_output_tokens": self.delivered_output_tokens,
            "usage_requested": self.usage_requested,
            "finish_reason": self.finish_reason,
            "rejected_reason": self.rejected_reason,
            "upstream_errors": list(self.upstream_errors),
            "metering_errors": self.metering_errors,
            "bytes": self.bytes.as_dict(),
            "client_out_uncompressed": self.client_out_uncompressed,
            "compression_saved_bytes": self.compression_saved_bytes,
            "encoding": self.encoding,
            "cost_usd": dict(self.cost_usd),
            "priced_as": self.priced_as,
            "unpriced_tokens": self.unpriced_tokens,
            "timings": {
                "ttfb_s": timings.ttfb_s,
                "ttft_s": timings.ttft_s,
                "duration_s": timings.duration_s,
            },
        }


NO_COST = {**dict.fromkeys(COST_KINDS, 0.0), "total": 0.0}


def since(start: float, moment: float | None) -> float | None:
    return None if moment is None else round(moment - start, 6)


def _iso(ts: float) -> str:
    """`2026-11-25T09:47:20.821Z`. The seconds are formatted once per second (it costs more
    than the rest of the record), the milliseconds every time."""
    second = int(ts)
    if second != _last_second[0]:
        _last_second[:] = [
            second,
            datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        ]
    return f"{_last_second[1]}.{int(ts % 1 * 1000):03d}Z"


_last_second: list[Any] = [None, ""]


USER_AGENT_CHARS = 256  # a User-Agent is recorded up to this; longer ones are cut

# A request id a client may choose: 1 to 200 visible ASCII characters (UUIDs, `req_...`). Any
# other value is not kept: it would go back in a response header and into every sink.
_SANE_ID = re.compile(r"[\x21-\x7e]{1,200}")


def sane_request_id(value: str | None) -> str | None:
    return value if value is not None and _SANE_ID.fullmatch(value) else None
