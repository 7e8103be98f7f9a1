"""The proxy's notes on one request while it passes: filled in by the relay, turned into the
frozen `UsageRecord` (tallygate.core.record) when the request has ended."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from tallygate.core.dialects import ApiFamily, Usage
from tallygate.core.meter import RequestFacts, ResponseFacts, ResponseMeter
from tallygate.core.pricing import Cost
from tallygate.core.record import (
    NO_COST,
    Estimated,
    Outcome,
    Timings,
    TokensSource,
    Traffic,
    UsageRecord,
    billed_tokens,
    since,
)
from tallygate.policy.cors import CorsPolicy


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
    family: ApiFamily = "openai"  # whose error shape the client gets
    user: str | None = None
    session: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    key_id: str | None = None
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

    def end(self, outcome: Outcome, error_reason: str | None = None) -> None:
        """Note what ended the request, as the relay saw it. The record's outcome is decided
        from it once the request is over, by `outcome_of`."""
        self.outcome = outcome
        if error_reason is not None:
            self.error_reason = error_reason

    def tokens(self) -> tuple[Usage, TokensSource]:
        response = self.response
        return billed_tokens(
            reached_upstream=self.reached_upstream,
            upstream_status=self.upstream_status,
            finished=self.outcome == "ok" or bool(response is not None and response.finish_reason),
            request=self.request,
            response=response,
        )

    def model(self) -> str | None:
        """The model the upstream reported, else the one requested."""
        reported = self.response.model if self.response else None
        return reported or (self.request.model if self.request else None)

    def answered_id(self) -> str:
        """The id every response carries in `X-Request-Id`: the client's, else tallygate's."""
        return self.client_request_id or self.request_id

    def record(self) -> UsageRecord:
        """The frozen record every sink reads, built once when the request has ended."""
        request, response, cost = self.request, self.response, self.cost
        usage, source = self.tokens()
        ended = self.ended if self.ended is not None else self.started
        # Positional, in UsageRecord's field order: a request builds one, and keywords cost
        # twice as much (tests/test_headers.py checks each field lands in its place).
        return UsageRecord(
            self.ts,
            self.request_id,  # request_id
            self.client_request_id,
            self.upstream_request_id,  # upstream_request_id
            self.client_address,
            self.user_agent,  # user_agent
            self.route,
            self.upstream,  # upstream
            self.dialect,
            self.method,  # method
            self.path,
            self.status,  # status
            self.outcome,
            self.stream,  # stream
            self.model(),
            self.tenant,
            self.user,
            self.session,
            self.tags,
            self.key_id,
            usage,  # tokens
            source,  # tokens_source
            Estimated(
                request.estimated_input if request else None,
                response.estimated_output if response else None,
                bool(request and request.estimate_exact),
            ),
            self.delivered_output_tokens,
            bool(request and request.usage_requested),  # usage_requested
            response.finish_reason if response else None,  # finish_reason
            self.rejected_reason,
            tuple(response.upstream_errors) if response else (),  # upstream_errors
            self.metering_errors,
            Traffic(self.client_in, self.client_out, self.upstream_out, self.upstream_in),  # bytes
            self.client_out_uncompressed,
            self.compression_saved(),  # compression_saved_bytes
            self.encoding,
            cost.usd if cost else NO_COST,  # cost_usd
            cost.model_key if cost else None,  # priced_as
            cost.unpriced_tokens if cost else 0,  # unpriced_tokens
            Timings(
                since(self.started, self.first_byte_at),
                since(self.started, self.first_token_at),
                round(ended - self.started, 6),
            ),
            self.error_reason,
        )

    def compression_saved(self) -> int:
        if self.encoding != "gzip":
            return 0
        return max(0, self.client_out_uncompressed - self.client_out_body)
