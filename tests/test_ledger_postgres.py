"""The ledger's PostgreSQL store against a real PostgreSQL server, started for this session.

The server is Debian's `postgresql` package (.ci/run installs it): its initdb and pg_ctl make a
throwaway cluster in a temporary directory, listening on 127.0.0.1 at a port the OS picked.
PostgreSQL refuses to run as root, so as root the cluster belongs to the `postgres` system
user and its commands run through `runuser`. Without the server binaries these tests fail:
they do not skip.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tallygate.ledger import postgres
from tallygate.ledger.postgres import CONNECT_TIMEOUT, PostgresStore, redacted
from tallygate.ledger.rows import COLUMNS, Row
from tallygate.ledger.store import SCHEMA_VERSION, LedgerError, SqliteStore, open_store

# -- the server -----------------------------------------------------------------------------------


def server_binaries() -> Path:
    """The directory holding initdb and pg_ctl: on PATH, else Debian's newest version."""
    on_path = shutil.which("pg_ctl")
    candidates = [Path(on_path).parent] if on_path else []
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    debian.sort(key=lambda path: [int(n) for n in re.findall(r"\d+", path)], reverse=True)
    candidates += [Path(path) for path in debian]
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    pytest.fail(
        "PostgreSQL's server binaries (initdb, pg_ctl) are not on PATH nor in "
        "/usr/lib/postgresql/*/bin: install Debian's `postgresql` package "
        "(apt-get install -y postgresql; .ci/run does)",
        pytrace=False,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Cluster:
    """A throwaway cluster in `base`, run as the postgres user when this process is root."""

    def __init__(self, binaries: Path) -> None:
        self.binaries = binaries
        self.base = Path(tempfile.mkdtemp(prefix="tallygate-pg-"))
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                pytest.fail(
                    "running as root, the PostgreSQL tests need the `postgres` system user "
                    "(Debian's postgresql package creates it)",
                    pytrace=False,
                )
            os.chown(self.base, owner.pw_uid, owner.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def run(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, str(self.binaries / tool), *args],
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=120,
        )

    def start(self) -> str:
        made = self.run(
            "initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if made.returncode != 0:
            pytest.fail(f"initdb failed:\n{made.stdout}\n{made.stderr}", pytrace=False)
        # Another process may take the port between the probe and the server's bind: then
        # the start fails, and another port is tried.
        for _ in range(3):
            port = free_port()
            options = (
                f"-c listen_addresses=127.0.0.1 -c port={port} "
                f"-c unix_socket_directories={self.base} "
                "-c fsync=off"  # a throwaway cluster: no need to wait for the disk
            )
            started = self.run(
                "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                "-t", "60", "start",
            )  # fmt: skip
            if started.returncode == 0:
                url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
                self.wait_for(url)
                return url
        pytest.fail(f"PostgreSQL did not start:\n{self.log_tail()}", pytrace=False)

    def wait_for(self, url: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg.connect(url, connect_timeout=2).close()
                return
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    pytest.fail(f"PostgreSQL does not answer: {error}\n{self.log_tail()}")
                time.sleep(0.1)

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-30:])
        except OSError:
            return "(no server log)"


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL server run for this test session, as its superuser."""
    cluster = Cluster(server_binaries())
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def database(postgres_server: str) -> str:
    """The URL of a new, empty database on the session's server."""
    name = f"ledger_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_server, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return postgres_server.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def store(database: str) -> Iterator[PostgresStore]:
    opened = PostgresStore(database)
    yield opened
    opened.close()


def query(url: str, statement: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as db:
        return db.execute(statement).fetchall()


# -- rows -----------------------------------------------------------------------------------------


def row(n: int, ts_ms: int = 1_790_000_000_000, **changes: Any) -> Row:
    """A realistic row: a streamed chat completion, its costs in nano-USD."""
    values = Row(
        request_id=f"req_{n:06d}_7f3a9c2e", attempt=0, ts_ms=ts_ms, tenant="acme",
        user_id="u-1842", session_id="sess-9b1f", tags='{"team":"données","env":"prod"}',
        key_id="key_live_4f2a", route="/v1/chat/completions", upstream="openai",
        model="gpt-4o-mini-2024-07-18", priced_as="gpt-4o-mini", dialect="openai_chat",
        status=200, outcome="ok", stream=1, tokens_source="reported", input_tokens=1_204,
        cached_input_tokens=1_024, cache_write_input_tokens=0, output_tokens=387,
        reasoning_tokens=0, client_in=5_812, client_out=9_431, upstream_out=5_790,
        upstream_in=31_077, cost_input=27_000, cost_cached_input=76_800,
        cost_cache_write_input=0, cost_output=232_200, cost_egress=123_455_852_012,
        cost_total=123_456_789_012, price_version="2026-09-10", duration_ms=2_318,
    )  # fmt: skip
    return values._replace(**changes)


def sparse(n: int, ts_ms: int) -> Row:
    """A refused request's row: no model, no user, nothing priced."""
    return row(
        n, ts_ms, user_id=None, session_id=None, tags=None, key_id=None, model=None,
        priced_as=None, status=429, outcome="rejected", stream=0, tokens_source="none",
        input_tokens=0, cached_input_tokens=0, output_tokens=0, client_out=112,
        upstream_out=0, upstream_in=0, cost_input=0, cost_cached_input=0, cost_output=0,
        cost_egress=0, cost_total=0, duration_ms=0,
    )  # fmt: skip


# -- schema ---------------------------------------------------------------------------------------


def test_migrate_creates_the_schema_and_opening_again_changes_nothing(database: str) -> None:
    first = PostgresStore(database)
    assert first.insert([row(1)]) == 1
    first.close()
    assert query(database, "SELECT version FROM ledger_schema") == [(SCHEMA_VERSION,)]
    columns = query(
        database,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'usage' "
        "ORDER BY ordinal_position",
    )
    assert tuple(name for (name,) in columns) == COLUMNS
    indexes = query(database, "SELECT indexname FROM pg_indexes WHERE tablename = 'usage'")
    assert {name for (name,) in indexes} == {"usage_pkey", "usage_ts"}

    second = PostgresStore(database)  # the schema is there: nothing runs, nothing is lost
    assert list(second.rows()) == [row(1)]
    second.close()
    assert query(database, "SELECT version FROM ledger_schema") == [(SCHEMA_VERSION,)]


def test_a_newer_schema_is_refused(database: str) -> None:
    PostgresStore(database).close()
    with psycopg.connect(database, autocommit=True) as db:
        db.execute("UPDATE ledger_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(LedgerError, match="newer than this tallygate"):
        PostgresStore(database)


def test_replicas_starting_together_migrate_once(database: str) -> None:
    """Without the advisory lock, the second CREATE TABLE fails (or its version row doubles)."""
    count = 6
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            PostgresStore(database).close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert query(database, "SELECT version FROM ledger_schema") == [(SCHEMA_VERSION,)]


# -- insert and rows ------------------------------------------------------------------------------


def test_insert_is_idempotent_and_counts_what_it_inserted(store: PostgresStore) -> None:
    first = [row(1, 1_000), row(1, 1_500, attempt=1, upstream="azure"), sparse(2, 2_000)]
    assert store.insert(first) == 3
    assert store.insert(first) == 0
    assert store.insert([*first, row(3, 3_000)]) == 1
    assert store.insert([row(4, 4_000), row(4, 4_000)]) == 1  # twice in one batch: once
    assert store.insert([]) == 0
    assert list(store.rows()) == [*first, row(3, 3_000), row(4, 4_000)]


def test_a_failed_insert_inserts_nothing(store: PostgresStore) -> None:
    with pytest.raises(psycopg.Error):
        store.insert([row(1, 1_000), row(2, 2_000, tenant=None)])
    assert list(store.rows()) == []
    assert store.insert([row(1, 1_000)]) == 1  # the connection is usable again


def test_rows_are_those_of_the_range_oldest_first(store: PostgresStore) -> None:
    by_ts = {ts: row(ts, ts) for ts in (4_000, 1_000, 3_000, 2_000, 5_000)}
    store.insert(list(by_ts.values()))

    def ts_of(since: int | None, until: int | None) -> list[int]:
        return [found.ts_ms for found in store.rows(since, until)]

    assert ts_of(None, None) == [1_000, 2_000, 3_000, 4_000, 5_000]
    assert ts_of(2_000, 4_000) == [2_000, 3_000]  # since included, until not
    assert ts_of(2_001, None) == [3_000, 4_000, 5_000]
    assert ts_of(None, 3_000) == [1_000, 2_000]
    assert ts_of(3_000, 3_000) == []
    assert list(store.rows(2_000, 2_001)) == [by_ts[2_000]]


def test_rows_come_from_a_server_side_cursor_in_bounded_fetches(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "FETCH_ROWS", 7)
    store.insert([row(n, 1_000 + n) for n in range(50)])
    fetched = store.rows()
    assert next(fetched).ts_ms == 1_000
    # While the report reads, its rows stay on the server, behind a named cursor.
    cursors = store._db.execute("SELECT name FROM pg_cursors").fetchall()
    assert [name for (name,) in cursors] == ["tallygate_rows_0"]
    with pytest.raises(LedgerError, match="rows\\(\\) iteration"):
        store.insert([row(99, 9_999)])
    assert [found.ts_ms for found in fetched] == [1_000 + n for n in range(1, 50)]

    abandoned = store.rows()
    next(abandoned)
    abandoned.close()  # a report that stops early leaves the store usable
    assert store.insert([row(99, 9_999)]) == 1
    assert len(list(store.rows())) == 51


def test_two_stores_inserting_overlapping_rows_at_once_keep_each_row_once(database: str) -> None:
    """Two replicas replaying overlapping spools, in opposite orders: without one lock order,
    PostgreSQL would find a deadlock and abort one of them."""
    stores = [PostgresStore(database), PostgresStore(database)]
    rounds, size = 20, 200
    batches: list[list[list[Row]]] = [[], []]
    for r in range(rounds):
        shared = [row(r * 1_000 + n, 1_000_000 + r * 1_000 + n) for n in range(size)]
        own = [
            [row(r * 1_000 + 500 + n, 2_000_000 + r * 1_000 + n) for n in range(20)],
            [row(r * 1_000 + 700 + n, 3_000_000 + r * 1_000 + n) for n in range(20)],
        ]
        batches[0].append(shared + own[0])
        batches[1].append(own[1] + shared[::-1])
    inserted = [0, 0]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def replay(which: int) -> None:
        try:
            for batch in batches[which]:
                barrier.wait(30)
                inserted[which] += stores[which].insert(batch)
        except BaseException as error:
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=replay, args=(which,)) for which in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for opened in stores:
        opened.close()
    assert errors == []

    expected = {found for batch in batches[0] + batches[1] for found in batch}
    assert sum(inserted) == len(expected) == rounds * (size + 40)
    check = PostgresStore(database)
    kept = list(check.rows())
    check.close()
    assert len(kept) == len(expected) and set(kept) == expected


def test_sqlite_and_postgres_give_back_the_same_rows(store: PostgresStore, tmp_path: Path) -> None:
    rows = [
        row(1, 1_790_000_000_000),
        row(1, 1_790_000_000_250, attempt=1, upstream="azure", cost_total=9_223_372_036),
        sparse(2, 1_790_000_001_000),
        row(3, 1_790_000_002_000, tenant="zürich-😀", tags='{"k":"v\\"q"}', cost_total=0),
        row(4, 1_790_000_003_000, input_tokens=2**40, cost_egress=2**62, cost_total=2**62),
    ]
    lite = SqliteStore(f"sqlite:///{tmp_path / 'ledger.db'}")
    try:
        assert lite.insert(rows) == store.insert(rows) == len(rows)
        assert list(store.rows()) == list(lite.rows()) == rows
        for since, until in ((1_790_000_000_250, 1_790_000_002_000), (None, 1_790_000_001_000)):
            assert list(store.rows(since, until)) == list(lite.rows(since, until))
        # Equal and of the same types (5 == Decimal(5) == 5.0, but a report's sums differ).
        types = [[type(value) for value in found] for found in store.rows()]
        assert types == [[type(value) for value in found] for found in lite.rows()]
    finally:
        lite.close()


def test_open_store_opens_postgresql_urls(database: str) -> None:
    for url in (database, database.replace("postgresql://", "postgres://", 1)):
        opened = open_store(url)
        assert isinstance(opened, PostgresStore)
        opened.close()


# -- failures -------------------------------------------------------------------------------------


def test_a_refused_connection_fails_fast_without_the_password() -> None:
    port = free_port()  # nothing listens there
    for url in (
        f"postgresql://ledger:s3cret-pw@127.0.0.1:{port}/usage",
        f"postgresql://ledger@127.0.0.1:{port}/usage?password=s3cret-pw&sslmode=disable",
    ):
        started = time.monotonic()
        with pytest.raises(LedgerError) as refused:
            PostgresStore(url)
        assert time.monotonic() - started < 2
        message = str(refused.value)
        assert "s3cret-pw" not in message
        assert f"127.0.0.1:{port}/usage" in message and "cannot connect" in message


def test_a_server_that_never_answers_times_out() -> None:
    """A listener that never speaks (a hung server, or a firewall that accepts): the connect
    gives up after CONNECT_TIMEOUT seconds instead of hanging the writer."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(LedgerError, match="cannot connect") as timed_out:
            PostgresStore(f"postgresql://ledger:s3cret-pw@127.0.0.1:{port}/usage")
        elapsed = time.monotonic() - started
    assert CONNECT_TIMEOUT - 1 < elapsed < CONNECT_TIMEOUT + 3
    assert "s3cret-pw" not in str(timed_out.value)


def test_a_store_whose_connection_dropped_fails_its_insert_and_a_new_one_works(
    store: PostgresStore, database: str
) -> None:
    """The writer's path when the server restarts: the insert fails (its rows are spooled),
    the writer drops the store and opens another."""
    assert store.insert([row(1, 1_000)]) == 1
    with psycopg.connect(database, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (store._db.info.backend_pid,))
    with pytest.raises(psycopg.OperationalError):
        store.insert([row(2, 2_000)])
    again = PostgresStore(database)
    assert again.insert([row(1, 1_000), row(2, 2_000)]) == 1
    again.close()


def test_a_url_that_is_not_one_is_refused_without_its_password() -> None:
    with pytest.raises(LedgerError, match="not a PostgreSQL URL") as refused:
        PostgresStore("postgresql://ledger:s3cret-pw@127.0.0.1/usage?no_such_option=1")
    assert "s3cret-pw" not in str(refused.value)


def test_redacted_hides_only_the_password() -> None:
    assert redacted("postgresql://ledger:p%40ss@db.internal:5432/usage?sslmode=require") == (
        "postgresql://ledger:***@db.internal:5432/usage?sslmode=require"
    )
    assert redacted("postgresql://ledger@db/usage?password=x&application_name=tg") == (
        "postgresql://ledger@db/usage?password=***&application_name=tg"
    )
    assert redacted("postgresql://db/usage") == "postgresql://db/usage"
