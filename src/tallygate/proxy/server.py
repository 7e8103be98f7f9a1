"""Process lifecycle: the proxy and admin listeners, the shared upstream session, signals, drain.

The proxy listener serves only proxied traffic; `/healthz`, `/readyz` and `/metrics` live on the
admin listener so they are never exposed on the edge. With several workers (workers.py) each
worker runs `start()` without an admin listener, and the master serves it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import logging
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_parser import RawResponseMessage
from aiohttp.streams import StreamReader
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from tallygate.compat import use_protocol
from tallygate.config import Config, ConfigError, Listen, ListenError, effective_config, load_config
from tallygate.config.prices import default_price_table
from tallygate.core.pricing import Costing, EgressPrice, UnpricedModels
from tallygate.core.record import UsageRecord
from tallygate.core.tokens import Tokenizers
from tallygate.ledger.api import Handler
from tallygate.ledger.api import add_routes as add_ledger_routes
from tallygate.ledger.store import open_store
from tallygate.ledger.writer import LedgerWriter
from tallygate.observe.accesslog import AccessLog
from tallygate.observe.metrics import Metrics, config_hash
from tallygate.proxy.connection import Listener
from tallygate.proxy.relay import Proxy
from tallygate.runtime.encodings import TokenizerError, tokenizers_for

log = logging.getLogger("tallygate")

# Keep-alive for idle client connections, nginx's keepalive_timeout default.
_CLIENT_KEEPALIVE = 75.0


# The accept queue: as long as the kernel allows (net.core.somaxconn), so that a burst of new
# connections waits to be accepted instead of being dropped (nginx sets 511; a backlog of 1024
# drops streams in a burst of 5,000: docs/performance.md).
_BACKLOG = socket.SOMAXCONN


def bind(listen: Listen, reuse_port: bool = False, backlog: int = _BACKLOG) -> socket.socket:
    """A listening socket; port 0 lets the OS choose (tests read it back). With `reuse_port`,
    several processes bind the same port and the kernel spreads connections across them."""
    family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((listen.host, listen.port))
        if backlog:
            sock.listen(backlog)
    except OSError as error:
        sock.close()
        raise ListenError.of(listen, error) from None
    sock.setblocking(False)
    return sock


def tls_context(listen: Listen) -> ssl.SSLContext | None:
    if listen.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(listen.tls.cert, listen.tls.key)
    return context


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


MetricsRenderer = Callable[[str], Awaitable[tuple[bytes, str]]]


def registry_renderer(registry: CollectorRegistry) -> MetricsRenderer:
    async def render(accept: str) -> tuple[bytes, str]:
        # OpenMetrics when the scraper asks for it, Prometheus text otherwise.
        encoder, content_type = choose_encoder(accept)
        return encoder(registry), content_type

    return render


def admin_app(
    is_draining: Callable[[], bool],
    render_metrics: MetricsRenderer,
    token: str | None,
    ledger_url: str | None = None,
) -> web.Application:
    """/healthz, /readyz, /metrics, and the ledger's endpoints when there is a ledger; with
    `token`, /metrics and the ledger need `Authorization: Bearer <token>`."""

    def guarded(handler: Handler) -> Handler:
        async def checked(request: web.Request) -> web.StreamResponse:
            if token is not None:
                presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
                sent = presented.strip().encode("utf-8", "surrogateescape")  # as sent
                if not hmac.compare_digest(sent, token.encode()):
                    return web.json_response(
                        {"error": "a bearer token is required"}, status=401,
                        headers={"WWW-Authenticate": 'Bearer realm="tallygate metrics"'},
                    )  # fmt: skip
            return await handler(request)

        return checked

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if is_draining():
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ready"})

    async def metrics(request: web.Request) -> web.StreamResponse:
        body, content_type = await render_metrics(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", guarded(metrics))
    if ledger_url is not None:
        add_ledger_routes(app, ledger_url, guarded)
    return app


class _UpstreamProtocol(ResponseHandler):
    """aiohttp's client protocol, with three changes:

    - a body that stops parsing mid-way (a broken chunk size) fails the reader at once. aiohttp
      3.14 fails only the connection: the reader waits forever, and the stream would end 60 s
      later as an idle timeout instead of a broken body;
    - resuming a connection that is not paused does nothing (see `resume_reading`);
    - an answer that arrives when no request awaits one closes the connection (`_unsolicited`):
      aiohttp would queue it for whichever client's request next uses the connection.
    """

    def resume_reading(self, resume_parser: bool = True) -> None:
        # aiohttp 3.14's StreamReader calls this after every HTTP chunk it hands out, paused or
        # not (earlier versions checked first), and each call runs the parser on empty input
        # and resumes a transport that is running: for an LLM stream, an HTTP chunk per event,
        # that costs about a sixth of a plain relay's instructions (docs/performance.md). Not
        # paused, there is nothing to resume: the parser keeps unparsed bytes
        # only when pause_reading() (which sets _reading_paused) stopped it, and a transport
        # held for a buffer (_buffer_paused) is not released here anyway. Flow control is
        # tested with a slow reader in tests/test_hostile_clients.py.
        if self._reading_paused:
            super().resume_reading(resume_parser)

    _awaited = 0  # requests sent on this connection whose answer has not arrived

    def set_response_params(self, **params: Any) -> None:
        # Called once for every request sent on this connection: one answer is awaited.
        self._awaited += 1
        super().set_response_params(**params)

    def feed_data(self, data: tuple[RawResponseMessage, StreamReader], size: int = 0) -> None:
        message = data[0]
        if message.code >= 200 or message.code == 101:  # a final answer, not a 1xx
            if not self._awaited:
                self._unsolicited(message.code)
                return
            self._awaited -= 1
        super().feed_data(data, size)

    def _unsolicited(self, code: int) -> None:
        """An answer to no request: pushed on an idle pooled connection, or beyond what the last
        answer's framing allowed. Queued, it would become the answer to the next client's
        request on this connection, so the connection is closed, never reused."""
        log.warning("upstream sent a %d answer to no request; its connection is closed", code)
        self._should_close = True
        if self.transport is not None:
            self.transport.close()

    def set_exception(self, exc: BaseException, *cause: BaseException) -> None:
        payload = self._payload
        super().set_exception(exc, *cause)  # aiohttp's own "no cause" when none is given
        if payload is not None and not payload.is_eof() and payload.exception() is None:
            payload.set_exception(aiohttp.ClientPayloadError(f"the body broke: {exc}"), exc)


def new_session(config: Config) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=config.pool.max_connections,  # 0: no limit
        limit_per_host=0,
        keepalive_timeout=config.pool.keepalive_timeout,
        ttl_dns_cache=60,
    )
    # tests/test_hostile_upstreams.py fails if aiohttp stops building connections this way.
    use_protocol(connector, functools.partial(_UpstreamProtocol, loop=asyncio.get_running_loop()))
    return aiohttp.ClientSession(
        connector=connector,
        # We read the body as sent, count it, and decode it ourselves (compression.UpstreamDecoder).
        auto_decompress=False,
        # One session serves every client: cookies from one must never reach another.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Send the client's headers, not aiohttp's defaults.
        skip_auto_headers=("User-Agent", "Accept", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
    )


def new_metrics(config: Config) -> Metrics:
    return Metrics(
        CollectorRegistry(),
        routes=[route.path_prefix for route in config.routes],
        upstreams=list(config.upstreams),
        tenants=list(config.tenants),
        max_models=config.metrics.max_models,
        config_hash=config_hash(effective_config(config)),
    )


@dataclass(frozen=True)
class WorkerSlot:
    """What a worker of several is given by the master."""

    index: int
    port: int  # the proxy port the master reserved (SO_REUSEPORT)
    snapshot_path: str  # a unix socket where the master asks for this worker's metrics


# What a reload cannot change in a running process: sockets, processes and the upstream pool.
RESTART_KEYS = ("listen", "admin", "workers", "pool", "shutdown_grace")


def for_reload(running: Config, new: Config) -> tuple[Config, list[str]]:
    """The configuration a reload applies: `new`, with the keys that need a restart kept as they
    run, and the names of those that changed (to be reported, not applied)."""
    before, after = effective_config(running), effective_config(new)
    changed = [key for key in RESTART_KEYS if before[key] != after[key]]
    kept = {key: getattr(running, key) for key in RESTART_KEYS}
    return dataclasses.replace(new, **kept), changed


def _read(path: str, running: Config) -> tuple[Config, Tokenizers | None, list[str]]:
    config, changed = for_reload(running, load_config(path))
    return config, tokenizers_for(config), changed


async def read_for_reload(
    path: str, running: Config
) -> tuple[Config, Tokenizers | None, list[str]] | None:
    """Read and validate the file again and load its encodings, off the loop. None, with the
    problems logged, when it is refused: the running configuration stays as it is."""
    try:
        return await asyncio.get_running_loop().run_in_executor(None, _read, path, running)
    except (ConfigError, TokenizerError) as error:
        log.error("reload refused, the configuration in use is unchanged:\n%s", error)
        return None


def on_signal(signum: int, reload: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run `reload()` as a task at each `signum`, kept referenced until it is done."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    def start() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signum, start)


def reconfigure_metrics(metrics: Metrics, config: Config) -> None:
    metrics.reconfigure(
        [route.path_prefix for route in config.routes], list(config.upstreams),
        list(config.tenants), config.metrics.max_models, config_hash(effective_config(config)),
    )  # fmt: skip


def new_costing(config: Config, unpriced: UnpricedModels | None = None) -> Costing:
    egress = config.pricing.egress
    return Costing(
        default_price_table().merged(config.pricing.models),
        EgressPrice(egress.usd_per_gb, egress.free_gb, egress.tiers, egress.gb_bytes),
        egress.directions,
        unpriced,
    )


@dataclass
class Running:
    proxy: Proxy
    proxy_port: int
    admin_port: int  # 0 for a worker: the master serves the admin listener
    config: Config
    listener: Listener
    _runners: list[web.BaseRunner] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None

    def reload(self, config: Config, tokenizers: Tokenizers | None) -> None:
        """Apply a configuration from `read_for_reload`: routes, upstreams, tenants, limits,
        compression, metering, pricing and the access log take effect for the next request."""
        proxy = self.proxy
        proxy.configure(config, tokenizers, new_costing(config, proxy.costing.unpriced))
        limits = config.limits
        self.listener.header_timeout = limits.header_timeout
        self.listener.max_connections = limits.max_connections
        # The parser's limits, for connections accepted from now on.
        self.listener._kwargs.update(
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=limits.max_headers,
        )
        if config.access_log != self.config.access_log:
            old, proxy.access_log = proxy.access_log, AccessLog(config.access_log)
            asyncio.get_running_loop().run_in_executor(None, old.close)  # its queue, written out
        else:
            proxy.access_log.reopen()
        reconfigure_metrics(proxy.metrics, config)
        self.config = config

    async def drain_and_stop(self) -> None:
        """Stop accepting, let in-flight requests finish within shutdown_grace, then close.

        /readyz fails from the first moment, so a load balancer stops sending new requests,
        while /healthz stays up until the very end.
        """
        self.proxy.draining = True
        log.info("draining: %d requests in flight", self.proxy.active)
        proxy_runner, *admin_runners = self._runners
        await proxy_runner.cleanup()
        await self.proxy.drain_tasks()
        if self._session is not None:
            await self._session.close()
        # The access log is flushed before the process goes.
        await asyncio.get_running_loop().run_in_executor(None, self.proxy.access_log.close)
        # And the ledger's last rows committed (or spooled) before it goes.
        if isinstance(self.proxy.ledger, LedgerWriter):
            await asyncio.get_running_loop().run_in_executor(None, self.proxy.ledger.close)
        for runner in admin_runners:
            await runner.cleanup()
        log.info("stopped after %d requests", self.proxy.records)


def new_ledger(config: Config) -> LedgerWriter | None:
    """The ledger sink of `config`, or None with `ledger: off`. Its store is opened by its own
    thread (and, while it cannot be, rows are spooled): `tallygate serve` checks it opens
    before starting (`check_ledger`)."""
    settings = config.ledger
    url = settings.url
    if url is None:
        return None
    return LedgerWriter(
        lambda: open_store(url), settings.spool_path(), price_version(config),
        settings.commit_interval, settings.batch_rows,
    )  # fmt: skip


def price_version(config: Config) -> str:
    """The prices a row was priced with: the shipped table's date, and a hash of the
    configuration's own prices when it has some."""
    version = default_price_table().date
    if config.pricing.models:
        own = repr(sorted(config.pricing.models.items())).encode()
        version += "+" + hashlib.sha256(own).hexdigest()[:8]
    return version


