"""PostgreSQL backend specifics, on a real server (tests/dbservers.py).

What the shared contract (test_storage_contract.py) cannot say: the go-policyd table
upgraded in place, names of any length, concurrent migrations, and surviving a server
restart or a killed backend without reopening the storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from policyd.quota import Outcome
from policyd.storage import Event, StorageError, create_storage
from policyd.storage.postgresql import CONNECT_TIMEOUT, PostgreSQLStorage

pytestmark = pytest.mark.postgresql

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(hours=24)
COUNTED = (Outcome.DUNNO, Outcome.HOLD)
_database_numbers = itertools.count(1)

# go-policyd's table (table_structure.sql), as copied into PostgreSQL: UTC wall-clock
# times without a zone, padded char(n) columns, a composite primary key.
GO_POLICYD_TABLE = """
CREATE TABLE events (
    ts timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    sasl_username char(8) NOT NULL DEFAULT '',
    sender char(80) NOT NULL DEFAULT '',
    client_address char(80) NOT NULL DEFAULT '',
    recipient_count integer DEFAULT NULL,
    PRIMARY KEY (ts, sasl_username, sender, client_address)
);
ALTER TABLE events OWNER TO policyd;
INSERT INTO events VALUES
    ('2026-11-24 11:00:00.123', 'alice', 'alice@example.org', '192.0.2.1', 10),
    ('2026-11-24 11:00:00.123', 'bob', 'bob@example.org', '192.0.2.2', 3),
    ('2026-11-24 11:30:00', 'alice', 'other@example.org', '192.0.2.1', NULL),
    ('2026-11-23 12:30:00', 'alice', 'alice@example.org', '2001:db8::1', 5),
    ('2026-11-23 11:59:59.999', 'alice', 'alice@example.org', '192.0.2.1', 100),
    ('2026-11-10 08:00:00', 'carol', 'carol@example.org', '192.0.2.3', 7);
"""
GO_POLICYD_ROWS = {
    # (ts as UTC text, user, sender, client, recipient_count as text)
    ("2026-11-24 11:00:00.123", "alice", "alice@example.org", "192.0.2.1", "10"),
    ("2026-11-24 11:00:00.123", "bob", "bob@example.org", "192.0.2.2", "3"),
    ("2026-11-24 11:30:00.000", "alice", "other@example.org", "192.0.2.1", "NULL"),
    ("2026-11-23 12:30:00.000", "alice", "alice@example.org", "2001:db8::1", "5"),
    ("2026-11-23 11:59:59.999", "alice", "alice@example.org", "192.0.2.1", "100"),
    ("2026-11-10 08:00:00.000", "carol", "carol@example.org", "192.0.2.3", "7"),
}


def event(
    user: str, recipients: int, age: timedelta = timedelta(0), outcome: Outcome = Outcome.DUNNO
) -> Event:
    return Event(NOW - age, user, f"{user[:20]}@example.org", "192.0.2.9", recipients, outcome)


class PgDatabase:
    """A fresh database on the session server, owned by the test user."""

    def __init__(self, server: Any, name: str, url: str) -> None:
        self.server = server
        self.name = name
        self.url = url

    def admin(self, sql: str) -> str:
        """SQL as the superuser in this database (psql; blocks: the event loop does not run)."""
        return str(self.server.admin_execute(sql, database=self.name)).rstrip("\n")

    def storage(self, table: str = "events") -> PostgreSQLStorage:
        store = create_storage(self.url, table)
        assert isinstance(store, PostgreSQLStorage)
        return store

    def policyd_backends(self) -> list[int]:
        out = self.admin(
            f"SELECT pid FROM pg_stat_activity WHERE datname = '{self.name}' AND application_name = 'policyd'"
        )
        return [int(line) for line in out.splitlines() if line.strip()]


@pytest.fixture
def pg(postgresql_server: Any) -> Iterator[PgDatabase]:
    name = f"pgb_{os.getpid()}_{next(_database_numbers)}"
    url = postgresql_server.create_database(name)
    yield PgDatabase(postgresql_server, name, url)
    if not postgresql_server.running:  # a failed outage test: leave the server usable
        postgresql_server.start_server()
    postgresql_server.drop_database(name)


def sleep_without_the_event_loop(seconds: float) -> None:
    """Block on purpose: asyncpg must not get to notice its connections died."""
    time.sleep(seconds)


@contextlib.asynccontextmanager
async def opened(store: PostgreSQLStorage) -> AsyncIterator[PostgreSQLStorage]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    """Lines of the policyd logger, debug included (which may not propagate to caplog's root handler)."""
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("policyd")
    handler = Collect(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


# ---------------------------------------------------------------------------
# the URL
# ---------------------------------------------------------------------------


def test_url_is_parsed_without_connecting() -> None:
    store = create_storage("postgresql://po%40licy:s3cr%3At%2Fpw@db.example.org:6543/mail%5Fdb", "Events")
    assert isinstance(store, PostgreSQLStorage)
    assert (store.user, store.password, store.host, store.port, store.database) == (
        "po@licy",
        "s3cr:t/pw",
        "db.example.org",
        6543,
        "mail_db",
    )
    assert store.relname == "events"  # unquoted SQL names fold to lower case
    assert "s3cr" not in store.description
    assert store.description == "postgresql://po@licy@db.example.org:6543/mail_db table events"

    default = create_storage("postgres://u:p@[2001:db8::5]/policyd?sslmode=require", "events")
    assert isinstance(default, PostgreSQLStorage)
    assert (default.host, default.port, default.ssl) == ("2001:db8::5", 5432, "require")
    assert "[2001:db8::5]:5432" in default.description


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://u:p@host:5432/", "database name"),
        ("postgresql://u:p@host", "database name"),
        ("postgresql://u:p@host:99999/db", "invalid port"),
        ("postgresql://u:p@host:port/db", "invalid port"),
        ("postgresql://u:p@host/db?schema=x", "unsupported parameter"),
        ("postgresql://u:p@host/db?sslmode=sometimes", "sslmode"),
        ("postgresql+psycopg://u:p@host/db", "not a postgresql"),
    ],
)
def test_bad_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        PostgreSQLStorage.from_url(url, "events")
    assert ":p@" not in str(caught.value)


