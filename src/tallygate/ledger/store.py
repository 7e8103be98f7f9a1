"""Where ledger rows are kept: SQLite (embedded, the default) or PostgreSQL (shared by
replicas). Both take the same SQL but for placeholders, and inserts are idempotent: a row is
unique on its request id and attempt, and inserting it again changes nothing.

A store is used from one thread at a time (the ledger writer's, or a report's): it blocks.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from tallygate.ledger.rows import COLUMNS, Row

# Versioned schema: each entry brings a store from the version before it to its own (its index
# plus one). A store records its version and, at start-up, runs the ones it lacks.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE usage (
            request_id TEXT NOT NULL,
            attempt INTEGER NOT NULL,
            ts_ms BIGINT NOT NULL,
            tenant TEXT NOT NULL,
            user_id TEXT,
            session_id TEXT,
            tags TEXT,
            key_id TEXT,
            route TEXT NOT NULL,
            upstream TEXT NOT NULL,
            model TEXT,
            priced_as TEXT,
            dialect TEXT NOT NULL,
            status INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            stream INTEGER NOT NULL,
            tokens_source TEXT NOT NULL,
            input_tokens BIGINT NOT NULL,
            cached_input_tokens BIGINT NOT NULL,
            cache_write_input_tokens BIGINT NOT NULL,
            output_tokens BIGINT NOT NULL,
            reasoning_tokens BIGINT NOT NULL,
            client_in BIGINT NOT NULL,
            client_out BIGINT NOT NULL,
            upstream_out BIGINT NOT NULL,
            upstream_in BIGINT NOT NULL,
            cost_input BIGINT NOT NULL,
            cost_cached_input BIGINT NOT NULL,
            cost_cache_write_input BIGINT NOT NULL,
            cost_output BIGINT NOT NULL,
            cost_egress BIGINT NOT NULL,
            cost_total BIGINT NOT NULL,
            price_version TEXT NOT NULL,
            duration_ms BIGINT NOT NULL,
            PRIMARY KEY (request_id, attempt)
        )""",
        "CREATE INDEX usage_ts ON usage (ts_ms)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


class LedgerError(Exception):
    """The store cannot be opened, or its schema is newer than this tallygate."""


class Store(Protocol):
    url: str

    def insert(self, rows: Sequence[Row]) -> int:
        """Insert in one transaction; rows already there are left alone. The count inserted."""

    def rows(self, since_ms: int | None = None, until_ms: int | None = None) -> Iterator[Row]:
        """The rows that arrived in [since_ms, until_ms), oldest first."""

    def close(self) -> None: ...


def open_store(url: str) -> Store:
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SqliteStore(url)
    if scheme in ("postgresql", "postgres"):
        from tallygate.ledger.postgres import PostgresStore

        return PostgresStore(url)
    raise LedgerError(f"ledger: unknown store {scheme!r} (sqlite:///path or postgresql://...)")


def sqlite_path(url: str) -> str:
    """`sqlite:///var/lib/x.db` is /var/lib/x.db; `sqlite:///./x.db` is ./x.db, relative to
    the working directory."""
    path = unquote(url.removeprefix("sqlite://"))
    return path[1:] if path.startswith(("/./", "/../")) else path


_INSERT = (
    f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))}) "
    "ON CONFLICT (request_id, attempt) DO NOTHING"
)
_SELECT = f"SELECT {', '.join(COLUMNS)} FROM usage"


class SqliteStore:
    def __init__(self, url: str) -> None:
        self.url = url
        path = sqlite_path(url)
        try:
            if path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
            # WAL: readers (reports) never block the writer; NORMAL sync: a commit survives a
            # crash of tallygate (not of the machine's power), at a fraction of FULL's cost.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            migrate(self._db, "?", "BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError) as error:
            raise LedgerError(f"ledger: cannot open {url}: {error}") from None

    def insert(self, rows: Sequence[Row]) -> int:
        db = self._db
        before = db.total_changes
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_INSERT, rows)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return db.total_changes - before

    def rows(self, since_ms: int | None = None, until_ms: int | None = None) -> Iterator[Row]:
        where, args = _range(since_ms, until_ms, "?")
        for values in self._db.execute(f"{_SELECT}{where} ORDER BY ts_ms", args):
            yield Row(*values)

    def close(self) -> None:
        self._db.close()


def _range(since_ms: int | None, until_ms: int | None, mark: str) -> tuple[str, list[int]]:
    clauses, args = [], []
    if since_ms is not None:
        clauses.append(f"ts_ms >= {mark}")
        args.append(since_ms)
    if until_ms is not None:
        clauses.append(f"ts_ms < {mark}")
        args.append(until_ms)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), args


def migrate(db: Any, mark: str, begin: str = "BEGIN") -> None:
    """Bring the schema to SCHEMA_VERSION (a DB-API connection in autocommit mode). One
    transaction, opened with `begin` so that two processes starting at once take turns."""
    db.execute("CREATE TABLE IF NOT EXISTS ledger_schema (version INTEGER NOT NULL)")
    db.execute(begin)
    try:
        found = db.execute("SELECT version FROM ledger_schema").fetchone()
        version = found[0] if found else 0
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"the ledger's schema is version {version}, newer than this tallygate's "
                f"({SCHEMA_VERSION}): upgrade tallygate"
            )
        for number in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[number]:
                db.execute(statement)
        if version == 0:
            db.execute(f"INSERT INTO ledger_schema (version) VALUES ({mark})", (SCHEMA_VERSION,))
        elif version < SCHEMA_VERSION:
            db.execute(f"UPDATE ledger_schema SET version = {mark}", (SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