async def start(
    config: Config,
    tokenizers: Tokenizers | None = None,
    on_record: Callable[[UsageRecord], None] | None = None,
    worker: WorkerSlot | None = None,
) -> Running:
    if tokenizers is None:
        tokenizers = tokenizers_for(config)
    # The addresses first: one in use stops tallygate before anything else is made.
    if worker is None:
        proxy_sock = bind(config.listen)
        try:
            admin_sock = bind(config.admin.listen)
        except ListenError:
            proxy_sock.close()
            raise
    else:
        proxy_sock = bind(Listen(config.listen.host, worker.port), reuse_port=True)
    session = new_session(config)
    access_log = AccessLog(config.access_log)
    metrics = new_metrics(config)
    ledger = new_ledger(config)
    proxy = Proxy(
        config, session, tokenizers, access_log, metrics, new_costing(config), on_record, ledger
    )
    # The proxy's log, not this one: a reload may replace it.
    metrics.watch_access_log(lambda: proxy.access_log.failures)

    limits = config.limits
    server = Listener(
        proxy.handle,
        unparsed=proxy.unparsed,
        header_timeout=limits.header_timeout,
        max_connections=limits.max_connections,
        # A client that leaves cancels its handler, which closes the upstream request at once.
        handler_cancellation=True,
        # A request body goes upstream as the client sent it, content coding and all.
        auto_decompress=False,
        access_log=None,
        max_line_size=limits.max_header_bytes,
        max_field_size=limits.max_header_bytes,
        max_headers=limits.max_headers,
        keepalive_timeout=_CLIENT_KEEPALIVE,
    )
    proxy_runner = web.ServerRunner(server, shutdown_timeout=config.shutdown_grace)
    await proxy_runner.setup()
    # SockSite listens again with its own backlog (128 by default): give it ours.
    await web.SockSite(
        proxy_runner, proxy_sock, backlog=_BACKLOG, ssl_context=tls_context(config.listen)
    ).start()
    running = Running(proxy, port_of(proxy_sock), 0, config, server, [proxy_runner], session)

    if worker is None:
        admin = admin_app(
            lambda: proxy.draining,
            registry_renderer(metrics.registry),
            config.admin.metrics_token,
            config.ledger.url,
        )
        admin_runner = web.AppRunner(admin, access_log=None, shutdown_timeout=1.0)
        await admin_runner.setup()
        await web.SockSite(admin_runner, admin_sock).start()
        running.admin_port = port_of(admin_sock)
    else:
        admin_runner = web.AppRunner(_snapshot_app(metrics), access_log=None, shutdown_timeout=1.0)
        await admin_runner.setup()
        await web.UnixSite(admin_runner, worker.snapshot_path).start()
    running._runners.append(admin_runner)
    return running