def test_table_name_longer_than_postgresql_allows() -> None:
    with pytest.raises(ValueError, match="longer"):
        PostgreSQLStorage.from_url("postgresql://u:p@h/db", "t" * 64)


# ---------------------------------------------------------------------------
# schema
# ---------------------------------------------------------------------------


async def test_fresh_schema_types_and_indexes(pg: PgDatabase) -> None:
    async with opened(pg.storage()) as store:
        pending = await store.pending_migrations()
        assert pending == [
            "create table events",
            "create index events_user_ts",
            "create index events_user_md5_ts",
            "create index events_ts",
            "create index events_event_id",
            "create table events_overrides (per-user limit overrides)",
            "create table events_lists (allow and block entries)",
            "create table events_resets (resets of users' counted recipients)",
            "create table events_alerts (alerts told, one per incident)",
        ]
        assert await store.migrate() == pending
        assert await store.pending_migrations() == []
    columns = pg.admin(
        "SELECT column_name, data_type, coalesce(datetime_precision::text, ''), is_nullable, "
        "coalesce(column_default, ''), is_identity, coalesce(identity_generation, '') "
        "FROM information_schema.columns WHERE table_name = 'events' ORDER BY ordinal_position"
    )
    assert [line.split("\t") for line in columns.splitlines()] == [
        ["id", "bigint", "", "NO", "", "YES", "ALWAYS"],
        ["ts", "timestamp with time zone", "3", "NO", "", "NO", ""],
        ["sasl_username", "text", "", "NO", "''::text", "NO", ""],
        ["sender", "text", "", "YES", "", "NO", ""],
        ["client_address", "text", "", "YES", "", "NO", ""],
        ["recipient_count", "integer", "", "YES", "", "NO", ""],
        ["action", "character varying", "", "NO", "'DUNNO'::character varying", "NO", ""],
        ["event_id", "character", "", "YES", "", "NO", ""],
        ["queue_id", "text", "", "YES", "", "NO", ""],
        ["origin", "text", "", "YES", "", "NO", ""],
    ]
    indexes = pg.admin("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'events' ORDER BY 1")
    definitions = dict(line.split("\t") for line in indexes.splitlines())
    assert set(definitions) == {
        "events_pkey",
        "events_user_ts",
        "events_user_md5_ts",
        "events_ts",
        "events_event_id",
    }
    assert (
        "INCLUDE (recipient_count, action) WHERE (length(sasl_username) <= 512)"
        in definitions["events_user_ts"]
    )
    assert "md5(sasl_username), ts) WHERE (length(sasl_username) > 512)" in definitions["events_user_md5_ts"]
    assert definitions["events_event_id"].startswith("CREATE UNIQUE INDEX")


