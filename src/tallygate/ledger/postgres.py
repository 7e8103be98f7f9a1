"""The ledger in PostgreSQL, shared by every replica: psycopg 3's blocking API, one connection
used from one thread at a time (the writer's, or a report's), like SqliteStore.

psycopg is the optional extra `tallygate[postgres]`: importing this module without it raises
LedgerError, which says how to install it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tallygate.ledger.rows import COLUMNS, Row
from tallygate.ledger.store import _SELECT, LedgerError, _range, migrate

try:
    import psycopg
    from psycopg import conninfo
except ImportError as missing:  # the extra is not installed
    raise LedgerError(
        "ledger: a postgresql:// store needs psycopg 3: pip install 'tallygate[postgres]'"
    ) from missing

# Seconds to wait for the server when the URL names no connect_timeout: an unreachable server
# fails fast, and the writer spools its rows meanwhile.
CONNECT_TIMEOUT = 5
# Rows a report fetches per round trip from its server-side cursor.
FETCH_ROWS = 2000
# The session-level advisory lock taken around migrations (per database: PostgreSQL keys
# advisory locks by database too), so that replicas starting together migrate one at a time.
# Any constant does; this one is "tallygat" in ASCII.
MIGRATION_LOCK = 0x74616C6C79676174

_INSERT = (
    f"INSERT INTO usage ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
    "ON CONFLICT (request_id, attempt) DO NOTHING"
)


def redacted(url: str) -> str:
    """The URL without its password (in the user part or as a `password=` parameter)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "password" for key, _ in pairs):
            query = urlencode([(k, "***" if k == "password" else v) for k, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


class PostgresStore:
    def __init__(self, url: str) -> None:
        self.url = url
        self._cursors = itertools.count()
        password = urlsplit(url).password or ""
        try:
            params = conninfo.conninfo_to_dict(url)
        except psycopg.ProgrammingError as error:
            raise LedgerError(
                f"ledger: {redacted(url)} is not a PostgreSQL URL: {_scrub(str(error), password)}"
            ) from None
        password = str(params.get("password") or "")  # from the user part or a parameter
        dsn = url
        if "connect_timeout" not in params:  # the URL's own wins
            dsn = conninfo.make_conninfo(url, connect_timeout=CONNECT_TIMEOUT)
        try:
            # Autocommit: `migrate` and `insert` say where their transactions begin and end.
            self._db = psycopg.connect(dsn, autocommit=True)
        except psycopg.Error as error:
            raise LedgerError(
                f"ledger: cannot connect to {redacted(url)}: {_scrub(str(error), password)}"
            ) from None
        try:
            # Session-level, not transaction-level: `migrate` runs statements outside its
            # transactions too (CREATE TABLE IF NOT EXISTS, which races in PostgreSQL).
            self._db.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
            migrate(self._db, "%s")
            self._db.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        except LedgerError:
            self._db.close()  # closing releases the lock
            raise
        except psycopg.Error as error:
            self._db.close()
            raise LedgerError(
                f"ledger: cannot migrate {redacted(url)}: {_scrub(str(error), password)}"
            ) from None

    def insert(self, rows: Sequence[Row]) -> int:
        if not rows:
            return 0
        db = self._db
        if db.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS:
            # Inside a rows() iteration the insert would commit only when the iteration ends.
            raise LedgerError("ledger: insert while a rows() iteration of this store is open")
        # Every transaction takes its rows' locks in one order (the key's): two processes
        # inserting the same rows wait for each other instead of deadlocking.
        ordered = sorted(rows, key=lambda row: (row.request_id, row.attempt))
        with db.transaction(), db.cursor() as cursor:
            cursor.executemany(_INSERT, ordered)
            inserted = cursor.rowcount  # the sum over the rows: 1 each if new, 0 if there
        return inserted

    def rows(self, since_ms: int | None = None, until_ms: int | None = None) -> Iterator[Row]:
        where, args = _range(since_ms, until_ms, "%s")
        db = self._db
        # A server-side cursor lives in a transaction: the report reads one snapshot,
        # FETCH_ROWS rows at a time.
        name = f"tallygate_rows_{next(self._cursors)}"
        with db.transaction(), db.cursor(name) as cursor:
            cursor.itersize = FETCH_ROWS
            cursor.execute(f"{_SELECT}{where} ORDER BY ts_ms", args)
            for values in cursor:
                yield Row(*values)

    def close(self) -> None:
        self._db.close()


def _scrub(message: str, password: str) -> str:
    return message.replace(password, "***") if password else message
