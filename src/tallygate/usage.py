"""The usage record: what one request cost, built from what the relay and the meter observed.

Pure: the relay fills an `Exchange` as the request passes; `record()` turns it into the JSON
object written to the access log (documented field by field in docs/usage-record.md).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from .cors import CorsPolicy
from .dialects import Usage
from .metering import RequestFacts, ResponseFacts, ResponseMeter
from .pricing import COST_KINDS, Cost

if TYPE_CHECKING:  # the relay's bookkeeping only: the record itself needs no event loop
    import asyncio

# How a request ended: the record's `outcome` and the metrics' `outcome` label (docs/metrics.md).
Outcome = Literal[
    "ok", "upstream_status", "client_disconnect", "client_timeout", "upstream_error", "timeout",
    "rejected", "shutdown",
]  # fmt: skip
TokensSource = Literal["reported", "estimated", "mixed", "none"]


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


@dataclass(slots=True)
class Exchange:
    request_id: str  # tallygate's own, unique
    method: str
    path: str
    started: float  # the event loop's clock
    ts: float = 0.0  # when the request arrived (Unix time): the relay's clock, set by it
    route: str = ""
    upstream: str = ""
    dialect: str = "none"
    status: int = 0
    outcome: Outcome = "ok"
    tenant: str = "anonymous"
    encoding: str = "identity"
    stream: bool = False
    client_in: int = 0
    client_out: int = 0
    upstream_out: int = 0
    upstream_in: int = 0
    client_out_uncompressed: int = 0
    first_byte_at: float | None = None
    first_token_at: float | None = None
    ended: float | None = None
    request: RequestFacts | None = None
    response: ResponseFacts | None = None
    delivered_output_tokens: int | None = None
    metering_errors: dict[str, int] = field(default_factory=dict)
    detached: bool = False  # handed to a drain task, which writes the record
    reached_upstream: bool = False  # the request may have been processed: tokens can count
    client_out_body: int = 0  # response body bytes as sent (after gzip)
    error_reason: str | None = None  # why the upstream failed (metrics' reason label)
    rejected_reason: str | None = None  # why tallygate refused the request (its error code)
    client_request_id: str | None = None  # the client's X-Request-Id, when it is a sane one
    client_address: str | None = None  # the peer, or the client behind trusted proxies
    user_agent: str | None = None  # the client's User-Agent, at most USER_AGENT_CHARS
    upstream_request_id: str | None = None  # the provider's id for the request, if it sent one
    streaming_counted: bool = False  # in tallygate_streams_active
    cors: tuple[CorsPolicy, str] | None = None  # a cross-origin request's policy and origin
    counting: asyncio.Future[None] | None = None  # a long prompt being counted in a thread
    output_meter: ResponseMeter | None = None  # a long answer, its text to count in a thread
    cost: Cost | None = None
    upstream_status: int = 0  # the upstream's own status, once its head arrived; 0: none came

    def final_outcome(self) -> Outcome:
        """`ok` is a request served: an upstream's error status (4xx, 5xx) relayed whole ends
        as `upstream_status`. An outcome already set (the client left, a timeout, a broken
        body) says how the request ended, and stays."""
        if self.outcome == "ok" and self.upstream_status >= 400:
            return "upstream_status"
        return self.outcome

    def tokens(self) -> tuple[Usage, TokensSource]:
        """Reported usage when the stream reported it whole; estimates where it did not."""
        response, request = self.response, self.request
        if not self.reached_upstream:
            return Usage(), "none"  # refused, or the upstream never had it: nothing to bill
        reported = response.usage if response else None
        if self.upstream_status and not billable(self.upstream_status):
            # A failed or refused request: what the provider says it counted, or nothing. The
            # estimates stay in the record's `estimated`, out of tokens, metrics and cost.
            return (reported, "reported") if reported is not None else (Usage(), "none")
        estimated_in = request.estimated_input if request else None
        estimated_out = response.estimated_output if response else None
        if reported is not None:
            finished = self.outcome == "ok" or (response is not None and response.finish_reason)
            if finished:
                return reported, "reported"
            # Cut short: the input was reported up front (Anthropic's message_start), the
            # output count is still running; what passed is our best knowledge of it.
            output = max(reported.output, estimated_out or 0)
            return Usage(reported.input, output, reported.cached_input,
                         reported.cache_write_input, reported.reasoning), "mixed"  # fmt: skip
        if estimated_in is not None or estimated_out is not None:
            return Usage(estimated_in or 0, estimated_out or 0), "estimated"
        return Usage(), "none"

    def model(self) -> str | None:
        """The model the upstream reported, else the one requested."""
        reported = self.response.model if self.response else None
        return reported or (self.request.model if self.request else None)

    def answered_id(self) -> str:
        """The id every response carries in `X-Request-Id`: the client's, else tallygate's."""
        return self.client_request_id or self.request_id

    def record(self) -> dict[str, Any]:
        request, response = self.request, self.response
        usage, source = self.tokens()
        ended = self.ended if self.ended is not None else self.started
        model = self.model()
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
            "model": model,
            "tenant": self.tenant,
            "tokens": {
                "input": usage.input,
                "output": usage.output,
                "cached_input": usage.cached_input,
                "cache_write_input": usage.cache_write_input,
                "reasoning": usage.reasoning,
            },
            "tokens_source": source,
            "estimated": {
                "input": request.estimated_input if request else None,
                "output": response.estimated_output if response else None,
                "exact_tokenizer": bool(request and request.estimate_exact),
            },
            "delivered_output_tokens": self.delivered_output_tokens,
            "usage_requested": bool(request and request.usage_requested),
            "finish_reason": response.finish_reason if response else None,
            "rejected_reason": self.rejected_reason,
            "upstream_errors": response.upstream_errors if response else [],
            "metering_errors": self.metering_errors,
            "bytes": {
                "client_in": self.client_in,
                "client_out": self.client_out,
                "upstream_out": self.upstream_out,
                "upstream_in": self.upstream_in,
            },
            "client_out_uncompressed": self.client_out_uncompressed,
            "compression_saved_bytes": self.compression_saved(),
            "encoding": self.encoding,
            "cost_usd": dict(self.cost.usd if self.cost else _NO_COST),
            "priced_as": self.cost.model_key if self.cost else None,
            "unpriced_tokens": self.cost.unpriced_tokens if self.cost else 0,
            "timings": {
                "ttfb_s": _since(self.started, self.first_byte_at),
                "ttft_s": _since(self.started, self.first_token_at),
                "duration_s": round(ended - self.started, 6),
            },
        }

    def compression_saved(self) -> int:
        if self.encoding != "gzip":
            return 0
        return max(0, self.client_out_uncompressed - self.client_out_body)


_NO_COST = {**dict.fromkeys(COST_KINDS, 0.0), "total": 0.0}


def _since(start: float, moment: float | None) -> float | None:
    return None if moment is None else round(moment - start, 6)


def _iso(ts: float) -> str:
    seconds = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{seconds}.{int(ts % 1 * 1000):03d}Z"


USER_AGENT_CHARS = 256  # a User-Agent is recorded up to this; longer ones are cut

# A request id a client may choose: 1 to 200 visible ASCII characters (UUIDs, `req_...`). Any
# other value is not kept: it would go back in a response header and into every sink.
_SANE_ID = re.compile(r"[\x21-\x7e]{1,200}")


def sane_request_id(value: str | None) -> str | None:
    return value if value is not None and _SANE_ID.fullmatch(value) else None
