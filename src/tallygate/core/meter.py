"""Metering of one exchange: the request's facts, then the response fed chunk by chunk.

Pure: fed bytes, it returns values; it never touches a socket or a clock. It fails open: an
exception inside it is caught here, counted by stage in `errors`, and metering of that exchange
stops (framing) or skips the event (a malformed event), while the stream goes on untouched.
"""

from __future__ import annotations

import codecs
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from tallygate.core.codec import media_type
from tallygate.core.dialects import Dialect, Extractor, Usage, extractor_for, spec
from tallygate.core.framing import (
    DEFAULT_MAX_EVENT_BYTES,
    EventTooLarge,
    NdjsonFramer,
    NdjsonLine,
    SseEvent,
    SseFramer,
)
from tallygate.core.prompt import PromptEstimator
from tallygate.core.tokens import TokenCounter, Tokenizers

log = logging.getLogger("tallygate.core.meter")


@dataclass(frozen=True, slots=True)
class MeteringSettings:
    estimate: bool = True
    request_usage: bool = True
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    image_tokens_default: int = 765


@dataclass(slots=True)
class RequestFacts:
    """What the request body says, and the body to send upstream (rewritten at most once)."""

    body: bytes
    model: str | None = None
    stream: bool | None = None
    usage_requested: bool = False  # tallygate added include_usage: strip the usage-only chunk
    # include_usage is still to be inserted into `body` (with_usage_option): the relay does it
    # in a step of its own, as a long body's copy takes milliseconds.
    insert_usage_option: bool = False
    estimated_input: int | None = None
    estimate_exact: bool = False
    tools_offered: bool = False
    # The parsed body, kept until the prompt is estimated: that is done when the exchange ends,
    # so that encoding a long prompt never delays the request on its way upstream.
    parsed: dict[str, Any] | None = None
    parsed_size: int = 0  # the JSON it was parsed from, in bytes (decoded, if content-coded)
    # The fields the APIs define to say who a request is for (attribution reads them).
    identity_fields: dict[str, Any] | None = None


def read_request(
    dialect: Dialect,
    body: bytes,
    tokenizers: Tokenizers | None,
    settings: MeteringSettings,
    errors: dict[str, int],
    request_id: str = "",
    plain: bytes | None = None,
) -> RequestFacts:
    """What `body` says, and the body to send upstream. `plain` is a content-coded body's
    decoded copy: metered, never sent, so nothing is added to the body then."""
    facts = RequestFacts(body)
    if dialect == "none" or not body:
        return facts
    source = body if plain is None else plain
    utf8 = _as_utf8(source)
    if utf8 is not source:  # another encoding, or a BOM: metered as read, never rewritten
        source, plain = utf8, utf8
    try:
        request: Any = orjson.loads(source)
    except orjson.JSONDecodeError:
        errors["request"] = errors.get("request", 0) + 1  # forwarded all the same
        return facts
    if not isinstance(request, dict):
        return facts
    model = request.get("model")
    facts.model = model if isinstance(model, str) else None
    if "user" in request or "metadata" in request or "safety_identifier" in request:
        facts.identity_fields = {
            k: request[k] for k in ("user", "safety_identifier", "metadata") if k in request
        }
    facts.tools_offered = bool(request.get("tools") or request.get("functions"))
    stream = request.get("stream")
    facts.stream = stream is not False if spec(dialect).streams_unless_told else stream is True
    if settings.estimate and tokenizers is not None:
        facts.parsed, facts.parsed_size = request, len(source)
    if settings.request_usage and facts.stream and spec(dialect).usage_option and plain is None:
        options = request.get("stream_options")
        if "stream_options" not in request:
            facts.insert_usage_option = facts.usage_requested = True
        elif options is None or (isinstance(options, dict) and "include_usage" not in options):
            request["stream_options"] = {**(options or {}), "include_usage": True}
            facts.body = orjson.dumps(request)
            facts.usage_requested = True
    return facts


