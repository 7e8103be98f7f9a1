"""Several worker processes on one port (`workers: N`), supervised by a master.

The master forks the workers before any event loop exists; each runs its own loop and binds the
proxy port with SO_REUSEPORT, so the kernel spreads connections across them. The master keeps
that port reserved, serves the admin listener, and on each scrape asks every worker for a
snapshot of its metric values over a private unix socket and adds them up: exact, and free on
the hot path (a worker's metrics are plain dictionaries). A worker that dies is started again.
On SIGTERM or SIGINT the master fails /readyz, tells every worker to drain, and waits for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import tempfile
import time

import aiohttp
from aiohttp import web

from tallygate.compat import leave_running_loop, untested_versions
from tallygate.config import Config, ListenError
from tallygate.config.checks import config_warnings
from tallygate.core.tokens import Tokenizers
from tallygate.proxy.server import (
    WorkerSlot,
    admin_app,
    bind,
    new_metrics,
    on_signal,
    port_of,
    read_for_reload,
    reconfigure_metrics,
    registry_renderer,
    report_reload,
    run_loop,
    serve,
    where,
)

log = logging.getLogger("tallygate.runtime.workers")

# A worker that dies sooner than this after its start is not restarted in a tight loop.
_RESTART_BACKOFF = 1.0


def _spawn(
    config: Config,
    tokenizers: Tokenizers | None,
    slot: WorkerSlot,
    close: list[socket.socket],
    path: str | None,
) -> int:
    pid = os.fork()
    if pid:
        return pid
    # The worker. A restart forks from inside the master's running loop: leave that loop, its
    # signal wake-up pipe and the master's sockets behind before starting a loop of our own.
    code = 0
    try:
        leave_running_loop()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        # A reload or reopen forwarded before this worker's loop handles it must not end it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        for sock in close:
            sock.close()
        _die_with_parent()
        run_loop(serve(config, tokenizers, worker=slot, path=path))
    except BaseException:
        log.exception("worker %d failed", slot.index)
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


class Master:
    def __init__(
        self, config: Config, tokenizers: Tokenizers | None, path: str | None = None
    ) -> None:
        self.config = config
        self.tokenizers = tokenizers
        self.path = path
        self.runtime = tempfile.mkdtemp(prefix="tallygate-")
        # Reserve the port (and learn it, when it is 0) without accepting on it ourselves.
        if config.listen.port:
            # SO_REUSEPORT lets any process of this user share the port: bind once without it
            # first, so that a port another tallygate (or anything) holds is refused, not shared.
            bind(config.listen, backlog=0).close()
        self.reserved = bind(config.listen, reuse_port=True, backlog=0)
        try:
            self.admin_sock = bind(config.admin.listen)  # before any worker starts
        except ListenError:
            self.reserved.close()
            raise
        self.port = port_of(self.reserved)
        self.slots = [
            WorkerSlot(i, self.port, os.path.join(self.runtime, f"worker-{i}.sock"))
            for i in range(config.workers)
        ]
        self.pids: dict[int, WorkerSlot] = {}
        self.started: dict[int, float] = {}
        self.draining = False
        self.metrics = new_metrics(config)
        self.sockets: list[socket.socket] = [self.reserved, self.admin_sock]
        self.all_exited: asyncio.Event | None = None

    def spawn_all(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: WorkerSlot) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(slot.snapshot_path)
        pid = _spawn(self.config, self.tokenizers, slot, self.sockets, self.path)
        self.pids[pid] = slot
        self.started[slot.index] = time.monotonic()

    async def render(self, accept: str) -> tuple[bytes, str]:
        connector_snapshots = await asyncio.gather(
            *(self._snapshot(slot) for slot in self.slots), return_exceptions=True
        )
        snapshots = [s for s in connector_snapshots if isinstance(s, bytes)]
        self.metrics.load(snapshots)
        return await registry_renderer(self.metrics.registry)(accept)

    async def _snapshot(self, slot: WorkerSlot) -> bytes:
        connector = aiohttp.UnixConnector(path=slot.snapshot_path)
        timeout = aiohttp.ClientTimeout(total=5)
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.get("http://worker/snapshot") as response,
        ):
            return await response.read()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        self.all_exited = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGCHLD, self._reap)
        if self.path is not None:
            on_signal(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGUSR1, self._forward, signal.SIGUSR1)
        self._reap()  # a worker may have gone before the handler was in place
        app = admin_app(
            lambda: self.draining,
            self.render,
            self.config.admin.metrics_token,
            self.config.ledger.url,
        )
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        admin_sock = self.admin_sock
        await web.SockSite(runner, admin_sock).start()
        log.info(
            "tallygate listening on %s (admin %s), %d workers",
            where(self.config.listen, self.port),
            where(self.config.admin.listen, port_of(admin_sock)),
            len(self.slots),
        )
        await stop.wait()
        self.draining = True
        log.info("signal received: draining %d workers (grace %gs)", len(self.pids),
                 self.config.shutdown_grace)  # fmt: skip
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.shutdown_grace + 10):
                await self.all_exited.wait()
        for pid in list(self.pids):  # still there after the grace: stop them hard
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await runner.cleanup()
        self.reserved.close()
        shutil.rmtree(self.runtime, ignore_errors=True)
        log.info("stopped")

    async def _reload(self) -> None:
        """SIGHUP: check the file here first, so a bad one is refused once and loudly; then each
        worker reads and applies it (as `serve` does alone), and workers started later get it."""
        assert self.path is not None
        read = await read_for_reload(self.path, self.config)
        if read is None:
            return
        config, tokenizers, changed = read
        self.config, self.tokenizers = config, tokenizers
        reconfigure_metrics(self.metrics, config)
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)
        report_reload(self.path, config, changed)

    def _forward(self, signum: int) -> None:
        """SIGUSR1: each worker reopens its access log."""
        for pid in list(self.pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _reap(self) -> None:
        """On SIGCHLD: collect exited workers; start again those that died while serving."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = self.pids.pop(pid, None)
            if slot is None or self.draining:
                continue
            log.error("worker %d (pid %d) exited with status %d; starting it again",
                      slot.index, pid, os.waitstatus_to_exitcode(status))  # fmt: skip
            lived = time.monotonic() - self.started[slot.index]
            loop.call_later(max(0.0, _RESTART_BACKOFF - lived), self._restart, slot)
        if not self.pids and self.all_exited is not None:
            self.all_exited.set()

    def _restart(self, slot: WorkerSlot) -> None:
        if not self.draining:
            self._spawn(slot)


def run(config: Config, tokenizers: Tokenizers | None, path: str | None = None) -> None:
    """`tallygate serve`: one process, or a master and `workers` processes on one port. (Here,
    above both, so that server.py never imports this module: no import circle.)"""
    for warning in (*config_warnings(config), *untested_versions()):
        log.warning("%s", warning)
    if config.workers > 1:
        supervise(config, tokenizers, path)
    else:
        run_loop(serve(config, tokenizers, path=path))


def supervise(config: Config, tokenizers: Tokenizers | None, path: str | None = None) -> None:
    master = Master(config, tokenizers, path)
    master.spawn_all()  # before the master's loop exists: a fork must not copy a running loop
    # asyncio's own loop: the master moves little traffic, and uvloop keeps SIGCHLD to itself.
    asyncio.run(master.run())


def _die_with_parent() -> None:
    """Linux: a worker whose master is gone (even by SIGKILL) gets SIGTERM and drains."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the master's own shutdown still stops them
        pass


_PR_SET_PDEATHSIG = 1
