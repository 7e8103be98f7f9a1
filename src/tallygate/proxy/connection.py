"""The client connection: aiohttp's HTTP/1.1 protocol with what an edge proxy needs on top.

aiohttp has no read timeout for a request head (a client may send it a byte a minute), answers
a request it cannot parse with plain text and no record, and accepts connections without limit.
This subclass adds the head timeout and the connection count, and hands every request that never
reaches the handler to an `Unparsed` callback, which answers in the API's error shape and leaves
a usage record. It only keeps time and counts: the answers are the proxy's (proxy/relay.py).

It relies on internals of aiohttp, listed in tallygate/compat.py;
tests/test_hostile_clients.py fails if they change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.streams import EMPTY_PAYLOAD
from aiohttp.web_protocol import RequestHandler

from tallygate.compat import head_timeout_entry

if TYPE_CHECKING:
    from aiohttp.web_protocol import _ErrInfo as ErrInfo


class HeadTimeout(HttpProcessingError):
    code = 408
    message = "the request head did not arrive in time"


class Unparsed(Protocol):
    """Answers a request that could not be read: (request, status, reason, bytes received)."""

    def __call__(
        self, request: web.BaseRequest, status: int, reason: str, received: int
    ) -> Awaitable[web.StreamResponse]: ...


def classify(error: BaseException, line_end: int | None, max_line: int) -> tuple[int, str]:
    """The status and reason for a request the parser refused. `line_end`: where the head's
    first line ended. A line too long there is the request line (414, as nginx); past it, a
    header (431, RFC 6585)."""
    if isinstance(error, HeadTimeout):
        return 408, "header_timeout"
    if isinstance(error, LineTooLong):
        if line_end is None or line_end > max_line:
            return 414, "request_line_too_long"
        return 431, "headers_too_large"
    if isinstance(error, BadHttpMessage) and "too many headers" in str(error).lower():
        return 431, "too_many_headers"
    return 400, "bad_request"


class ClientConnection(RequestHandler):
    __slots__ = (
        "_head_bytes", "_head_since", "_head_timer", "_line_end", "_listener", "over_limit",
    )  # fmt: skip

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        super().__init__(listener, **kwargs)
        self._listener = listener
        # While a request head is awaited: since when, and how much of it has arrived.
        self._head_since: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._line_end: int | None = None
        self.over_limit = False  # accepted past max_connections: its requests get 503

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # The first head is awaited from the accept, as nginx's client_header_timeout: a
        # connection that sends nothing holds a slot for header_timeout, not keepalive_timeout.
        self._await_head()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_since is None and not self._request_in_progress and not self._messages:
            self._await_head()  # the first bytes of the next request on a kept-alive connection
        if self._head_since is not None:
            if self._line_end is None and (found := data.find(b"\n")) >= 0:
                self._line_end = self._head_bytes + found
            self._head_bytes += len(data)
        count = self._request_count
        super().data_received(data)
        if self._request_count != count:
            self._head_since = None  # a head is complete (or refused): the handler's turn

    def _await_head(self) -> None:
        self._head_since = self._loop.time()
        self._head_bytes = 0
        self._line_end = None
        if self._head_timer is None:
            self._head_timer = self._loop.call_at(
                self._head_since + self._listener.header_timeout, self._head_check
            )

    def _head_check(self) -> None:
        self._head_timer = None
        since = self._head_since
        if since is None or self._request_in_progress or self._messages:
            return
        due = since + self._listener.header_timeout
        if self._loop.time() < due:
            self._head_timer = self._loop.call_at(due, self._head_check)
            return
        if self._head_bytes == 0:
            # Nothing was asked: no request to answer or record, as nginx closes silently.
            self.force_close()
            return
        # Through aiohttp's own queue, so the answer goes the way of any refused request.
        self._head_since = None
        self._messages.append(
            (head_timeout_entry(408, HeadTimeout(), HeadTimeout.message), EMPTY_PAYLOAD)
        )
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _make_error_handler(
        self, err_info: ErrInfo
    ) -> Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]:
        status, reason = classify(err_info.exc, self._line_end, self.max_line_size)
        received = self._head_bytes

        async def handler(request: web.BaseRequest) -> web.StreamResponse:
            # Not aiohttp's handle_error: it logs the refused line, which may hold a key.
            response = await self._listener.unparsed(request, status, reason, received)
            response.force_close()
            return response

        return handler


class Listener(web.Server):
    """aiohttp's server with tallygate's connections, counted against `max_connections`."""

    def __init__(
        self,
        handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
        *,
        unparsed: Unparsed,
        header_timeout: float,
        max_connections: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.unparsed = unparsed
        self.header_timeout = header_timeout
        self.max_connections = max_connections

    def __call__(self) -> ClientConnection:
        return ClientConnection(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if self.max_connections and len(self._connections) > self.max_connections:
            assert isinstance(handler, ClientConnection)
            handler.over_limit = True