async def test_long_table_names_get_short_index_names(pg: PgDatabase) -> None:
    table = "policyd_events_with_a_rather_long_name_" + "x" * 24  # 63 characters
    async with opened(pg.storage(table)) as store:
        steps = await store.migrate()
        indexes = [step.removeprefix("create index ") for step in steps if step.startswith("create index")]
        assert len(indexes) == 4
        assert all(len(name) <= 63 for name in indexes)
        assert await store.pending_migrations() == []
        await store.add_events([event("alice", 2)])
        assert await store.recipients_since("alice", NOW - DAY, COUNTED) == 2


async def test_go_policyd_table_is_upgraded_in_place(pg: PgDatabase) -> None:
    # A server whose own clock is far from UTC: the old values must still read as UTC.
    pg.admin(f"ALTER DATABASE {pg.name} SET timezone TO 'Pacific/Auckland';\n" + GO_POLICYD_TABLE)
    since = NOW - DAY
    async with opened(pg.storage()) as store:
        # Before migrate (the daemon migrates at start, `policyd top` may come first):
        # reads work on the old table; all its rows were let through (DUNNO).
        assert await store.count_events() == 6
        assert await store.recipients_since("alice", since, COUNTED) == 15  # 10 + NULL + 5
        assert await store.recipients_since("bob", since, COUNTED) == 3
        assert await store.recipients_since("alice", since, (Outcome.REJECT,)) == 0
        top = await store.top_senders(since, 10)
        assert [(s.sasl_username, s.recipients, s.messages, s.held, s.rejected) for s in top] == [
            ("alice", 15, 3, 0, 0),
            ("bob", 3, 1, 0, 0),
        ]
        assert top[0].last_seen == datetime(2026, 11, 24, 11, 30, tzinfo=UTC)
        # The window loads from it too (no ids to tail yet).
        window = {h.sasl_username: h for h in await store.load_window(since, 0, "relay")}
        assert {user: sum(h.counts) for user, h in window.items()} == {"alice": 15, "bob": 3}
        assert {code for h in window.values() for code in h.codes} == {0}
        assert await store.max_event_id() == 0
        assert (await store.tail(0, "relay", 10)).rows == []
        # Writing needs the new schema (event_id): a clear StorageError, nothing written.
        with pytest.raises(StorageError, match="run: policyd migrate"):
            await store.add_events([event("alice", 1)])
        assert await store.count_events() == 6

        pending = await store.pending_migrations()
        assert pending == [
            "convert ts to timestamptz(3), reading the old values as UTC",
            "widen sasl_username from char to text, trimming the padding",
            "widen sender from char to text, trimming the padding",
            "widen client_address from char to text, trimming the padding",
            "add column action",
            "add column event_id",
            "add column queue_id",
            "add column origin",
            "drop primary key events_pkey (ts, sasl_username, sender, client_address)",
            "add column id (identity, primary key)",
            "create index events_user_ts",
            "create index events_user_md5_ts",
            "create index events_ts",
            "create index events_event_id",
            "analyze events",
            "create table events_overrides (per-user limit overrides)",
            "create table events_lists (allow and block entries)",
            "create table events_resets (resets of users' counted recipients)",
            "create table events_alerts (alerts told, one per incident)",
        ]
        assert await store.migrate() == pending
        assert await store.pending_migrations() == []
        assert await store.migrate() == []

        # Every row kept, padding gone, instants unchanged, old rows are DUNNO.
        rows = pg.admin(
            "SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS'), sasl_username, sender, "
            "client_address, coalesce(recipient_count::text, 'NULL'), action, event_id IS NULL, id "
            "FROM events"
        )
        parsed = [line.split("\t") for line in rows.splitlines()]
        assert {tuple(fields[:5]) for fields in parsed} == GO_POLICYD_ROWS
        assert {(fields[5], fields[6]) for fields in parsed} == {("DUNNO", "t")}
        assert sorted(int(fields[7]) for fields in parsed) == [1, 2, 3, 4, 5, 6]
        assert (
            pg.admin(
                "SELECT a.attname FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = 'events'::regclass AND i.indisprimary"
            )
            == "id"
        )

        # Same answers after, and what go-policyd refused now works.
        assert await store.recipients_since("alice", since, COUNTED) == 15
        assert await store.recipients_since("alice", since, (Outcome.REJECT,)) == 0
        long_name = secrets.token_hex(5000)  # 10,000 characters pglz cannot shrink
        same_ms = [event("alice", 1), event("alice", 1)]
        await store.add_events([*same_ms, event(long_name, 4)])
        await store.add_events(same_ms)  # replayed: skipped
        assert await store.recipients_since("alice", since, COUNTED) == 17
        assert await store.recipients_since(long_name, since, COUNTED) == 4
        assert await store.count_events() == 9
        assert await store.purge(NOW - timedelta(days=7), batch_rows=2) == 1  # carol's
        assert await store.count_events() == 8


