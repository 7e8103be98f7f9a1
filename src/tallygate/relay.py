"""The request handler: moves bytes between the client and the upstream, and nothing more.

Every decision is taken by the pure modules (routing, headers, compression, errors); this module
only awaits sockets, enforces timeouts, and maps failures to answers. It must not parse bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from dataclasses import dataclass
from typing import Literal

import aiohttp
from aiohttp import web

from . import errors
from .compression import (
    GzipEncoder,
    GzipSettings,
    UpstreamDecoder,
    accepts_gzip,
    flush_policy,
    is_compressible,
    media_type,
)
from .config import Config, Timeouts, Upstream
from .errors import ProxyError
from .headers import ClientSide, client_response_headers, is_trusted, upstream_request_headers
from .routing import Router, upstream_url

log = logging.getLogger("tallygate.relay")

Outcome = Literal["ok", "client_disconnect", "upstream_error", "timeout", "rejected", "shutdown"]

_NO_BODY_STATUSES = frozenset({204, 304})
_BODYLESS_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
_READ_CHUNK = 2**16
_request_ids = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}"


@dataclass(slots=True)
class Exchange:
    """What happened to one request; later issues turn it into the usage record."""

    request_id: str
    method: str
    path: str
    route: str = ""
    upstream: str = ""
    status: int = 0
    outcome: Outcome = "ok"
    stream: bool = False
    encoding: str = "identity"
    client_in_body: int = 0
    upstream_in_body: int = 0
    client_out_body: int = 0


class Watchdog:
    """Cancels the task it guards when a timeout runs out: first byte (until the response headers),
    then idle (no progress on either side), and total over everything.

    Noting progress is one float store per read; the timer is re-armed only when it fires early,
    so a stream of thousands of reads costs a handful of timer operations.
    """

    __slots__ = ("_deadline", "_handle", "_idle", "_loop", "_task", "_timeouts", "expired", "last")

    def __init__(self, loop: asyncio.AbstractEventLoop, timeouts: Timeouts) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._loop, self._task, self._timeouts = loop, task, timeouts
        now = loop.time()
        self._deadline = now + timeouts.total
        self._idle: float | None = None
        self.last = now
        self.expired: str | None = None
        self._handle = loop.call_at(self._due(), self._check)

    def headers_received(self) -> None:
        self._idle = self._timeouts.idle
        self.last = self._loop.time()
        # The idle deadline may come before the first-byte one the timer is armed for.
        self._handle.cancel()
        self._handle = self._loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        if self._idle is None:
            return min(self.last + self._timeouts.first_byte, self._deadline)
        return min(self.last + self._idle, self._deadline)

    def _check(self) -> None:
        due = self._due()
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        if due >= self._deadline:
            self.expired = "total"
        else:
            self.expired = "first_byte" if self._idle is None else "idle"
        self._task.cancel()

    def seconds(self) -> float:
        return float(getattr(self._timeouts, self.expired or "total"))

    def stop(self) -> None:
        self._handle.cancel()


class Proxy:
    """The proxy listener's handler, with the one shared upstream session."""

    def __init__(self, config: Config, session: aiohttp.ClientSession) -> None:
        self.config = config
        self.session = session
        self.router = Router(config.routes)
        self.gzip = GzipSettings(
            config.compression.level, config.compression.window_bits, config.compression.mem_level
        )
        self.draining = False
        self.active = 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        exchange = Exchange(
            request_id=request.headers.get("X-Request-Id") or f"{_ID_PREFIX}-{next(_request_ids)}",
            method=request.method,
            path=request.path,
        )
        self.active += 1
        try:
            return await self._handle(request, exchange)
        except asyncio.CancelledError:
            if exchange.outcome == "ok":
                exchange.outcome = "shutdown" if self.draining else "client_disconnect"
            raise
        finally:
            self.active -= 1
            if exchange.outcome != "ok":
                log.info(
                    "request %s %s %s ended: %s (status %s)",
                    exchange.request_id, exchange.method, exchange.path, exchange.outcome,
                    exchange.status,
                )  # fmt: skip

    async def _handle(self, request: web.BaseRequest, exchange: Exchange) -> web.StreamResponse:
        family = errors.api_family(request.path)
        if request.method == "CONNECT":
            return self._refuse(exchange, errors.method_refused("CONNECT"), family)
        raw_target = request.raw_path
        if not raw_target.startswith("/"):
            return self._refuse(
                exchange, errors.not_a_proxy("a request target not starting with /"), family
            )

        path = raw_target.split("?", 1)[0]
        route = self.router.match(path)
        if route is None:
            return self._refuse(exchange, errors.no_route(request.path), family)
        upstream = self.config.upstreams[route.upstream]
        exchange.route, exchange.upstream = route.path_prefix, upstream.name

        limit = self.config.limits.max_request_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._refuse(exchange, errors.too_large(limit), family)
        body = await self._read_body(request, limit)
        if body is None:
            return self._refuse(exchange, errors.too_large(limit), family)
        exchange.client_in_body = len(body)

        peer = request.remote
        client = ClientSide(
            peer=peer,
            scheme=request.scheme,
            host=request.headers.get("Host"),
            trusted=is_trusted(peer, self.config.trusted_proxies),
        )
        headers = upstream_request_headers(
            request.headers, client, upstream.api_key, upstream.auth_header
        )
        return await self._forward(request, exchange, upstream, raw_target, headers, body, family)

    async def _read_body(self, request: web.BaseRequest, limit: int) -> bytes | None:
        """The whole request body, or None past `limit` (read no further than that)."""
        if not request.body_exists:
            return b""
        parts: list[bytes] = []
        size = 0
        while chunk := await request.content.read(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                return None
            parts.append(chunk)
        return b"".join(parts)

    async def _forward(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        upstream: Upstream,
        target: str,
        headers: object,
        body: bytes,
        family: errors.ApiFamily,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        watchdog = Watchdog(loop, upstream.timeouts)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=upstream.timeouts.connect)
        response: web.StreamResponse | None = None
        encoder: GzipEncoder | None = None
        upstream_response: aiohttp.ClientResponse | None = None
        try:
            try:
                upstream_response = await self.session.request(
                    request.method,
                    upstream_url(upstream.url, target),
                    headers=headers,  # type: ignore[arg-type]
                    data=body if body or request.method not in _BODYLESS_METHODS else None,
                    allow_redirects=False,
                    timeout=timeout,
                )
            except aiohttp.ServerTimeoutError:
                exchange.outcome = "timeout"
                return self._refuse(exchange, errors.upstream_timeout(
                    upstream.name, "connect", upstream.timeouts.connect), family)  # fmt: skip
            except (aiohttp.ClientError, OSError) as error:
                exchange.outcome = "upstream_error"
                reason = _describe(error)
                log.warning("upstream %s unreachable: %s", upstream.name, reason)
                return self._refuse(
                    exchange, errors.upstream_unreachable(upstream.name, reason), family
                )
            watchdog.headers_received()
            response, decoder, encoder = self._start_response(request, exchange, upstream_response)
            await response.prepare(request)
            await self._pump(
                request, exchange, upstream_response, response, decoder, encoder, watchdog
            )
            return response
        except asyncio.CancelledError:
            expired = watchdog.expired
            task = asyncio.current_task()
            if expired is None or task is None or task.uncancel() > 0:
                raise  # the client left, or we are shutting down
            exchange.outcome = "timeout"
            log.warning("upstream %s timed out (%s)", upstream.name, expired)
            if response is None or not response.prepared:
                timed_out = errors.upstream_timeout(upstream.name, expired, watchdog.seconds())
                return self._refuse(exchange, timed_out, family)
            await _cut(request, response, encoder)
            return response
        finally:
            watchdog.stop()
            if upstream_response is not None:
                # Closing, not releasing: an unfinished upstream body must not go back to the pool,
                # and the upstream must see us leave at once.
                upstream_response.close()

    def _start_response(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        upstream_response: aiohttp.ClientResponse,
    ) -> tuple[web.StreamResponse, UpstreamDecoder | None, GzipEncoder | None]:
        """The client's response head, and how its body is to be coded."""
        status = upstream_response.status
        exchange.status = status
        upstream_headers = upstream_response.headers
        content_type = upstream_headers.get("Content-Type")
        coding = upstream_headers.get("Content-Encoding", "").strip().lower()
        has_body = request.method != "HEAD" and status not in _NO_BODY_STATUSES and status >= 200

        decoder = None
        if coding and coding != "identity" and coding in UpstreamDecoder.DECODABLE and has_body:
            decoder = UpstreamDecoder(coding)
        plain = decoder is not None or not coding or coding == "identity"
        length = None if decoder else upstream_response.content_length

        encoder = None
        compression = self.config.compression
        if (
            compression.gzip
            and has_body
            and plain
            and accepts_gzip(request.headers.get("Accept-Encoding"))
            and is_compressible(content_type, length, compression.min_length)
        ):
            encoder = GzipEncoder(self.gzip, flush_policy(content_type, length))
            exchange.encoding = "gzip"

        exchange.stream = media_type(content_type) in ("text/event-stream", "application/x-ndjson")
        response = web.StreamResponse(status=status, reason=upstream_response.reason)
        response.headers.extend(
            client_response_headers(
                upstream_headers,
                decoded=decoder is not None,
                gzip=encoder is not None,
                event_stream=media_type(content_type) == "text/event-stream",
            )
        )
        if length is not None and encoder is None:
            response.content_length = length
        return response, decoder, encoder

    async def _pump(
        self,
        request: web.BaseRequest,
        exchange: Exchange,
        upstream_response: aiohttp.ClientResponse,
        response: web.StreamResponse,
        decoder: UpstreamDecoder | None,
        encoder: GzipEncoder | None,
        watchdog: Watchdog,
    ) -> None:
        """Copy the body as it arrives. Read errors are the upstream's failure; write errors mean
        the client left."""
        read = upstream_response.content.readany
        write = response.write
        loop_time = asyncio.get_running_loop().time
        try:
            while True:
                try:
                    chunk = await read()
                except (aiohttp.ClientError, OSError) as error:
                    # The upstream broke mid-body. Deliver every byte it did send, then end the
                    # response as broken: never invent an end the upstream did not send.
                    exchange.outcome = "upstream_error"
                    log.warning(
                        "upstream %s failed mid-body: %s", exchange.upstream, _describe(error)
                    )
                    await _cut(request, response, encoder)
                    return
                if not chunk:
                    break
                watchdog.last = loop_time()
                exchange.upstream_in_body += len(chunk)
                if decoder is not None:
                    chunk = decoder.feed(chunk)
                if encoder is not None:
                    chunk = encoder.feed(chunk)
                if chunk:
                    exchange.client_out_body += len(chunk)
                    await write(chunk)
            tail = decoder.close() if decoder is not None else b""
            if encoder is not None:
                tail = encoder.feed(tail) + encoder.close()
            if tail:
                exchange.client_out_body += len(tail)
                await write(tail)
            await response.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            exchange.outcome = "client_disconnect"

    def _refuse(
        self, exchange: Exchange, error: ProxyError, family: errors.ApiFamily
    ) -> web.Response:
        exchange.status = error.status
        if exchange.outcome == "ok":
            exchange.outcome = "rejected"
        return web.Response(
            status=error.status, body=error.body(family), content_type="application/json"
        )


async def _cut(
    request: web.BaseRequest, response: web.StreamResponse, encoder: GzipEncoder | None
) -> None:
    """End a started response as broken: deliver every byte the upstream sent (out of the
    compressor too), then close the connection without a last chunk or gzip trailer, so the
    client sees a truncated body, which is the truth."""
    if encoder is not None:
        with contextlib.suppress(ConnectionError, aiohttp.ClientConnectionResetError):
            await response.write(encoder.flush())
    transport = request.transport
    if transport is not None:
        transport.close()


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text.splitlines()[0][:200]