def _snapshot_app(metrics: Metrics) -> web.Application:
    async def snapshot(_: web.Request) -> web.Response:
        return web.Response(body=metrics.snapshot(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/snapshot", snapshot)
    return app


async def serve(
    config: Config,
    tokenizers: Tokenizers | None,
    worker: WorkerSlot | None = None,
    path: str | None = None,
    ready: Callable[[Running], None] | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then drain. SIGHUP reads `path` again and applies it.
    `ready` is called once both listeners are up."""
    running = await start(config, tokenizers, worker=worker)
    if ready is not None:
        ready(running)
    loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
    if worker is None:
        log.info(
            "tallygate listening on %s (admin %s), event loop %s",
            where(config.listen, running.proxy_port),
            where(config.admin.listen, running.admin_port),
            loop_name,
        )
    else:
        log.info("worker %d serving, event loop %s", worker.index, loop_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if path is not None:
        on_signal(signal.SIGHUP, lambda: _reload(running, path))
    # As nginx: USR1 reopens the log files (logrotate's postrotate), and so does a reload.
    loop.add_signal_handler(signal.SIGUSR1, lambda: running.proxy.access_log.reopen())
    await stop.wait()
    log.info("signal received, shutting down (grace %gs)", config.shutdown_grace)
    await running.drain_and_stop()


async def _reload(running: Running, path: str) -> None:
    read = await read_for_reload(path, running.config)
    if read is None:
        return
    config, tokenizers, changed = read
    running.reload(config, tokenizers)
    report_reload(path, config, changed)


def report_reload(path: str, config: Config, changed: list[str]) -> None:
    log.info("reloaded %s (config hash %s)", path, config_hash(effective_config(config)))
    if changed:
        log.warning("reload: %s changed but need a restart; still running with the old values",
                    ", ".join(changed))  # fmt: skip


def where(listen: Listen, port: int) -> str:
    scheme = "https://" if listen.tls else ""
    return scheme + str(Listen(listen.host, port))


def run_loop(main: Awaitable[None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows); asyncio's loop works, slower.
        asyncio.run(main)  # type: ignore[arg-type]
    else:
        uvloop.run(main)  # type: ignore[arg-type]