async def test_go_policyd_table_with_a_timestamptz_of_another_precision(pg: PgDatabase) -> None:
    pg.admin(
        "CREATE TABLE events (ts timestamptz NOT NULL, sasl_username varchar(64), sender varchar(80), "
        "client_address varchar(80), recipient_count integer);\n"
        "ALTER TABLE events OWNER TO policyd;\n"
        "INSERT INTO events VALUES ('2026-11-24 10:00:00.1234+00', NULL, 'x@y', '192.0.2.1', 2), "
        "('2026-11-24 10:00:00.5+00', 'dave ', 'd@y', '192.0.2.1', 1);"
    )
    async with opened(pg.storage()) as store:
        steps = await store.migrate()
        assert "change ts to millisecond precision" in steps
        assert "replace NULL sasl_username by ''" in steps
        assert "make id the primary key" not in steps
        assert await store.pending_migrations() == []
        assert await store.count_events() == 2
        # varchar keeps its value as it was (trailing space included): only char(n) pads.
        assert await store.recipients_since("dave ", NOW - DAY, COUNTED) == 1
        assert await store.recipients_since("", NOW - DAY, COUNTED) == 2


@pytest.mark.parametrize("start", ["empty", "go-policyd"])
async def test_daemons_migrating_together_do_not_fail(pg: PgDatabase, start: str) -> None:
    if start == "go-policyd":
        pg.admin(GO_POLICYD_TABLE)
    stores = [pg.storage() for _ in range(4)]
    for store in stores:
        await store.open()
    try:
        results = await asyncio.gather(*(store.migrate() for store in stores))
        assert sorted(len(steps) > 0 for steps in results) == [False, False, False, True]
        for store in stores:
            assert await store.pending_migrations() == []
        assert await stores[0].count_events() == (6 if start == "go-policyd" else 0)
    finally:
        for store in stores:
            await store.close()


# ---------------------------------------------------------------------------
# names of any length, one clock
# ---------------------------------------------------------------------------


async def test_names_of_any_length_use_their_index(pg: PgDatabase) -> None:
    names = [
        "é" * 512,  # 1024 bytes: still a "short" name
        "é" * 513,
        "u" * 10_000,
        secrets.token_hex(5000),  # incompressible: would not fit any btree entry as is
        "x" * 100_000,
    ]
    async with opened(pg.storage()) as store:
        await store.migrate()
        await store.add_events([event(f"user{i % 100}", 1, timedelta(seconds=i)) for i in range(5000)])
        await store.add_events([event(name, n + 1) for n, name in enumerate(names)])
        await store.add_events([event(name, 50, outcome=Outcome.REJECT) for name in names])
        for n, name in enumerate(names):
            assert await store.recipients_since(name, NOW - DAY, COUNTED) == n + 1
            assert await store.recipients_since(name[:-1] + "#", NOW - DAY, COUNTED) == 0
        # By every outcome's recipients (the REJECTs included), the long names come first.
        top = await store.top_senders(NOW - DAY, 5, counted=(Outcome.DUNNO, Outcome.HOLD, Outcome.REJECT))
        assert {s.sasl_username for s in top} == set(names)

    pg.admin("VACUUM ANALYZE events")
    import asyncpg

    connection = await asyncpg.connect(pg.url)
    try:
        explain = await connection.prepare("EXPLAIN (COSTS OFF) " + store._sum_sql())
        args = (NOW - DAY, ["DUNNO", "HOLD"])
        short_plan = "\n".join(row[0] for row in await explain.fetch("user7", *args))
        assert "Index Only Scan using events_user_ts" in short_plan
        assert "md5" not in short_plan  # the other branch is folded away
        long_plan = "\n".join(row[0] for row in await explain.fetch(names[3], *args))
        assert "events_user_md5_ts" in long_plan
        assert "Seq Scan" not in long_plan
    finally:
        await connection.close()


