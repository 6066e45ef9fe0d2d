"""policyd pointed at a go-policyd MariaDB database, and at a MariaDB that goes away.

- go-policyd's own table, with its rows, is counted from the first request (before any
  migration), then upgraded in place by migrate() without losing a row; go-policyd's
  INSERT still works afterwards.
- A stopped server makes calls fail fast with StorageError; once it is back (or after a
  KILL of the pooled connections) the same storage object carries on by itself.

Runs against the real MariaDB started by the test session (tests/dbservers.py), one
fresh database per test.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

pytest.importorskip("aiomysql")

from policyd.quota import Outcome
from policyd.storage import Event, StorageError, create_storage
from policyd.storage.mysql import MySQLStorage

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
DAY = timedelta(hours=24)
COUNTED = (Outcome.DUNNO, Outcome.HOLD)
FAIL_FAST_SECONDS = 5.0

_numbers = itertools.count(1)

# go-policyd's table as its installs have it (newest first).
GO_POLICYD_TABLES = {
    "timestamp3": """
        CREATE TABLE `events` (
          `ts` timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
          `sasl_username` char(8) NOT NULL DEFAULT '',
          `sender` char(80) NOT NULL DEFAULT '',
          `client_address` char(80) NOT NULL DEFAULT '',
          `recipient_count` int(6) DEFAULT NULL,
          PRIMARY KEY (`ts`,`sasl_username`,`sender`,`client_address`)
        ) ENGINE=InnoDB DEFAULT CHARSET=latin1""",
    "timestamp": """
        CREATE TABLE `events` (
          `ts` timestamp NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,
          `sasl_username` char(8) NOT NULL DEFAULT '',
          `sender` char(80) NOT NULL DEFAULT '',
          `client_address` char(80) NOT NULL DEFAULT '',
          `recipient_count` int(6) DEFAULT NULL,
          PRIMARY KEY (`ts`,`sasl_username`,`sender`)
        ) ENGINE=InnoDB DEFAULT CHARSET=latin1""",
    # Older installs: a DATETIME holding the server's local time.
    "datetime": """
        CREATE TABLE `events` (
          `ts` datetime NOT NULL DEFAULT CURRENT_TIMESTAMP,
          `sasl_username` char(8) NOT NULL DEFAULT '',
          `sender` char(80) NOT NULL DEFAULT '',
          `client_address` char(80) NOT NULL DEFAULT '',
          `recipient_count` int(6) DEFAULT NULL,
          PRIMARY KEY (`ts`,`sasl_username`,`sender`,`client_address`)
        ) ENGINE=InnoDB DEFAULT CHARSET=latin1""",
}
# The server's time zone while each variant runs: DATETIME rows are in it; for the
# TIMESTAMP variants it must make no difference at all.
SERVER_TIME_ZONES = {"timestamp3": "-05:00", "timestamp": "+00:00", "datetime": "+02:00"}

# (user, age, recipient_count) as go-policyd wrote them.
GO_POLICYD_ROWS = [
    ("alice", timedelta(hours=1), 10),
    ("alice", timedelta(hours=23), 5),
    ("alice", timedelta(hours=2), None),  # NULL counts 0
    ("alice", DAY + timedelta(hours=1), 100),  # outside the window
    ("bob", timedelta(minutes=30), 7),
    ("carolina", timedelta(minutes=10), 2),  # char(8) filled to the brim
]
EXPECTED_SUMS = {"alice": 15, "bob": 7, "carolina": 2, "nobody": 0}


@dataclass
class Database:
    server: Any
    name: str
    url: str

    def sql(self, statements: str) -> list[list[str]]:
        output = self.server.admin_execute(statements, database=self.name)
        return [line.split("\t") for line in output.splitlines()]

    def value(self, statement: str) -> str:
        [[value]] = self.sql(statement)
        return value

    def storage(self) -> MySQLStorage:
        store = create_storage(self.url, "events")
        assert isinstance(store, MySQLStorage)
        return store


@pytest.fixture
def db(mariadb_server: Any) -> Iterator[Database]:
    name = f"dropin_{os.getpid()}_{next(_numbers)}"
    url = mariadb_server.create_database(name)
    try:
        yield Database(mariadb_server, name, url)
    finally:
        if not mariadb_server.running:
            mariadb_server.start_server()
        mariadb_server.admin_execute("SET GLOBAL time_zone = 'SYSTEM'")
        mariadb_server.drop_database(name)


@pytest.fixture
async def migrated(db: Database) -> AsyncIterator[MySQLStorage]:
    store = db.storage()
    await store.open()
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


def set_server_time_zone(db: Database, zone: str) -> None:
    db.server.admin_execute(f"SET GLOBAL time_zone = '{zone}'")


def local_text(moment: datetime, zone: str) -> str:
    sign = 1 if zone[0] == "+" else -1
    hours, minutes = (int(part) for part in zone[1:].split(":"))
    offset = sign * timedelta(hours=hours, minutes=minutes)
    return (moment.astimezone(UTC) + offset).strftime("%Y-%m-%d %H:%M:%S")


def create_go_policyd_table(db: Database, variant: str) -> None:
    """go-policyd's table with its rows, written the way go-policyd wrote them."""
    zone = SERVER_TIME_ZONES[variant]
    set_server_time_zone(db, zone)
    values = []
    for user, age, count in GO_POLICYD_ROWS:
        # A TIMESTAMP is written in a UTC session; a DATETIME gets the server's local time.
        ts = local_text(NOW - age, zone if variant == "datetime" else "+00:00")
        values.append(
            f"('{ts}', '{user}', '{user}@example.org', '192.0.2.1', {'NULL' if count is None else count})"
        )
    db.sql(
        GO_POLICYD_TABLES[variant]
        + ";\nSET time_zone = '+00:00';\n"
        + "INSERT INTO events (ts, sasl_username, sender, client_address, recipient_count) VALUES "
        + ",\n".join(values)
        + ";"
    )