def _as_utf8(body: bytes) -> bytes:
    """JSON as UTF-8 without a byte-order mark, which orjson requires: parsers may accept a BOM
    and the UTF-16 and UTF-32 that some clients still send (RFC 8259 section 8.1), and so does
    tallygate's meter. `body` itself when it is plain UTF-8 already (or undecodable)."""
    if body.startswith(codecs.BOM_UTF8):
        return body[3:]
    if body[:4] in (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE):
        encoding = "utf-32"
    elif body[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        encoding = "utf-16"
    elif len(body) >= 2 and body[0] and not body[1]:
        encoding = "utf-16-le"  # "{" then a 0 byte: UTF-16 without a mark
    elif len(body) >= 2 and not body[0] and body[1]:
        encoding = "utf-16-be"
    else:
        return body
    try:
        return body.decode(encoding).encode()
    except (UnicodeDecodeError, UnicodeEncodeError):
        return body


_USAGE_OPTION = b'"stream_options":{"include_usage":true},'


def with_usage_option(body: bytes) -> bytes:
    """The body as the client sent it, with the usage option as the object's first member:
    re-serializing would change the client's bytes (spacing, escapes, number spelling). The
    object has members (`stream` at least), so a comma follows."""
    start = body.index(b"{") + 1
    return body[:start] + _USAGE_OPTION + body[start:]


def estimate_input(
    facts: RequestFacts,
    dialect: Dialect,
    tokenizers: Tokenizers | None,
    settings: MeteringSettings,
    errors: dict[str, int],
    request_id: str = "",
) -> None:
    """The prompt's estimated tokens, from the body read_request parsed (then let go)."""
    request, facts.parsed = facts.parsed, None
    if request is None or tokenizers is None:
        return
    try:
        chosen = tokenizers.for_model(facts.model)
        estimator = PromptEstimator(chosen.encoding, settings.image_tokens_default)
        facts.estimated_input = estimator.estimate(dialect, request, facts.model)
        facts.estimate_exact = chosen.exact
    except Exception:
        errors["prompt"] = errors.get("prompt", 0) + 1
        log.exception("request %s: prompt estimate failed", request_id)


@dataclass(slots=True)
class ResponseFacts:
    model: str | None = None
    usage: Usage | None = None
    finish_reason: str | None = None
    upstream_errors: list[str] = field(default_factory=list)
    estimated_output: int | None = None
    output_text_seen: bool = False


class ResponseMeter:
    """Fed the response body (plain bytes) as it passes, in two steps, so that bytes go out to
    the client before they are metered:

    - `relay(chunk)` returns what the client is to receive: the chunk itself, or with
      `strip_usage_chunk`, its complete events without the usage-only chunk tallygate asked for;
    - `settle()` meters what was relayed, once it is on its way.

    `feed(chunk)` does both, for callers with nothing to send in between.
    """

    def __init__(
        self,
        dialect: Dialect,
        content_type: str | None,
        tokenizers: Tokenizers | None,
        settings: MeteringSettings,
        requested_model: str | None,
        errors: dict[str, int],
        strip_usage_chunk: bool = False,
        request_id: str = "",
        tools_offered: bool = False,
    ) -> None:
        self._request_id = request_id
        self._tools_offered = tools_offered
        kind = media_type(content_type)
        ndjson = kind in ("application/x-ndjson", "application/jsonl")
        self.is_stream = kind == "text/event-stream" or ndjson
        self._json_body = kind == "application/json" or kind.endswith("+json")
        self._active = dialect != "none" and (self.is_stream or self._json_body)
        self._framer: SseFramer | NdjsonFramer | None = None
        if self._active and self.is_stream:  # a plain relay frames nothing
            self._framer = (NdjsonFramer if ndjson else SseFramer)(settings.max_event_bytes)
        self._body: list[bytes] = []
        self._body_size = 0
        self._max = settings.max_event_bytes
        self._strip = strip_usage_chunk and isinstance(self._framer, SseFramer)
        self._errors = errors
        self._tokenizers = tokenizers if settings.estimate else None
        self._requested_model = requested_model
        self._counters: dict[str, TokenCounter] = {}
        self._dialect = dialect
        self._extractor: Extractor = extractor_for(dialect)
        self._unmetered: list[bytes] = []  # relayed, not yet metered (when not stripping)
        self._queued: list[SseEvent | NdjsonLine] = []  # the same, framed (when stripping)
        self.text_seen = False
        self._closed = False

    @property
    def strips(self) -> bool:
        return self._strip

    def _count(self) -> None:
        """Count the text the last events carried: one feed per channel and read."""
        if not self._extractor.texts:
            return
        texts = self._extractor.take_texts()
        self.text_seen = True
        if self._tokenizers is None:
            return
        for channel, pieces in texts.items():
            counter = self._counters.get(channel)
            if counter is None:
                model = self._extractor.model or self._requested_model
                encoding = self._tokenizers.for_model(model).encoding
                counter = self._counters[channel] = TokenCounter(encoding)
            counter.feed(pieces[0] if len(pieces) == 1 else "".join(pieces))

    def relay(self, chunk: bytes) -> bytes:
        """What the client is to receive of `chunk`; it is metered by the next `settle()`."""
        if not self._active:
            return chunk
        if not self._strip or self._framer is None:
            self._unmetered.append(chunk)
            return chunk
        try:
            events = self._framer.feed(chunk)
        except EventTooLarge as error:
            return self._give_up("framing", error) or b""
        kept = []
        for event in events:
            data = event.data
            # Only an event naming usage can be the usage-only chunk: it is metered now, to
            # decide; the others once they are sent.
            # find(), not `in`: CPython 3.11's bytes `in` raises and clears a TypeError inside.
            if data and data.find(b'"usage"') >= 0:
                if self._event(data, event.event):
                    continue
            else:
                self._queued.append(event)
            kept.append(event.raw)
        return b"".join(kept)

    def settle(self) -> None:
        """Meter every chunk and event relayed since the last call."""
        if self._unmetered:
            chunks, self._unmetered = self._unmetered, []
            for chunk in chunks:
                self._meter(chunk)
        if self._queued:
            queued, self._queued = self._queued, []
            for event in queued:
                self._event(event.data, event.event)
        self._count()

    def feed(self, chunk: bytes) -> bytes:
        relayed = self.relay(chunk)
        self.settle()
        return relayed

    def _meter(self, chunk: bytes) -> None:
        if not self._active:  # given up on an earlier chunk
            return
        if self._framer is None:
            self._collect(chunk)
            return
        framer = self._framer
        datas: list[bytes] = []
        events: list[SseEvent] | list[NdjsonLine]
        try:
            if isinstance(framer, SseFramer):
                datas, events = framer.feed_data(chunk)
            else:
                events = framer.feed(chunk)
        except EventTooLarge as error:
            self._give_up("framing", error)
            return
        meter = self._event
        for data in datas:  # single data lines: no event name
            meter(data, None)
        for event in events:
            meter(event.data, event.event)

    def close(self) -> bytes:
        """The end of the body: what the client still has to receive (when stripping). A
        second call meters nothing twice (a JSON answer is read here)."""
        self.settle()
        if not self._active or self._closed:
            return b""
        self._closed = True
        if self._framer is None:
            if self._body:
                try:
                    self._extractor.body(b"".join(self._body))
                except Exception as error:  # a malformed body: counted, the relay is done
                    self._count_error("dialect", error)
                self._count()
            return b""
        kept = [e.raw for e in self._framer.close() if not self._event(e.data, e.event)]
        self._count()
        return b"".join(kept) if self._strip else b""

    def _event(self, data: bytes | None, name: str | None) -> bool:
        """Meter one event's data; True when it is the usage-only chunk to strip."""
        if not data:  # a comment, or an empty data line: nothing to meter
            return False
        try:
            return self._extractor.event(data, name) and self._strip
        except Exception as error:  # a malformed event: count it, meter the rest
            self._count_error("dialect", error)
            return False

    def _collect(self, chunk: bytes) -> None:
        self._body_size += len(chunk)
        if self._body_size > self._max:
            self._give_up("framing", EventTooLarge(f"JSON body exceeds {self._max} bytes", []))
            return
        self._body.append(chunk)

    def _give_up(self, stage: str, error: EventTooLarge) -> bytes | None:
        """Stop metering this exchange; hand back every byte not yet relayed."""
        self._count_error(stage, error)
        self._active = False
        self._body.clear()
        if not self._strip:
            return None
        pending = self._framer.pending if self._framer is not None else b""
        return b"".join(event.raw for event in error.events) + pending

    def _count_error(self, stage: str, error: Exception) -> None:
        self._errors[stage] = self._errors.get(stage, 0) + 1
        if self._errors[stage] == 1:  # once per request and stage; the count says the rest
            log.warning(
                "request %s: metering %s error: %s: %s",
                self._request_id, stage, type(error).__name__, error,
            )  # fmt: skip

    def output_estimate(self) -> int | None:
        """Output tokens counted so far, in what was settled (a chunk whose sending failed is
        not); None when not estimated (off, or not an LLM API)."""
        if self._tokenizers is None or self._dialect == "none":
            return None
        return sum(counter.total() for counter in self._counters.values()) + self._end_tokens()

    def _end_tokens(self) -> int:
        """The end-of-turn token OpenAI bills with a finished text answer, though it is never
        sent: always in the Responses API, and in Chat Completions when the request offered
        tools (every text-only OpenAI case in the corpus shows it; none contradicts it)."""
        if self._extractor.finish_reason is None:
            return 0
        if self._dialect == "openai_responses" or (
            self._dialect == "openai_chat" and self._tools_offered
        ):
            return sum(1 for channel in self._counters if channel.startswith("content:"))
        return 0

    @property
    def uncounted(self) -> int:
        """Characters of output text not counted yet (`output_estimate` encodes them)."""
        return sum(counter.pending for counter in self._counters.values())

    def facts(self, count_output: bool = True) -> ResponseFacts:
        """What the response said; without `count_output`, no output estimate yet (the caller
        sets it from `output_estimate()`, off the event loop)."""
        self.settle()
        extractor = self._extractor
        return ResponseFacts(
            model=extractor.model,
            usage=extractor.usage,
            finish_reason=extractor.finish_reason,
            upstream_errors=list(extractor.errors),
            estimated_output=self.output_estimate() if count_output else None,
            output_text_seen=self.text_seen,
        )
