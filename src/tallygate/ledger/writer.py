"""The ledger sink: the relay hands it each finished request's record and goes on; a thread
commits the rows as a group, at most `interval` seconds after they came, or sooner when
`batch` rows wait. The relay never waits for the database.

Nothing is lost while the store is away: rows that cannot be committed are appended to this
process's spool file (one JSON array per line, flushed to the kernel at once) and replayed,
idempotently, once the store answers again. A process that died leaves its spool behind, and
the next writer to start replays it. What can be lost is the rows not yet committed nor
spooled when the process is killed outright (SIGKILL, OOM): those of its last `interval`.
SIGTERM commits them (or spools them) before the process exits.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import logging
import os
import threading
from collections import deque
from collections.abc import Callable
from typing import IO

import orjson

from tallygate.core.record import UsageRecord
from tallygate.ledger.rows import Row, row_from_json, row_of
from tallygate.ledger.store import Store

log = logging.getLogger("tallygate.ledger")


class LedgerWriter:
    def __init__(
        self,
        open_store: Callable[[], Store],
        spool: str,
        price_version: str,
        interval: float = 0.1,
        batch: int = 1000,
    ) -> None:
        self._open_store = open_store
        self._spool_base = spool
        self._price_version = price_version
        self._interval = interval
        self._batch = batch
        self._queue: deque[Row] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self.committed = 0  # rows inserted by this process (tallygate_ledger_rows_total)
        self.failures = 0  # commits that failed (the rows went to the spool)
        self.spooled = 0  # rows waiting in the spool now
        self._spool: IO[bytes] | None = None
        self._thread = threading.Thread(target=self._run, name="tallygate-ledger", daemon=True)
        self._thread.start()

    # -- the event loop's side: an append, nothing more ------------------------------------------

    def __call__(self, record: UsageRecord) -> None:
        self._queue.append(row_of(record, self._price_version))
        if len(self._queue) >= self._batch:
            self._wake.set()

    def close(self, timeout: float = 10.0) -> None:
        """Commit (or spool) every row handed in so far, then stop."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    # -- the writer thread ------------------------------------------------------------------------

    def _run(self) -> None:
        store: Store | None = None
        self._replay_orphans()
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            stopping = self._stopping
            rows = self._take()
            if store is None:
                try:
                    store = self._open_store()
                except Exception as error:
                    log.warning("ledger store unavailable, rows are spooled: %s", error)
            if rows and (store is None or not self._commit(store, rows)):
                store = self._drop(store)  # opened again on the next round
                self._to_spool(rows)
            if store is not None and self.spooled and not self._replay_own(store):
                store = self._drop(store)
            if stopping and not self._queue:
                break
        if store is not None:
            store.close()
        if self._spool is not None:
            self._spool.close()

    def _take(self) -> list[Row]:
        rows = []
        queue = self._queue
        while queue:
            rows.append(queue.popleft())
        return rows

    def _commit(self, store: Store, rows: list[Row]) -> bool:
        try:
            self.committed += store.insert(rows)
            return True
        except Exception as error:
            self.failures += 1
            log.warning("ledger commit of %d rows failed, spooled: %s", len(rows), error)
            return False

    @staticmethod
    def _drop(store: Store | None) -> None:
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()

    # -- the spool --------------------------------------------------------------------------------

    def _own_spool(self) -> IO[bytes]:
        if self._spool is None:
            path = f"{self._spool_base}.{os.getpid()}"
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            spool = open(path, "a+b")  # noqa: SIM115 (held for the process's life)
            fcntl.flock(spool, fcntl.LOCK_EX)  # alive: nobody else replays it
            self._spool = spool
        return self._spool

    def _to_spool(self, rows: list[Row]) -> None:
        spool = self._own_spool()
        spool.write(b"".join(orjson.dumps(list(row)) + b"\n" for row in rows))
        spool.flush()
        self.spooled += len(rows)

    def _replay_own(self, store: Store) -> bool:
        spool = self._own_spool()
        spool.seek(0)
        if not self._replay(store, spool.read()):
            return False
        spool.truncate(0)
        self.spooled = 0
        log.info("ledger store back: spooled rows replayed")
        return True

    def _replay(self, store: Store, data: bytes) -> bool:
        rows = []
        for line in data.splitlines():
            try:
                rows.append(row_from_json(orjson.loads(line)))
            except (orjson.JSONDecodeError, TypeError):
                log.warning("ledger spool: a line that is not a row was dropped: %r", line[:80])
        return not rows or self._commit(store, rows)

    def _replay_orphans(self) -> None:
        """Spools of processes gone (their lock is free): replayed and removed."""
        mine = f"{self._spool_base}.{os.getpid()}"
        for path in sorted(glob.glob(glob.escape(self._spool_base) + ".*")):
            if path == mine or not path.rsplit(".", 1)[-1].isdigit():
                continue
            try:
                with open(path, "r+b") as orphan:
                    fcntl.flock(orphan, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    data = orphan.read()
                    store = self._open_store()
                    try:
                        done = self._replay(store, data)
                    finally:
                        store.close()
                    if done:
                        os.unlink(path)
                        log.info("ledger: replayed %s", path)
            except BlockingIOError:
                continue  # a live process's spool
            except Exception as error:
                log.warning("ledger: %s not replayed yet: %s", path, error)
