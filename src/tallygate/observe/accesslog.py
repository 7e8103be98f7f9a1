"""The access log: one JSON line per request, written by a thread so that a slow or failing disk
never blocks the event loop. A failing sink is counted and reported; the relay goes on."""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any

import orjson

log = logging.getLogger("tallygate.observe.accesslog")

_STOP = b""
_REOPEN = b"\0"  # never a record: a record is a JSON object and a line end
# The writer wakes at most this often: one wake-up (and one GIL hand-over) per batch of records
# rather than per record, on a core the relay shares. Records are at most this late.
_BATCH_SECONDS = 0.05


class AccessLog:
    """`target`: `stdout`, `stderr`, `off`, or a file path (appended to, created if missing)."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.written = 0
        self.failures = 0
        self._queue: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if target != "off":
            self._thread = threading.Thread(
                target=self._run, name="tallygate-accesslog", daemon=True
            )
            self._thread.start()

    def write(self, record: dict[str, Any]) -> None:
        if self._thread is None:
            return
        try:
            line = orjson.dumps(record)
        except TypeError:  # a lone surrogate: a header's undecodable byte, as aiohttp keeps it
            line = orjson.dumps(_escaped(record))
        self._queue.put(line + b"\n")

    def reopen(self) -> None:
        """Close the file and open its path again before the next record (SIGUSR1, SIGHUP):
        after logrotate moved it, records go to the new file, none lost, none twice."""
        if self._thread is not None:
            self._queue.put(_REOPEN)

    def close(self) -> None:
        """Write out what is queued, then stop (at shutdown). At most one batch interval late."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout=10)
            self._thread = None

    def _open(self) -> int:
        if self.target == "stdout":
            return 1
        if self.target == "stderr":
            return 2
        # O_APPEND: every write lands at the end, whole, even with several workers on one file.
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _write(self, fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _run(self) -> None:
        sink: int | None = None
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            if batch[0] not in (_STOP, _REOPEN):
                time.sleep(_BATCH_SECONDS)
            while True:  # take what else is waiting, to write it in one go
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [line for line in batch if line != _STOP]
            if _REOPEN in batch:
                # Records queued before the signal go to the new file too: each goes once.
                batch = [line for line in batch if line != _REOPEN]
                if sink is not None and sink > 2:
                    os.close(sink)
                sink = None
            if not batch:
                continue
            try:
                if sink is None:
                    sink = self._open()
                if sink > 2:
                    self._write(sink, b"".join(batch))  # a file: one append for the batch
                else:
                    # A pipe keeps a write whole only up to PIPE_BUF (4 KiB): a line a write.
                    for line in batch:
                        self._write(sink, line)
                self.written += len(batch)
            except (OSError, ValueError) as error:
                self.failures += len(batch)
                if self.failures == len(batch) or self.failures % 1000 < len(batch):
                    log.error("access log %s failed (%d records lost so far): %s",
                              self.target, self.failures, error)  # fmt: skip
                if sink is not None and sink > 2:
                    os.close(sink)
                sink = None
        if sink is not None and sink > 2:
            os.close(sink)


def _escaped(value: Any) -> Any:
    """`value` with every string's lone surrogates written as `\\udcXX` text, which JSON can
    hold: the record keeps what the client sent, readably, instead of failing to serialize."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, dict):
        return {_escaped(key): _escaped(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(item) for item in value]
    return value
