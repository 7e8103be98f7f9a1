"""The request handler: moves bytes between the client and the upstream, and nothing more.

Every decision is taken by the pure modules (routing, headers, compression, errors, metering);
this module only awaits sockets, enforces timeouts, keeps the clock, and maps failures to answers.
It must not parse bodies: it hands them to the meter.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import secrets
import socket
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tallygate.compat import bytes_written
from tallygate.config import Config, Timeouts, Upstream
from tallygate.core import errors
from tallygate.core.codec import (
    FlushPolicy,
    GzipEncoder,
    GzipSettings,
    UpstreamDecoder,
    accepts_gzip,
    flush_policy,
    inflate_request,
    is_compressible,
    media_type,
)
from tallygate.core.dialects import ApiFamily, Dialect
from tallygate.core.errors import ProxyError
from tallygate.core.meter import (
    MeteringSettings,
    RequestFacts,
    ResponseFacts,
    ResponseMeter,
    estimate_input,
    read_request,
    with_usage_option,
)
from tallygate.core.pricing import Costing
from tallygate.core.record import (
    USER_AGENT_CHARS,
    UsageRecord,
    head_size,
    outcome_of,
    received_head_size,
    sane_request_id,
)
from tallygate.core.tokens import Tokenizers
from tallygate.observe.accesslog import AccessLog
from tallygate.observe.metrics import Metrics
from tallygate.policy.admission import Admission, Preflight, Refused
from tallygate.policy.attribution import attribute
from tallygate.policy.cors import CorsPolicy
from tallygate.policy.headers import (
    ClientSide,
    client_address,
    client_response_headers,
    upstream_request_headers,
)
from tallygate.policy.routing import Router, upstream_url
from tallygate.policy.tenants import Tenants
from tallygate.proxy.exchange import Exchange

log = logging.getLogger("tallygate.proxy.relay")
Sink = Callable[[UsageRecord], None]  # a finished request's record goes to each
UNPRICED_WARNING = (
    "model %r has no price: its tokens cost 0 in records and metrics (priced_as null, counted in "
    "tallygate_unpriced_tokens_total); set its price in pricing.models (once per model)"
)

_NO_BODY_STATUSES = frozenset({204, 304})
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
_READ_CHUNK = 2**16
# A request body above this is counted off the event loop: tiktoken encodes about a megabyte in
# 50-300 ms (a run of one letter is its worst case), which would pause every other stream.
ESTIMATE_INLINE_BYTES = 64 * 1024
LONG_BODY_BYTES = 2**20


class Watchdog:
    """Cancels the task it guards when a timeout runs out: first byte (until the response headers),
    then idle (no byte from the upstream while tallygate waits for one), a write to the client
    that does not complete (the client stopped reading), and total over everything.

    Noting progress is a float store per read and per write; the timer is re-armed only when it
    fires early, so a stream of thousands of reads costs a handful of timer operations.
    """

    __slots__ = (
        "_deadline", "_handle", "_idle", "_loop", "_task", "_timeouts", "_write_timeout",
        "expired", "last", "writing",
    )  # fmt: skip

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeouts: Timeouts, write_timeout: float
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._loop, self._task, self._timeouts = loop, task, timeouts
        self._write_timeout = write_timeout
        now = loop.time()
        self._deadline = now + timeouts.total
        self._idle: float | None = None
        self.last = now  # the last upstream read (or the end of the last client write)
        self.writing: float | None = None  # since when a client write has been waiting
        self.expired: str | None = None
        self._handle = loop.call_at(self._due(), self._check)

    def headers_received(self) -> None:
        self._idle = self._timeouts.idle
        self.last = self._loop.time()
        # The idle deadline may come before the first-byte one the timer is armed for.
        self._handle.cancel()
        self._handle = self._loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        if self.writing is not None:
            return min(self.writing + self._write_timeout, self._deadline)
        if self._idle is None:
            return min(self.last + self._timeouts.first_byte, self._deadline)
        # A write may start right after any read: look again within the write timeout.
        return min(self.last + min(self._idle, self._write_timeout), self._deadline)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self._deadline:
            self.expired = "total"
        elif self.writing is not None:
            # Blocked on the client: the upstream's silence is not the upstream's fault.
            if now < self.writing + self._write_timeout:
                self._handle = self._loop.call_at(self._due(), self._check)
                return
            self.expired = "write"
        else:
            wait = self._timeouts.first_byte if self._idle is None else self._idle
            if now < self.last + wait:
                self._handle = self._loop.call_at(self._due(), self._check)
                return
            self.expired = "first_byte" if self._idle is None else "idle"
        self._task.cancel()

    def seconds(self) -> float:
        if self.expired == "write":
            return self._write_timeout
        return float(getattr(self._timeouts, self.expired or "total"))

    def stop(self) -> None:
        self._handle.cancel()


class Proxy:
    """The proxy listener's handler, with the one shared upstream session."""

    def __init__(
        self,
        config: Config,
        session: aiohttp.ClientSession,
        tokenizers: Tokenizers | None,
        access_log: AccessLog,
        metrics: Metrics,
        costing: Costing,
        on_record: Sink | None = None,
        ledger: Sink | None = None,
    ) -> None:
        self.metrics = metrics
        self.ledger = ledger
        self.session = session
        self.access_log = access_log
        self.on_record = on_record
        self.configure(config, tokenizers, costing)
        self.draining = False
        self.active = 0
        self.records = 0
        self._drains: set[asyncio.Task[None]] = set()
        self._estimates: set[asyncio.Future[None]] = set()
        self._estimator: ThreadPoolExecutor | None = None
        # Request ids: a random prefix for this process (drawn after a worker's fork) and a
        # counter, unique across workers, replicas and restarts.
        self._id_prefix = secrets.token_hex(6)
        self._request_ids = itertools.count(1)
        self._loop = asyncio.get_event_loop()

    def configure(self, config: Config, tokenizers: Tokenizers | None, costing: Costing) -> None:
        """Take a configuration: at start, and on reload (SIGHUP). Requests in flight keep the
        upstream and settings they started with; the next ones get these."""
        self.config = config
        self.costing = costing
        self.tenants = Tenants(
            {name: tenant.keys for name, tenant in config.tenants.items()},
            config.tenant_header,
            config.require_key,
        )
        self.router = Router(config.routes)
        self.admission = Admission(config, self.router, self.tenants)
        self.tokenizers = tokenizers
        self.gzip = GzipSettings(
            config.compression.level, config.compression.window_bits, config.compression.mem_level
        )
        m = config.metering
        self.metering = MeteringSettings(
            estimate=m.estimate and tokenizers is not None,
            request_usage=m.request_usage,
            max_event_bytes=m.max_event_bytes,
            image_tokens_default=m.image_tokens_default,
        )
        self.limits = config.limits

    # -- the request's life ---------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = self._exchange(request)
        self.active += 1
        try:
            return await self._handle(request, exchange)
        except asyncio.CancelledError:
            if exchange.outcome == "ok":
                exchange.end("shutdown" if self.draining else "client_disconnect")
            raise
        finally:
            self.active -= 1
            # Heads are counted once the exchange is over: bookkeeping never stands before the
            # first byte (on an idle core it took ~5 us of the ~60 us before the upstream call).
            version = request.version
            exchange.client_in += received_head_size(
                f"{request.method} {request.raw_path} HTTP/{version.major}.{version.minor}",
                request.raw_headers,
            )
            if not exchange.detached:  # else a drain task writes the record when it is done
                self.finish(exchange)

    async def unparsed(
        self, request: web.BaseRequest, status: int, reason: str, received: int
    ) -> web.StreamResponse:
        """A request the HTTP parser refused, or whose head did not arrive in time: nothing of
        it is known but its size, and it is answered and recorded all the same."""
        exchange = self._exchange(request, method="", path="")
        exchange.client_in = received
        limits = self.limits
        limit = {
            "header_timeout": limits.header_timeout, "too_many_headers": limits.max_headers,
        }.get(reason, limits.max_header_bytes)  # fmt: skip
        log.info("refused an unreadable request from %s: %s", request.remote, reason)
        try:
            refusal = errors.unparsed(status, reason, limit)
            return await self._refuse(request, exchange, refusal, close=True)
        finally:
            self.finish(exchange)

    def _exchange(
        self, request: web.BaseRequest, method: str | None = None, path: str | None = None
    ) -> Exchange:
        # A request the parser refused has no headers to believe: only its peer is known.
        headers = request.headers if method is None else CIMultiDict[str]()
        agent = headers.get("User-Agent")
        return Exchange(
            ts=time.time(),
            request_id=f"{self._id_prefix}-{next(self._request_ids)}",
            client_request_id=sane_request_id(headers.get("X-Request-Id")),
            client_address=client_address(request.remote, headers, self.config.trusted_proxies),
            user_agent=agent[:USER_AGENT_CHARS] if agent is not None else None,
            method=request.method if method is None else method,
            path=request.path if path is None else path,
            started=self._loop.time(),
        )

    def finish(self, exchange: Exchange) -> None:
        """The one place a request ends: its usage record is written exactly once, now, or once
        a long prompt is counted."""
        exchange.ended = self._loop.time()
        exchange.outcome = outcome_of(exchange.outcome, exchange.upstream_status)
        facts = exchange.request
        counted_apart = exchange.counting is not None or self._count_prompt(exchange)
        if facts is not None and facts.parsed is not None and not counted_apart:
            estimate_input(
                facts, cast(Dialect, exchange.dialect), self.tokenizers, self.metering,
                exchange.metering_errors, exchange.request_id,
            )  # fmt: skip
        waiting = [exchange.counting] if exchange.counting is not None else []
        if exchange.output_meter is not None:
            waiting.append(self._in_thread(functools.partial(self._count_output, exchange)))
        if any(not job.done() for job in waiting):
            asyncio.gather(*waiting).add_done_callback(lambda _: self._record(exchange))
            return
        self._record(exchange)

    def _response_facts(self, exchange: Exchange, meter: ResponseMeter) -> ResponseFacts:
        """The response's facts; a long answer's text (a whole JSON answer of megabytes) is
        counted in `finish`, off the event loop, like a long prompt."""
        if meter.uncounted > ESTIMATE_INLINE_BYTES:
            exchange.output_meter = meter
            return meter.facts(count_output=False)
        return meter.facts()

    def _count_output(self, exchange: Exchange) -> None:
        """In the estimator's thread: the long answer's output estimate."""
        meter, response = exchange.output_meter, exchange.response
        if meter is not None and response is not None:
            try:
                response.estimated_output = meter.output_estimate()
            except Exception:  # counting fails open: the record goes without the estimate
                exchange.metering_errors["tokens"] = exchange.metering_errors.get("tokens", 0) + 1
                log.exception("request %s: output estimate failed", exchange.request_id)
        exchange.output_meter = None

    def _in_thread(self, work: Callable[[], None]) -> asyncio.Future[None]:
        if self._estimator is None:
            self._estimator = ThreadPoolExecutor(1, thread_name_prefix="tallygate-count")
        done = self._loop.run_in_executor(self._estimator, work)
        self._estimates.add(done)
        done.add_done_callback(self._estimates.discard)
        return done

    def _count_prompt(self, exchange: Exchange) -> bool:
        """Count a long prompt in a thread (tiktoken lets go of the GIL while it encodes: the
        other streams go on), from as soon as the request is forwarded; the parsed body is let
        go once counted. `finish` writes the record when this is done. False, and nothing done,
        for a prompt short enough to count on the event loop (or none to count)."""
        facts = exchange.request
        if (
            facts is None
            or facts.parsed is None
            or self.tokenizers is None
            or facts.parsed_size <= ESTIMATE_INLINE_BYTES
        ):
            return False
        estimate = functools.partial(
            estimate_input, facts, cast(Dialect, exchange.dialect), self.tokenizers,
            self.metering, exchange.metering_errors, exchange.request_id,
        )  # fmt: skip
        exchange.counting = self._in_thread(estimate)
        return True

    def _record(self, exchange: Exchange) -> None:
        self.records += 1
        if exchange.outcome != "ok":
            log.info(
                "request %s %s %s ended: %s (status %s)",
                exchange.request_id, exchange.method, exchange.path, exchange.outcome,
                exchange.status,
            )  # fmt: skip
        try:
            usage, _ = exchange.tokens()
            model = exchange.model()
            month = time.strftime("%Y-%m", time.gmtime(exchange.ts))
            wire = {
                "client_in": exchange.client_in, "client_out": exchange.client_out,
                "upstream_out": exchange.upstream_out, "upstream_in": exchange.upstream_in,
            }  # fmt: skip
            exchange.cost = self.costing.cost(model, usage, wire, month, exchange.ts)
            if exchange.cost.first_unpriced:
                log.warning(UNPRICED_WARNING, model)
        except Exception:  # pricing must never cost the record: it is written unpriced
            exchange.metering_errors["record"] = exchange.metering_errors.get("record", 0) + 1
            log.exception("pricing the usage record of %s failed", exchange.request_id)
            model = None
        try:
            record = exchange.record()
        except Exception:  # a defect, never the client's doing: logged, and the relay goes on
            log.exception("building the usage record of %s failed", exchange.request_id)
            return
        # Each sink on its own: one that fails never keeps the record from the others.
        for name, sink in self.sinks():
            try:
                sink(record)
            except Exception:
                log.exception("the %s sink failed on the record of %s", name, exchange.request_id)

    def sinks(self) -> list[tuple[str, Sink]]:
        """Everything a finished request's record feeds, in order (the ledger and spend totals
        join this list)."""
        found: list[tuple[str, Sink]] = [("access log", self._log), ("metrics", self._observe)]
        if self.ledger is not None:
            found.append(("ledger", self.ledger))
        if self.on_record is not None:
            found.append(("on_record", self.on_record))
        return found

    def _log(self, record: UsageRecord) -> None:
        try:
            self.access_log.write(record.as_dict())
        except Exception:
            self.access_log.failures += 1  # counted in tallygate_access_log_failures_total
            raise

    def _observe(self, record: UsageRecord) -> None:
        self.metrics.observe(record)

    async def _handle(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        decision = self.admission.decide(
            request.method, request.raw_path, request.path, request.headers, request.remote,
            request.content_length, getattr(request.protocol, "over_limit", False), self.active,
        )  # fmt: skip
        exchange.cors, exchange.family = decision.cors, decision.family
        family, admitted = decision.family, decision.verdict
        if isinstance(admitted, Refused):
            return await self._refuse(request, exchange, admitted.error, family, admitted.close)
        if isinstance(admitted, Preflight):
            assert decision.cors is not None
            return await self._preflight(request, exchange, *decision.cors, family)
        route, identity, target = admitted.route, admitted.identity, admitted.target
        exchange.tenant = identity.tenant
        upstream = self.config.upstreams[route.upstream]
        exchange.route, exchange.upstream = route.path_prefix, upstream.name
        # Relay only, unless metered; and every API call that is billed is a POST: an OPTIONS,
        # a GET of a stored response, a DELETE are relayed, not metered.
        metered = self.config.metering.enabled and request.method == "POST"
        dialect: Dialect = admitted.spoken if metered else "none"
        exchange.dialect = dialect

        limits = self.limits
        limit = limits.max_request_bytes
        if (
            request.version >= (1, 1)
            and request.headers.get("Expect", "").lower() == "100-continue"
        ):
            # The client waits for this before it sends the body: only now, once the key, the
            # route and the size are accepted, so a refusal comes before any upload.
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            body = await self._read_body(request, limit, exchange)
        except TimeoutError:
            refusal = errors.body_timeout(limits.body_timeout)
            return await self._refuse(request, exchange, refusal, family, close=True)
        if body is None:
            return await self._refuse(request, exchange, errors.too_large(limit), family)
        # A body of megabytes is joined, parsed and copied in separate steps, so that other
        # streams run between them (bench/pauses.py).
        long = len(body) > LONG_BODY_BYTES
        if long:
            await _let_others_run()

        # A content-coded body goes upstream as sent; a bounded decoded copy is metered.
        coding = request.headers.get("Content-Encoding", "identity").strip().lower()
        plain = None
        if coding != "identity" and dialect != "none" and body:
            plain = inflate_request(body, coding, limit)
        if coding != "identity" and plain is None:  # not decodable here: relayed, not read
            facts = RequestFacts(body)
            if dialect != "none" and body:
                exchange.metering_errors["request"] = 1
        else:
            facts = read_request(
                dialect, body, self.tokenizers, self.metering, exchange.metering_errors,
                exchange.request_id, plain,
            )  # fmt: skip
        exchange.request = facts
        exchange.key_id = identity.key_id
        exchange.user, exchange.session, exchange.tags = attribute(
            self.config.attribution, request.headers, facts.identity_fields, admitted.trusted
        )
        if facts.insert_usage_option:
            if long:
                await _let_others_run()
            facts.body = with_usage_option(facts.body)
        client = ClientSide(
            peer=request.remote,
            scheme=request.scheme,
            host=request.headers.get("Host"),
            trusted=admitted.trusted,
        )
        headers = upstream_request_headers(
            request.headers, client, upstream.api_key, upstream.auth_header,
            # A tallygate-issued key is ours: it never travels upstream.
            drop_client_credentials=identity.by_key,
        )  # fmt: skip
        self._count_prompt(exchange)  # a long one, now, in a thread: let go once counted
        # From here the body lives in `facts` only, which lets it go once it is sent.
        del body, plain
        return await self._forward(request, exchange, upstream, target, headers, facts.body)

    async def _read_body(
        self, request: web.BaseRequest, limit: int, exchange: Exchange
    ) -> bytes | None:
        """The whole request body, or None past `limit` (read no further than that). TimeoutError
        if it takes longer than `body_timeout` in all (as Go's ReadTimeout and Caddy's read_body:
        a client that sends a byte a second is cut off, not kept alive)."""
        if not request.body_exists:
            return b""
        if request.content.is_eof():  # it all came with the head, as an API call's body often
            body = request.content.read_nowait()  # does: nothing to wait for, no timer to arm
            exchange.client_in += len(body)
            return body if len(body) <= limit else None
        parts: list[bytes] = []
        size = 0
        async with asyncio.timeout(self.limits.body_timeout):
            while chunk := await request.content.read(_READ_CHUNK):
                size += len(chunk)
                exchange.client_in += len(chunk)
                if size > limit:
                    return None
                parts.append(chunk)
        return b"".join(parts)

    # -- the upstream exchange -----------------------------------------------------------------

    async def _forward(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        upstream: Upstream,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
    ) -> web.StreamResponse:
        family = exchange.family
        watchdog = Watchdog(self._loop, upstream.timeouts, self.limits.write_timeout)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.timeouts.connect)
        url = upstream_url(upstream.url, target)
        data = body if body or request.method not in _BODYLESS_METHODS else None
        data_size = len(data) if data is not None else None
        del body
        response: web.StreamResponse | None = None
        upstream_response: aiohttp.ClientResponse | None = None
        decoder: UpstreamDecoder | None = None
        encoder: GzipEncoder | None = None
        meter: ResponseMeter | None = None
        sent = True  # unless the connection could not be made
        try:
            try:
                upstream_response = await self.session.request(
                    request.method, URL(url, encoded=True), headers=headers, data=data,
                    allow_redirects=False, timeout=timeout,
                )  # fmt: skip
                # Sent: a long body is not held for the rest of the stream.
                data = None
                if exchange.request is not None:
                    exchange.request.body = b""
            except aiohttp.ConnectionTimeoutError:
                sent = False
                exchange.end("timeout", "connect_timeout")
                refusal = errors.upstream_timeout(
                    upstream.name, "connect", upstream.timeouts.connect
                )
                return await self._refuse(request, exchange, refusal, family)
            except aiohttp.ClientResponseError as error:
                # It answered, but not in HTTP: a bad status line or head, or a body that broke
                # before aiohttp handed us the response. Its bytes are not quoted back.
                exchange.end("upstream_error", "invalid_response")
                # Its own words only: aiohttp's message goes on to quote the upstream's bytes.
                what = str(error.message).split(":", 1)[0][:100]
                log.warning("upstream %s sent an invalid response: %s", upstream.name, what)
                refusal = errors.upstream_invalid(upstream.name)
                return await self._refuse(request, exchange, refusal, family)
            except (aiohttp.ClientError, OSError) as error:
                # Refused or unresolvable: the request never left. A connection lost after
                # sending (ServerDisconnectedError) may have reached the provider.
                sent = not isinstance(error, aiohttp.ClientConnectorError)
                exchange.end("upstream_error", "unreachable")
                log.warning("upstream %s unreachable: %s", upstream.name, _describe(error))
                # The client learns what failed, not where the upstream lives (host, port).
                refusal = errors.upstream_unreachable(upstream.name, _kind_of_failure(error))
                return await self._refuse(request, exchange, refusal, family)
            finally:
                exchange.reached_upstream = sent
            watchdog.headers_received()
            unrelayable = _unrelayable(upstream_response)
            if unrelayable is not None:
                upstream_response.close()  # never back to the pool
                exchange.status = exchange.upstream_status = upstream_response.status
                exchange.end("upstream_error", "invalid_response")
                log.warning("upstream %s sent %s", upstream.name, unrelayable)
                refusal = errors.upstream_invalid(upstream.name)
                return await self._refuse(request, exchange, refusal, family)
            response, decoder, gzip_policy, meter = self._start_response(
                request, exchange, upstream_response
            )
            await response.prepare(request)
            # The compressor's state (~80 KiB) is set up once the head is on its way.
            if gzip_policy is not None:
                encoder = GzipEncoder(self.gzip, gzip_policy)
            await self._pump(
                request, exchange, upstream_response, response, decoder, encoder, meter, watchdog
            )
            return response
        except asyncio.CancelledError:
            expired = watchdog.expired
            task = asyncio.current_task()
            if expired is None or task is None or task.uncancel() > 0:
                # The client left, or we are shutting down (handle() records which).
                if meter is not None and upstream_response is not None:
                    self._client_gone(exchange, meter, upstream_response, decoder)
                raise
            if expired == "write":
                # The client stopped reading: cut it off, as nginx's send_timeout does.
                exchange.end("client_timeout")
                log.info("client of %s stopped reading; cut", exchange.request_id)
                if meter is not None and upstream_response is not None:
                    self._client_gone(exchange, meter, upstream_response, decoder)
                _close(request)
                return cast(web.StreamResponse, response)
            exchange.end("timeout", f"{expired}_timeout")
            log.warning("upstream %s timed out (%s)", upstream.name, expired)
            if response is None or not response.prepared:
                timed_out = errors.upstream_timeout(upstream.name, expired, watchdog.seconds())
                return await self._refuse(request, exchange, timed_out, family)
            await _cut(request, response, encoder, self.limits.write_timeout)
            return response
        finally:
            watchdog.stop()
            # Both heads are counted here, after the response, not between the upstream's
            # answer and the first byte to the client.
            if exchange.reached_upstream:
                exchange.upstream_out = _sent_size(
                    request.method, url, headers, data_size, upstream_response
                )
            if upstream_response is not None:
                exchange.upstream_in += _received_head_size(upstream_response)
            if exchange.streaming_counted:
                self.metrics.stream_ended(exchange.route)
                exchange.streaming_counted = False
            if response is not None:
                exchange.client_out = _output_size(response)
            if meter is not None and not exchange.detached:
                exchange.response = self._response_facts(exchange, meter)
            if upstream_response is not None and not exchange.detached:
                # Closing, not releasing: an unfinished upstream body must not go back to the pool,
                # and the upstream must see us leave at once.
                upstream_response.close()

    def _start_response(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        upstream_response: aiohttp.ClientResponse,
    ) -> tuple[web.StreamResponse, UpstreamDecoder | None, FlushPolicy | None, ResponseMeter]:
        """The client's response head, how its body is to be decoded and (a flush policy)
        gzipped, and its meter."""
        status = upstream_response.status
        exchange.status = exchange.upstream_status = status
        if status >= 500:
            exchange.error_reason = "status_5xx"
        elif status == 429:  # the provider's rate limit: a capacity problem, not the client's
            exchange.error_reason = "status_429"
        upstream_headers = upstream_response.headers
        content_type = upstream_headers.get("Content-Type")
        coding = upstream_headers.get("Content-Encoding", "").strip().lower()
        has_body = request.method != "HEAD" and status not in _NO_BODY_STATUSES and status >= 200

        decoder = None
        if coding and coding != "identity" and coding in UpstreamDecoder.DECODABLE and has_body:
            decoder = UpstreamDecoder(coding)
        plain = decoder is not None or not coding or coding == "identity"
        facts = exchange.request
        meter = ResponseMeter(
            exchange.dialect if plain and has_body else "none",  # type: ignore[arg-type]
            content_type,
            self.tokenizers,
            self.metering,
            facts.model if facts else None,
            exchange.metering_errors,
            strip_usage_chunk=bool(facts and facts.usage_requested) and status == 200 and plain,
            request_id=exchange.request_id,
            tools_offered=bool(facts and facts.tools_offered),
        )
        exchange.stream = meter.is_stream
        if meter.is_stream:
            self.metrics.stream_started(exchange.route)
            exchange.streaming_counted = True
        length = None if decoder or meter.strips else upstream_response.content_length

        gzip_policy = None
        compression = self.config.compression
        if (
            compression.gzip
            and has_body
            and plain
            and accepts_gzip(request.headers.get("Accept-Encoding"))
            and is_compressible(content_type, length, compression.min_length)
        ):
            gzip_policy = flush_policy(content_type, length)
            exchange.encoding = "gzip"

        response = web.StreamResponse(status=status, reason=upstream_response.reason)
        response.headers.extend(
            client_response_headers(
                upstream_headers,
                decoded=decoder is not None,
                resized=meter.strips,
                gzip=gzip_policy is not None,
                event_stream=media_type(content_type) == "text/event-stream",
            )
        )
        if length is not None and gzip_policy is None:
            response.content_length = length
        # The provider's own id (OpenAI's x-request-id, Anthropic's request-id) is recorded, and
        # OpenAI's goes on as x-upstream-request-id: x-request-id is the one in our record.
        headers = response.headers
        provided = headers.popall("X-Request-Id", None)
        if provided:
            headers["X-Upstream-Request-Id"] = provided[0]
        exchange.upstream_request_id = sane_request_id(
            provided[0] if provided else headers.get("Request-Id")
        )
        headers["X-Request-Id"] = exchange.answered_id()
        _add_cors(exchange, headers)
        return response, decoder, gzip_policy, meter

    async def _pump(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        upstream_response: aiohttp.ClientResponse,
        response: web.StreamResponse,
        decoder: UpstreamDecoder | None,
        encoder: GzipEncoder | None,
        meter: ResponseMeter,
        watchdog: Watchdog,
    ) -> None:
        """Copy the body as it arrives, showing every chunk to the meter once it is sent. Read
        errors are the upstream's failure; write errors mean the client left."""
        read = upstream_response.content.readany
        write = response.write
        now = self._loop.time
        try:
            while True:
                try:
                    chunk = await read()
                except (aiohttp.ClientError, OSError) as error:
                    await self._broken(request, exchange, response, encoder, meter, error)
                    return
                if not chunk:
                    break
                watchdog.last = now()
                exchange.upstream_in += len(chunk)
                if decoder is not None:
                    try:
                        chunk = decoder.feed(chunk)
                    except zlib.error as error:  # the body is not what its coding says
                        await self._broken(request, exchange, response, encoder, meter, error)
                        return
                while True:
                    chunk = meter.relay(chunk)
                    if chunk:
                        watchdog.writing = watchdog.last
                        await self._send(exchange, write, encoder, chunk)
                        watchdog.writing = None
                        watchdog.last = now()
                    # Metered once sent: the meter never stands between upstream and client.
                    meter.settle()
                    if exchange.first_token_at is None and meter.text_seen:
                        exchange.first_token_at = watchdog.last
                    if decoder is None or not decoder.pending:
                        break
                    # A read that inflates to more than one piece goes out a piece at a time,
                    # and other streams run between the pieces.
                    await asyncio.sleep(0)
                    try:
                        chunk = decoder.more()
                    except zlib.error as error:
                        await self._broken(request, exchange, response, encoder, meter, error)
                        return
            tail = decoder.close() if decoder is not None else b""
            tail = meter.relay(tail) if tail else b""
            tail += meter.close()
            exchange.client_out_uncompressed += len(tail)
            if encoder is not None:
                tail = encoder.feed(tail) + encoder.close()
            # What is left, gzip's trailer and the last chunk go in one write (one TCP segment),
            # not two. The last read is not held back to join them: that would end the response
            # before it is metered, and a client's next request would then wait behind the
            # metering (docs/performance.md).
            watchdog.writing = now()
            exchange.client_out_body += len(tail)
            await response.write_eof(tail)
            watchdog.writing = None
            if exchange.first_byte_at is None:
                exchange.first_byte_at = now()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            exchange.end("client_disconnect")
            self._client_gone(exchange, meter, upstream_response, decoder)

    async def _broken(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        response: web.StreamResponse,
        encoder: GzipEncoder | None,
        meter: ResponseMeter,
        error: Exception,
    ) -> None:
        """The upstream broke mid-body. Deliver every byte it did send, then end the response
        as broken: never invent an end the upstream did not send."""
        exchange.end("upstream_error", "broken_body")
        log.warning("upstream %s failed mid-body: %s", exchange.upstream, _describe(error))
        rest = meter.close()
        if rest:
            await self._send(exchange, response.write, encoder, rest)
        await _cut(request, response, encoder, self.limits.write_timeout)

    async def _send(
        self,
        exchange: Exchange,
        write: Callable[[bytes], Any],
        encoder: GzipEncoder | None,
        plain: bytes,
    ) -> None:
        exchange.client_out_uncompressed += len(plain)
        data = encoder.feed(plain) if encoder is not None else plain
        exchange.client_out_body += len(data)
        await write(data)
        if exchange.first_byte_at is None:
            exchange.first_byte_at = self._loop.time()

    # -- a client that left ----------------------------------------------------------------------

    def _client_gone(
        self,
        exchange: Exchange,
        meter: ResponseMeter,
        upstream_response: aiohttp.ClientResponse,
        decoder: UpstreamDecoder | None,
    ) -> None:
        """Note what reached the client; with `on_client_disconnect: drain`, keep reading the
        upstream in the background so its reported usage (what you are billed) is captured."""
        exchange.delivered_output_tokens = meter.output_estimate()
        # Not `closed`: aiohttp sets that once the body has arrived, though it may still be
        # waiting, unread, in the buffer. Drain unless every byte was read.
        if (
            self.config.metering.on_client_disconnect != "drain"
            or upstream_response.content.at_eof()
        ):
            return
        exchange.detached = True
        task = asyncio.get_running_loop().create_task(
            self._drain(exchange, meter, upstream_response, decoder)
        )
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(
        self,
        exchange: Exchange,
        meter: ResponseMeter,
        upstream_response: aiohttp.ClientResponse,
        decoder: UpstreamDecoder | None,
    ) -> None:
        """The rest of the body, through the same decoder and meter the relay was using."""
        # The upstream may have left the configuration by a reload since the request started.
        upstream = self.config.upstreams.get(exchange.upstream)
        total = upstream.timeouts.total if upstream else Timeouts().total
        try:
            async with asyncio.timeout(min(self.config.metering.drain_timeout, total)):
                while chunk := await upstream_response.content.readany():
                    exchange.upstream_in += len(chunk)
                    if decoder is None:
                        meter.feed(chunk)
                        continue
                    meter.feed(decoder.feed(chunk))
                    while decoder.pending:
                        await asyncio.sleep(0)
                        meter.feed(decoder.more())
                if decoder is not None:
                    meter.feed(decoder.close())
                meter.close()
        except (TimeoutError, aiohttp.ClientError, OSError, zlib.error) as error:
            log.info("drain of %s stopped: %s", exchange.request_id, _describe(error))
        finally:
            upstream_response.close()
            exchange.response = self._response_facts(exchange, meter)
            self.finish(exchange)

    async def drain_tasks(self) -> None:
        """Wait for background drains and prompt counts, so every record is written (at
        shutdown)."""
        if self._drains:
            await asyncio.gather(*self._drains, return_exceptions=True)
        if self._estimates:
            await asyncio.gather(*self._estimates, return_exceptions=True)
        if self._estimator is not None:
            self._estimator.shutdown(wait=False)
            self._estimator = None

    # -- answers of our own ----------------------------------------------------------------------

    async def _preflight(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        cors: CorsPolicy,
        origin: str,
        family: ApiFamily,
    ) -> web.StreamResponse:
        """A browser's preflight, answered here: never relayed, never asked for a key, never
        metered (its record has no dialect and no tokens)."""
        route = self.router.match(exchange.path)
        exchange.route = route.path_prefix if route is not None else ""
        method = request.headers["Access-Control-Request-Method"]
        allowed = cors.preflight(
            origin, method, request.headers.get("Access-Control-Request-Headers", "")
        )
        if allowed is None:
            exchange.cors = None  # a refused origin learns nothing more
            return await self._refuse(
                request, exchange, errors.cors_refused(origin, method), family
            )
        exchange.status = 204
        response = web.Response(status=204, headers=allowed)
        response.headers["X-Request-Id"] = exchange.answered_id()
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await response.prepare(request)
            await response.write_eof()
        exchange.client_out = _output_size(response)
        return response

    async def _refuse(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        error: ProxyError,
        family: ApiFamily = "openai",
        close: bool = False,
    ) -> web.StreamResponse:
        exchange.status = error.status
        if exchange.outcome == "ok":
            exchange.end("rejected")
            exchange.rejected_reason = error.code
        response = web.Response(
            status=error.status, body=error.body(family), content_type="application/json"
        )
        response.headers["X-Request-Id"] = exchange.answered_id()
        if error.status == 503:
            response.headers["Retry-After"] = str(self.limits.retry_after)
        _add_cors(exchange, response.headers)
        if close:  # the connection is over: a body unread, or one connection too many
            response.force_close()
            response.headers["Connection"] = "close"  # said even to a request we could not read
        # Sent here rather than by aiohttp after we return, so the record knows its size.
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await response.prepare(request)
            await response.write_eof()
        exchange.client_out = _output_size(response)
        if close:
            # Now, not after aiohttp's lingering read of an unread body: that would give a client
            # that sends a byte a second 10 s more.
            _close(request)
        exchange.first_byte_at = self._loop.time()
        return response