async def test_the_window_is_in_one_clock(pg: PgDatabase) -> None:
    pg.admin(f"ALTER DATABASE {pg.name} SET timezone TO 'America/New_York'")
    async with opened(pg.storage()) as store:
        await store.migrate()
        await store.add_events([event("alice", 3, DAY), event("alice", 4, timedelta(hours=1))])
        for zone in ("UTC", "Europe/Paris", "America/Los_Angeles", "Asia/Kolkata"):
            since = (NOW - DAY).astimezone(ZoneInfo(zone))
            assert await store.recipients_since("alice", since, COUNTED) == 7
            assert await store.recipients_since("alice", since + timedelta(milliseconds=1), COUNTED) == 4
    stored = pg.admin("SELECT to_char(min(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') FROM events")
    assert stored == "2026-11-23 12:00:00.000"


async def test_microseconds_are_truncated_like_the_other_backends(pg: PgDatabase) -> None:
    async with opened(pg.storage()) as store:
        await store.migrate()
        moment = NOW + timedelta(microseconds=999_900)  # timestamptz(3) alone would round up
        await store.add_events([Event(moment, "alice", "a@x", "192.0.2.1", 2, Outcome.DUNNO)])
        [top] = await store.top_senders(NOW, 1)
        assert top.last_seen == NOW + timedelta(milliseconds=999)
        assert await store.recipients_since("alice", NOW + timedelta(microseconds=999_999), COUNTED) == 2


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------


async def test_nul_bytes_are_a_storage_error(pg: PgDatabase) -> None:
    async with opened(pg.storage()) as store:
        await store.migrate()
        with pytest.raises(StorageError, match="NUL"):
            await store.add_events([event("alice", 1), event("bad\x00name", 1)])
        with pytest.raises(StorageError, match="NUL"):
            await store.add_events([Event(NOW, "alice", "a\x00@x", "192.0.2.1", 1, Outcome.DUNNO)])
        with pytest.raises(StorageError, match="NUL"):
            await store.recipients_since("bad\x00name", NOW - DAY, COUNTED)
        assert await store.count_events() == 0  # the whole batch was refused
        await store.add_events([event("alice", 1)])
        assert await store.count_events() == 1


async def test_not_open_and_missing_table_are_storage_errors(pg: PgDatabase) -> None:
    store = pg.storage()
    with pytest.raises(StorageError, match="not open"):
        await store.count_events()
    async with opened(store):
        with pytest.raises(StorageError, match='relation "events" does not exist'):
            await store.recipients_since("alice", NOW - DAY, COUNTED)


async def test_wrong_password_is_a_storage_error_without_the_password(pg: PgDatabase) -> None:
    store = PostgreSQLStorage.from_url(pg.url.replace(":policyd-pw@", ":WrongPassword42@"), "events")
    with pytest.raises(StorageError, match="password authentication failed") as caught:
        await store.open()
    assert "WrongPassword42" not in str(caught.value)


async def test_a_server_that_never_answers_fails_fast() -> None:
    assert CONNECT_TIMEOUT <= 3
    with socket.socket() as listener:  # accepts TCP connections (backlog), never speaks
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        store = PostgreSQLStorage.from_url(f"postgresql://u:secret-pw@127.0.0.1:{port}/db", "events")
        store.connect_timeout = 0.5
        started = time.monotonic()
        with pytest.raises(StorageError, match="no answer in time") as caught:
            await store.open()
        assert time.monotonic() - started < 3
        assert "secret-pw" not in str(caught.value)


async def test_a_statement_without_answer_is_bounded_and_the_storage_recovers(pg: PgDatabase) -> None:
    import asyncpg

    store = pg.storage()
    store.command_timeout = 0.5
    async with opened(store):
        await store.migrate()
        await store.add_events([event("alice", 2)])
        blocker = await asyncpg.connect(pg.url)
        try:
            transaction = blocker.transaction()
            await transaction.start()
            await blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with pytest.raises(StorageError, match="no answer in time"):
                await store.recipients_since("alice", NOW - DAY, COUNTED)
            assert time.monotonic() - started < 3
            await transaction.rollback()
        finally:
            await blocker.close()
        assert await store.recipients_since("alice", NOW - DAY, COUNTED) == 2


# ---------------------------------------------------------------------------
# outages: the same storage object comes back by itself
# ---------------------------------------------------------------------------