def event(user: str, recipients: int, ts: datetime = NOW, outcome: Outcome = Outcome.DUNNO) -> Event:
    return Event(ts, user, f"{user}@example.org", "192.0.2.7", recipients, outcome)


def com_alter_table(db: Database) -> int:
    [[_, count]] = db.sql("SHOW GLOBAL STATUS LIKE 'Com_alter_table'")
    return int(count)


# ---------------------------------------------------------------------------
# go-policyd's table, before and after migrate()
# ---------------------------------------------------------------------------


@pytest.mark.mariadb
@pytest.mark.parametrize("variant", list(GO_POLICYD_TABLES))
async def test_go_policyd_rows_count_before_any_migration(db: Database, variant: str) -> None:
    create_go_policyd_table(db, variant)
    store = db.storage()
    await store.open()
    try:
        for user, total in EXPECTED_SUMS.items():
            assert await store.recipients_since(user, NOW - DAY, COUNTED) == total, user
        # Old rows have no action: they are DUNNO, never HOLD or REJECT.
        assert await store.recipients_since("alice", NOW - DAY, (Outcome.HOLD, Outcome.REJECT)) == 0
        # The window is exact to the second in UTC, whatever the table's ts type and server zone.
        assert await store.recipients_since("alice", NOW - timedelta(hours=1), COUNTED) == 10
        assert await store.recipients_since("alice", NOW - timedelta(minutes=59), COUNTED) == 0
        assert await store.count_events() == len(GO_POLICYD_ROWS)
        top = await store.top_senders(NOW - DAY, 10)
        assert [(s.sasl_username, s.recipients, s.messages, s.held, s.rejected) for s in top] == [
            ("alice", 15, 3, 0, 0),
            ("bob", 7, 1, 0, 0),
            ("carolina", 2, 1, 0, 0),
        ]
        assert top[0].last_seen == NOW - timedelta(hours=1)
        # The window loads from it too, in UTC to the second (no ids to tail yet).
        window = {h.sasl_username: h for h in await store.load_window(NOW - DAY, 0, "relay")}
        assert {user: sum(h.counts) for user, h in window.items()} == {
            u: n for u, n in EXPECTED_SUMS.items() if n
        }
        assert {code for h in window.values() for code in h.codes} == {0}
        hour_ago = (NOW - timedelta(hours=1) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
        assert max(window["alice"].times) == hour_ago
        assert await store.max_event_id() == 0
        assert (await store.tail(0, "relay", 10)).rows == []
        assert await store.pending_migrations() != []
        # Writing needs the new columns: refused, with the way out, until migrated.
        with pytest.raises(StorageError, match="policyd migrate"):
            await store.add_events([event("alice", 1)])
        assert await store.purge(NOW - DAY) == 1
        assert await store.count_events() == len(GO_POLICYD_ROWS) - 1
    finally:
        await store.close()


@pytest.mark.mariadb
@pytest.mark.parametrize("variant", list(GO_POLICYD_TABLES))
async def test_migrate_upgrades_go_policyd_table_in_place(db: Database, variant: str) -> None:
    create_go_policyd_table(db, variant)
    store = db.storage()
    await store.open()
    try:
        rows_before = await store.count_events()
        sums_before = {user: await store.recipients_since(user, NOW - DAY, COUNTED) for user in EXPECTED_SUMS}
        planned = await store.pending_migrations()
        # Each step reads as what `migrate --dry-run` prints: "would <step>".
        verbs = {"create", "convert", "set", "add", "change", "make", "drop"}
        assert [step for step in planned if step.split()[0] not in verbs] == [], planned
        alters_before = com_alter_table(db)

        done = await store.migrate()

        assert done == planned
        # One table rebuild; a local-time DATETIME takes one more to become UTC.
        assert com_alter_table(db) - alters_before == (2 if variant == "datetime" else 1)
        assert await store.count_events() == rows_before == len(GO_POLICYD_ROWS)
        assert (
            {user: await store.recipients_since(user, NOW - DAY, COUNTED) for user in EXPECTED_SUMS}
            == (sums_before)
            == EXPECTED_SUMS
        )
        assert await store.pending_migrations() == []
        assert await store.migrate() == []
        assert com_alter_table(db) - alters_before == (2 if variant == "datetime" else 1)

        # Every old row kept, in UTC, as DUNNO, with a NULL count turned into 0.
        top = await store.top_senders(NOW - 2 * DAY, 10)
        assert [(s.sasl_username, s.recipients, s.messages) for s in top] == [
            ("alice", 115, 4),
            ("bob", 7, 1),
            ("carolina", 2, 1),
        ]
        assert top[0].last_seen == NOW - timedelta(hours=1)
        assert db.value("SELECT COUNT(*) FROM events WHERE action = 'DUNNO'") == str(len(GO_POLICYD_ROWS))
        assert db.value("SELECT COUNT(*) FROM events WHERE recipient_count IS NULL") == "0"
        assert db.value("SELECT COUNT(DISTINCT id) FROM events") == str(len(GO_POLICYD_ROWS))
        utc_stamps = sorted(row[0] for row in db.sql("SELECT ts FROM events"))
        assert utc_stamps == sorted(
            (NOW - age).strftime("%Y-%m-%d %H:%M:%S.000") for _, age, _ in GO_POLICYD_ROWS
        )
        schema = db.sql("SHOW CREATE TABLE events")[0][1].replace("\\n", "\n")
        for expected in (
            "`id` bigint(20) unsigned NOT NULL AUTO_INCREMENT",
            "`ts` datetime(3) NOT NULL DEFAULT utc_timestamp(3)",
            "`sasl_username` text NOT NULL",
            "`action` varchar(16) NOT NULL DEFAULT 'DUNNO'",
            "PRIMARY KEY (`id`)",
            "UNIQUE KEY `event_id` (`event_id`)",
            "KEY `user_ts` (`user_key`,`ts`,`action`,`recipient_count`)",
            "KEY `ts` (`ts`)",
            "DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        ):
            assert expected in schema, (expected, schema)
        assert "on update" not in schema.lower()

        # What go-policyd's table refused: long names, two messages in the same millisecond.
        long_name = "ü" * 10_000
        await store.add_events([event(long_name, 3), event("alice", 1), event("alice", 1)])
        assert await store.recipients_since(long_name, NOW - DAY, COUNTED) == 3
        assert await store.recipients_since("alice", NOW - DAY, COUNTED) == 17
        assert await store.count_events() == len(GO_POLICYD_ROWS) + 3
    finally:
        await store.close()


@pytest.mark.mariadb
@pytest.mark.parametrize("variant", list(GO_POLICYD_TABLES))
async def test_go_policyd_can_still_write_after_migrate(db: Database, variant: str) -> None:
    create_go_policyd_table(db, variant)
    store = db.storage()
    await store.open()
    try:
        await store.migrate()
        # go-policyd's statements, in a session of the server's (non-UTC) default zone.
        db.sql(
            "INSERT INTO events SET sasl_username='dave', sender='dave@example.org', "
            "client_address='192.0.2.9', recipient_count=4"
        )
        go_sum = db.value(
            "SELECT SUM(recipient_count) FROM events "
            "WHERE sasl_username='dave' AND ts>DATE_SUB(CURRENT_TIMESTAMP(3), INTERVAL 1 DAY)"
        )
        assert go_sum == "4"
        real_now = datetime.now(UTC)
        assert await store.recipients_since("dave", real_now - timedelta(minutes=5), COUNTED) == 4
        [dave] = [
            s
            for s in await store.top_senders(real_now - timedelta(minutes=5), 10)
            if s.sasl_username == "dave"
        ]
        # ts defaulted to UTC, not to the session's local time.
        assert abs(dave.last_seen - real_now) < timedelta(minutes=1)
    finally:
        await store.close()


@pytest.mark.mariadb
async def test_migrate_drops_an_admin_index_that_cannot_survive_text_columns(db: Database) -> None:
    create_go_policyd_table(db, "timestamp3")
    db.sql("ALTER TABLE events ADD INDEX by_user (sasl_username), ADD INDEX by_prefix (sender(10))")
    store = db.storage()
    await store.open()
    try:
        steps = await store.migrate()
        assert any("drop index events.by_user" in step for step in steps)
        assert await store.count_events() == len(GO_POLICYD_ROWS)
        assert await store.pending_migrations() == []
        indexes = {
            row[0]
            for row in db.sql(
                "SELECT DISTINCT INDEX_NAME FROM information_schema.STATISTICS "
                f"WHERE TABLE_SCHEMA = '{db.name}' AND TABLE_NAME = 'events'"
            )
        }
        assert indexes == {"PRIMARY", "event_id", "user_ts", "ts", "by_prefix"}
    finally:
        await store.close()


@pytest.mark.mariadb
async def test_missing_table_says_to_migrate(db: Database) -> None:
    store = db.storage()
    await store.open()
    try:
        with pytest.raises(StorageError, match="policyd migrate"):
            await store.recipients_since("alice", NOW - DAY, COUNTED)
        assert await store.pending_migrations() == [
            "create table events",
            "create table events_overrides (per-user limit overrides)",
            "create table events_lists (allow and block entries)",
            "create table events_resets (resets of users' counted recipients)",
            "create table events_alerts (alerts told, one per incident)",
        ]
    finally:
        await store.close()


# ---------------------------------------------------------------------------
# the schema policyd creates
# ---------------------------------------------------------------------------


@pytest.mark.mariadb
async def test_sum_reads_only_the_covering_index(db: Database, migrated: MySQLStorage) -> None:
    await migrated.add_events([event(f"user{i}", 1, NOW - timedelta(minutes=i)) for i in range(50)])
    for name in ("user7", "x" * 5000):
        literal = f"'{name}'"
        key = (
            f"IF(CHAR_LENGTH({literal}) <= 200, {literal}, "
            f"CONCAT(LEFT({literal}, 180), '#', SHA2({literal}, 256)))"
        )
        [plan] = db.sql(
            "EXPLAIN SELECT COALESCE(SUM(recipient_count), 0) FROM events "
            f"WHERE user_key = {key} AND ts >= '2026-11-23 12:00:00.000' AND action IN ('DUNNO', 'HOLD')"
        )
        assert plan[5] == "user_ts", plan  # key
        assert "Using index" in plan[9], plan  # never reads the rows themselves


@pytest.mark.mariadb
async def test_too_long_a_name_is_refused_not_truncated(migrated: MySQLStorage) -> None:
    with pytest.raises(StorageError, match="too long"):
        await migrated.add_events([event("n" * 70_000, 1)])
    assert await migrated.count_events() == 0


@pytest.mark.mariadb
async def test_server_time_zone_makes_no_difference(db: Database, migrated: MySQLStorage) -> None:
    set_server_time_zone(db, "+05:00")
    fresh = db.storage()  # new sessions, which default to +05:00
    await fresh.open()
    try:
        await fresh.add_events([event("alice", 2)])
        assert db.value("SELECT ts FROM events") == "2026-11-24 12:00:00.000"
        [top] = await fresh.top_senders(NOW - DAY, 1)
        assert top.last_seen == NOW
        assert await fresh.recipients_since("alice", NOW, COUNTED) == 2
        assert await fresh.recipients_since("alice", NOW + timedelta(milliseconds=1), COUNTED) == 0
    finally:
        await fresh.close()


# ---------------------------------------------------------------------------
# outages and reconnecting
# ---------------------------------------------------------------------------


async def fails_fast(call: Any) -> StorageError:
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        await call
    elapsed = time.monotonic() - started
    assert elapsed < FAIL_FAST_SECONDS, f"took {elapsed:.1f}s"
    return caught.value


@pytest.mark.mariadb
async def test_outage_fails_fast_then_the_same_storage_recovers(db: Database, migrated: MySQLStorage) -> None:
    await migrated.add_events([event("alice", 3)])
    db.server.stop_server()
    try:
        errors = [
            await fails_fast(migrated.recipients_since("alice", NOW - DAY, COUNTED)),
            await fails_fast(migrated.add_events([event("alice", 1)])),
            await fails_fast(migrated.count_events()),
            await fails_fast(migrated.top_senders(NOW - DAY, 5)),
            await fails_fast(migrated.purge(NOW - DAY)),
        ]
        for error in errors:
            assert db.server.password not in str(error)
            assert "mysql 127.0.0.1" in str(error)
        # Opening while the server is down fails fast too.
        await fails_fast(db.storage().open())
    finally:
        db.server.start_server()
    # No reopen: the next calls get fresh connections.
    assert await migrated.recipients_since("alice", NOW - DAY, COUNTED) == 3
    await migrated.add_events([event("alice", 4)])
    assert await migrated.recipients_since("alice", NOW - DAY, COUNTED) == 7


@pytest.mark.mariadb
async def test_restart_between_two_calls_is_transparent(db: Database, migrated: MySQLStorage) -> None:
    await migrated.add_events([event("alice", 3)])
    # The event loop does not run while the server restarts, so the pooled connection
    # still looks fine: the next call finds it dead, and retries on a fresh one.
    db.server.stop_server()
    db.server.start_server()
    assert await migrated.recipients_since("alice", NOW - DAY, COUNTED) == 3
    assert migrated.retries == 1
    db.server.stop_server()
    db.server.start_server()
    await migrated.add_events([event("alice", 1)])  # idempotent: retried too
    assert migrated.retries == 2
    assert await migrated.recipients_since("alice", NOW - DAY, COUNTED) == 4


@pytest.mark.mariadb
async def test_killed_connections_are_replaced_transparently(db: Database, migrated: MySQLStorage) -> None:
    await migrated.add_events([event("alice", 3)])
    # Fill the pool with several connections, then kill them all on the server.
    await asyncio.gather(*(migrated.recipients_since("alice", NOW - DAY, COUNTED) for _ in range(8)))
    ids = [
        row[0]
        for row in db.sql(
            "SELECT ID FROM information_schema.PROCESSLIST "
            f"WHERE USER = '{db.server.user}' AND DB = '{db.name}'"
        )
    ]
    assert len(ids) > 1
    db.sql("".join(f"KILL CONNECTION {connection_id};\n" for connection_id in ids))
    for _ in range(5):
        assert await migrated.recipients_since("alice", NOW - DAY, COUNTED) == 3
    await migrated.add_events([event("alice", 1)])
    assert await migrated.count_events() == 2
    # One failed call retried; every other stale connection was dropped unused.
    assert migrated.retries == 1


@pytest.mark.mariadb
async def test_cancelled_call_never_leaves_a_connection_half_read(migrated: MySQLStorage) -> None:
    await migrated.add_events([event("alice", 3)])
    for _ in range(20):
        task = asyncio.create_task(migrated.recipients_since("alice", NOW - DAY, COUNTED))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await migrated.recipients_since("alice", NOW - DAY, COUNTED) == 3


# ---------------------------------------------------------------------------
# the URL (no server needed)
# ---------------------------------------------------------------------------


def test_url_is_parsed_and_the_password_never_shown() -> None:
    store = MySQLStorage.from_url("mysql://pol%40icy:s3cr%2Ft%3Apw@db.example.net:3307/mail%5Fdb", "events")
    assert (store.user, store.host, store.port, store.database) == (
        "pol@icy",
        "db.example.net",
        3307,
        "mail_db",
    )
    assert store._password == "s3cr/t:pw"
    assert "s3cr" not in store.description
    assert store.description == "mysql://pol@icy@db.example.net:3307/mail_db table events"

    default = MySQLStorage.from_url("mariadb://u:p@localhost/policyd?charset=utf8mb4", "t1")
    assert (default.port, default.scheme, default.table) == (3306, "mariadb", "t1")

    # What a go-policyd file without dbuser/dbpass becomes: the OS user logs in.
    anonymous = MySQLStorage.from_url("mysql://localhost:3306/mail", "events")
    assert (anonymous.user, anonymous.description) == ("", "mysql://localhost:3306/mail table events")

    socket = MySQLStorage.from_url("mysql://u:p@/policyd?unix_socket=/run/mysqld/mysqld.sock", "events")
    assert socket.unix_socket == "/run/mysqld/mysqld.sock"
    assert (
        socket.description == "mysql://u@localhost/policyd?unix_socket=/run/mysqld/mysqld.sock table events"
    )


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("mysql://u:topsecret@host/", "database name"),
        ("mysql://u:topsecret@host", "database name"),
        ("mysql://u:topsecret@/db", "without a host"),
        ("mysql://u:topsecret@host:99999/db", "bad mysql"),
        ("mysql://u:topsecret@host:port/db", "bad mysql"),
        ("mysql://u:topsecret@host/db?charset=latin1", "utf8mb4"),
        ("mysql://u:topsecret@host/db?sslmode=on", "unknown option"),
        ("mysql://u:topsecret@host/db?unix_socket=relative.sock", "absolute"),
        ("postgresql://u:topsecret@host/db", "not a mysql"),
    ],
)
def test_bad_urls_are_refused_without_connecting(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as caught:
        MySQLStorage.from_url(url, "events")
    assert "topsecret" not in str(caught.value)


def test_several_hosts_are_tried_in_order() -> None:
    store = MySQLStorage.from_url(
        "mysql://u:s3cret@db1.example.org:3307,DB2.example.org,[2001:db8::1]:3309/policyd", "events"
    )
    assert store.nodes == (("db1.example.org", 3307), ("db2.example.org", 3306), ("2001:db8::1", 3309))
    assert (store.node, store.host, store.port) == (0, "db1.example.org", 3307)
    assert store.description == (
        "mysql://u@db1.example.org:3307,db2.example.org:3306,[2001:db8::1]:3309/policyd table events"
    )
    assert "s3cret" not in store.description


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("mysql://u:topsecret@db1:3306,,db3:3306/db", "empty host"),
        ("mysql://u:topsecret@db1:3306,db2:/db", "empty port"),
        ("mysql://u:topsecret@db1:3306,db2:x/db", "port of db2"),
        ("mysql://u:topsecret@db1:3306,db2:0/db", "port of db2"),
        ("mysql://u:topsecret@db1,[::1/db", "IPv6"),
        ("mysql://u:topsecret@db1,[::1]x/db", "brackets"),
        ("mysql://u:topsecret@db1,db2/db?unix_socket=/run/mysqld/mysqld.sock", "one host"),
        ("mysql://u:top,secret@db1,db2/", "database name"),
    ],
)
def test_bad_host_lists_are_refused_without_the_password(url: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as caught:
        MySQLStorage.from_url(url, "events")
    assert "topsecret" not in str(caught.value) and "secret" not in str(caught.value)


@pytest.mark.parametrize("parts", [2, 3, 5])
async def test_a_window_loaded_in_parts_is_the_window_loaded_whole(
    migrated: MySQLStorage, parts: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import policyd.storage.mysql as mysql_module

    now = datetime.now(UTC)
    users = [f"user{n:02d}" for n in range(40)] + ["Ünïcode", "a" * 230, "b" * 230]
    events = [
        Event(now - timedelta(minutes=n % 50), user, "s", "192.0.2.1", 1 + n % 7, Outcome.DUNNO)
        for n, user in enumerate(users * 6)
    ]
    await migrated.add_events(events, origin="before")
    top = await migrated.max_event_id()
    since = now - timedelta(hours=1)

    def as_dict(histories: list[Any]) -> dict[str, list[tuple[int, int, int]]]:
        loaded: dict[str, list[tuple[int, int, int]]] = {}
        for history in histories:
            assert history.sasl_username not in loaded, "a user in two parts"
            loaded[history.sasl_username] = sorted(
                zip(history.times, history.counts, history.codes, strict=True)
            )
        return loaded

    whole = as_dict(await migrated.load_window(since, top, None))
    assert set(whole) == set(users) and sum(map(len, whole.values())) == len(events)
    monkeypatch.setattr(mysql_module, "LOAD_PARTS", parts)
    monkeypatch.setattr(mysql_module, "LOAD_PARTS_FROM_ROWS", 1)
    monkeypatch.setattr(mysql_module, "LOAD_SAMPLE_ROWS", min(top, 100))
    cuts = await migrated._run("cutting", migrated._load_cuts(top), retry_safe=True)
    assert 1 <= len(cuts) <= parts - 1
    assert as_dict(await migrated.load_window(since, top, None)) == whole