async def _cut(
    request: web.BaseRequest,
    response: web.StreamResponse,
    encoder: GzipEncoder | None,
    write_timeout: float,
) -> None:
    """End a started response as broken: deliver every byte the upstream sent (out of the
    compressor too), then close the connection without a last chunk or gzip trailer, so the
    client sees a truncated body, which is the truth."""
    if encoder is not None:
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError, TimeoutError):
            async with asyncio.timeout(write_timeout):
                await response.write(encoder.flush())
    _close(request)


def _close(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


def _output_size(response: web.StreamResponse) -> int:
    """Every byte written to the client for this response: status line, headers, chunk framing,
    body (aiohttp's writer counts them as they go to the socket)."""
    return bytes_written(response)


def _sent_size(
    method: str,
    url: str,
    headers: CIMultiDict[str],
    data_size: int | None,
    upstream_response: aiohttp.ClientResponse | None,
) -> int:
    """The request as aiohttp wrote it to the upstream: its request line, the headers it really
    sent (ours plus Host and Content-Length), and the body (`data_size`: None for none)."""
    body = data_size or 0
    if upstream_response is not None:
        info = upstream_response.request_info
        line = f"{method} {info.url.raw_path_qs} HTTP/1.1"
        return head_size(line, info.headers.items()) + body
    # No response: the same head, rebuilt from what we handed aiohttp.
    parsed = URL(url, encoded=True)
    sent = [*headers.items(), ("Host", parsed.raw_authority)]
    if data_size is not None:
        sent.append(("Content-Length", str(body)))
    return head_size(f"{method} {parsed.raw_path_qs} HTTP/1.1", sent) + body


def _received_head_size(upstream_response: aiohttp.ClientResponse) -> int:
    version = upstream_response.version
    number = f"{version.major}.{version.minor}" if version is not None else "1.1"
    line = f"HTTP/{number} {upstream_response.status} {upstream_response.reason}"
    return received_head_size(line, upstream_response.raw_headers)


def _unrelayable(upstream_response: aiohttp.ClientResponse) -> str | None:
    """What makes an upstream's answer one tallygate cannot pass on faithfully, or None."""
    if upstream_response.status < 200:
        # tallygate never asks for an upgrade (Upgrade is hop-by-hop): a 101 is not an answer.
        return f"a {upstream_response.status} to a request that asked for no upgrade"
    coding = upstream_response.headers.get("Transfer-Encoding")
    if coding is None or coding == "chunked":  # nearly every answer: nothing more to look at
        return None
    codings = [
        coding.strip().lower()
        for value in upstream_response.headers.getall("Transfer-Encoding", ())
        for coding in value.split(",")
    ]
    if any(coding not in ("chunked", "") for coding in codings):
        # aiohttp undoes only `chunked`: the body would reach the client still coded, unlabelled.
        return f"a body in the transfer coding {', '.join(codings)}"
    return None


def _kind_of_failure(error: BaseException) -> str:
    """What went wrong connecting, in words that name no host, address or port."""
    if isinstance(error, aiohttp.ClientSSLError):
        return "the TLS handshake failed"
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return "it closed the connection"
    if isinstance(error, aiohttp.ClientConnectorError):
        if isinstance(error.os_error, socket.gaierror):
            return "its name does not resolve"
        if isinstance(error.os_error, ConnectionRefusedError):
            return "the connection was refused"
        return "it cannot be connected to"
    return "the connection failed"


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]


async def _let_others_run() -> None:
    """Yield twice: the first lets the loop poll for I/O and wake the tasks waiting for it, the
    second lets those tasks run before this one goes on (a single yield would run this one's
    next step first, since it was queued before them)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _add_cors(exchange: Exchange, headers: CIMultiDict[str]) -> None:
    """A cross-origin request's answer carries our CORS headers, and none of the upstream's."""
    if exchange.cors is None:
        return
    cors, origin = exchange.cors
    for name in [n for n in headers if n.lower().startswith("access-control-")]:
        headers.popall(name, None)
    for name, value in cors.response_headers(origin, headers.keys()).items():
        if name == "Vary":
            headers.add(name, value)
        else:
            headers[name] = value