async def test_outage_fails_fast_then_the_same_storage_reconnects(pg: PgDatabase) -> None:
    server = pg.server
    async with opened(pg.storage()) as store:
        await store.migrate()
        await store.add_events([event("alice", 2)])
        await asyncio.gather(*(store.recipients_since("alice", NOW - DAY, COUNTED) for _ in range(6)))

        await asyncio.to_thread(server.stop_server)
        try:
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: store.recipients_since("alice", NOW - DAY, COUNTED),
                lambda: store.add_events([event("alice", 1)]),
                store.count_events,
                lambda: store.top_senders(NOW - DAY, 10),
                lambda: store.purge(NOW - timedelta(days=7)),
                store.pending_migrations,
            ]
            for call in calls:
                started = time.monotonic()
                with pytest.raises(StorageError) as caught:
                    await call()
                assert time.monotonic() - started < 5
                assert server.password not in str(caught.value)
            with pytest.raises(StorageError, match="opening: cannot connect"):
                await pg.storage().open()
        finally:
            await asyncio.to_thread(server.start_server)

        # No reopen: the pool makes new connections by itself.
        assert await store.recipients_since("alice", NOW - DAY, COUNTED) == 2
        await store.add_events([event("alice", 5)])
        assert await store.recipients_since("alice", NOW - DAY, COUNTED) == 7


async def test_restart_behind_the_pools_back_is_retried_on_a_new_connection(
    pg: PgDatabase, warnings_logged: list[str]
) -> None:
    server = pg.server
    async with opened(pg.storage()) as store:
        await store.migrate()
        await store.add_events([event("alice", 2)])
        await asyncio.gather(*(store.recipients_since("alice", NOW - DAY, COUNTED) for _ in range(6)))
        # Synchronous: the event loop does not run in between, so every pooled
        # connection is dead but asyncpg has not noticed (as when a restart happens
        # between two requests).
        server.stop_server()
        server.start_server()
        assert await store.recipients_since("alice", NOW - DAY, COUNTED) == 2
        assert any("retrying on a new connection" in line for line in warnings_logged)
        # the other stale connections were expired, not handed out one by one
        results = await asyncio.gather(
            *(store.recipients_since("alice", NOW - DAY, COUNTED) for _ in range(6))
        )
        assert results == [2] * 6
        await store.add_events([event("alice", 1)])
        assert await store.count_events() == 2


async def test_insert_on_a_dead_connection_is_retried_and_stored_once(
    pg: PgDatabase, warnings_logged: list[str]
) -> None:
    server = pg.server
    async with opened(pg.storage()) as store:
        await store.migrate()
        batch = [event("alice", 1), event("bob", 2)]
        assert await store.count_events() == 0  # a pooled connection made after migrate
        server.stop_server()
        server.start_server()
        await store.add_events(batch)
        await store.add_events(batch)  # a replay after an uncertain commit: harmless
        assert await store.count_events() == 2
        assert any("recording events" in line for line in warnings_logged)


async def test_terminated_backends_are_survived_transparently(
    pg: PgDatabase, warnings_logged: list[str]
) -> None:
    async with opened(pg.storage()) as store:
        await store.migrate()
        await store.add_events([event("alice", 2)])
        await asyncio.gather(*(store.recipients_since("alice", NOW - DAY, COUNTED) for _ in range(6)))
        victims = pg.policyd_backends()
        assert victims
        killed = pg.admin(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{pg.name}' AND application_name = 'policyd') AS killed"
        )
        assert int(killed) == len(victims)
        deadline = time.monotonic() + 10  # wait (without running the loop) until they are gone
        while set(victims) & set(pg.policyd_backends()):
            assert time.monotonic() < deadline
            sleep_without_the_event_loop(0.01)

        assert await store.recipients_since("alice", NOW - DAY, COUNTED) == 2
        await store.add_events([event("alice", 3)])
        assert await store.recipients_since("alice", NOW - DAY, COUNTED) == 5
        assert not set(victims) & set(pg.policyd_backends())
        assert any("retrying on a new connection" in line for line in warnings_logged)


async def test_migrate_is_retried_after_its_connection_is_killed(
    pg: PgDatabase, warnings_logged: list[str]
) -> None:
    pg.admin(GO_POLICYD_TABLE)
    async with opened(pg.storage()) as store:
        assert await store.count_events() == 6
        pg.admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{pg.name}' AND application_name = 'policyd'"
        )
        sleep_without_the_event_loop(0.2)  # let the backend go
        assert await store.migrate()
        assert any("migrating the schema" in line for line in warnings_logged)
        assert await store.pending_migrations() == []
        assert await store.count_events() == 6
