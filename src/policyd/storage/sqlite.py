"""SQLite backend: the embedded default, nothing to install.

Durability: WAL journal with ``synchronous=NORMAL``.  A commit is written to the OS
before Postfix gets its answer, so a crash of policyd (kill -9) loses nothing; the WAL
is not fsync'd at every commit (that cost 50-70 µs of CPU per request, half the
daemon's budget) but by a passive checkpoint from the reader connection every second
(``sync_to_disk``, called by the writer), so a power cut or a kernel crash loses at most
the events of the last second (the WAL's checksums make SQLite drop a torn tail).

The reader connection never waits for the writer (WAL).  Each
connection lives in a thread of its own and every operation runs there as one call (a
whole batch of events - BEGIN, the inserts, COMMIT - is one trip to the thread), so the
event loop never blocks on disk.  Timestamps are stored as UTC text
``YYYY-MM-DD HH:MM:SS.mmm`` (what DATETIME(3) holds in MariaDB), which sorts and
compares correctly as text.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import sqlite3
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from policyd.permissions import not_writable_hint
from policyd.quota import Outcome
from policyd.storage import schema
from policyd.storage.base import (
    EVENT_COLUMNS,
    EVENT_ID_CHUNK,
    EVENT_VALUES,
    OUTCOME_CODE_SQL,
    PURGE_BATCH_ROWS,
    DatabaseReplaced,
    Event,
    SchemaMissing,
    SenderStats,
    Storage,
    StorageError,
    Tail,
    TailRow,
    UserHistory,
    event_row,
    outcome_of_stored,
    split_numbers,
    utc_text,
)
from policyd.worker import WorkerThread

T = TypeVar("T")

# How long SQLite itself waits on a lock held by another process (policyd purge, say)
# before failing.  The daemon bounds its own wait separately (db_timeout).
BUSY_TIMEOUT_SECONDS = 5.0
# The write-ahead log's size on disk once reused (see open()), and the size past which
# the writer checkpoints it itself (see _checkpoint_if_big).  The file's size is what is
# looked at, so the first must stay below the second: a log kept at 16 MB on disk past an
# 8 MB threshold made the writer checkpoint (two fdatasyncs) after every commit, for good.
WAL_SIZE_LIMIT_BYTES = 4 * 1024 * 1024
WAL_CHECKPOINT_BYTES = 8 * 1024 * 1024

# SQLite virtual machine steps between two looks at whether a read was given up on
# (_Connection.run): a few hundred microseconds.
PROGRESS_STEPS = 10_000

# ts (text) as milliseconds since the epoch: julianday() parses it in C; the double it
# returns is exact to well under a millisecond, so rounding gives the stored value.
_MS_SQL = "CAST(round((julianday(ts) - 2440587.5) * 86400000) AS INTEGER)"

# Rows per INSERT statement at most (a power of two, see _statement_sizes): within
# SQLite's 32,766 bound parameters.
_ROWS_PER_INSERT = 256

_COLUMNS = {
    "ts": "TEXT NOT NULL",
    "sasl_username": "TEXT NOT NULL DEFAULT ''",
    "sender": "TEXT NOT NULL DEFAULT ''",
    "client_address": "TEXT NOT NULL DEFAULT ''",
    "recipient_count": "INTEGER NOT NULL DEFAULT 0",
    "action": "TEXT NOT NULL DEFAULT 'DUNNO'",
    "event_id": "TEXT",
    "queue_id": "TEXT",
    "origin": "TEXT",
}


format_ts = utc_text  # the text of `ts` (UTC, to the millisecond)


def _statement_sizes(rows: int) -> list[int]:
    """How many rows each INSERT of a batch takes: as many of _ROWS_PER_INSERT as fit,
    then the powers of two the rest is made of (largest first).  Few distinct statements,
    so that sqlite3's cache of prepared statements holds them all: one per size seen
    cost up to 128 cached programs of hundreds of parameters each, tens of MB."""
    sizes = [_ROWS_PER_INSERT] * (rows // _ROWS_PER_INSERT)
    rest = rows % _ROWS_PER_INSERT
    sizes.extend(1 << bit for bit in reversed(range(rest.bit_length())) if rest >> bit & 1)
    return sizes


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)


class _Connection:
    """An sqlite3 connection in a thread of its own: `run(work)` calls work(connection)
    there and returns its result; sqlite3 and OS errors come back as StorageError."""

    def __init__(self, name: str) -> None:
        self._thread = WorkerThread(f"policyd-sqlite-{name}")
        self._connection: sqlite3.Connection | None = None
        self._path = ""

    async def open(self, path: str, what: str) -> None:
        self._path = path

        def connect() -> sqlite3.Connection:
            return sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )

        self._connection = await self._call(connect, what)

    async def run(
        self, work: Callable[[sqlite3.Connection], T], what: str, *, cancellable: bool = False
    ) -> T:
        """work(connection) in the thread.  `cancellable`: the statement stops when the
        caller gives up on it (a timeout): a user's rows are found by scanning the
        window's (there is no index by user), and the thread must not stay busy with a
        page's query nobody waits for any more."""
        connection = self._connection
        if connection is None:
            raise StorageError("sqlite: storage is not open")
        if not cancellable:
            return await self._call(lambda: work(connection), what)
        abandoned = False

        def guarded_work() -> T:
            # This call's own flag: a later call is never stopped by this one's timeout.
            connection.set_progress_handler(lambda: abandoned, PROGRESS_STEPS)
            try:
                return work(connection)
            finally:
                connection.set_progress_handler(None, 0)

        try:
            return await self._call(guarded_work, what)
        except asyncio.CancelledError:
            abandoned = True
            raise

    async def _call(self, work: Callable[[], T], what: str) -> T:
        def guarded() -> T:
            try:
                return work()
            except (sqlite3.Error, OSError, ValueError) as error:
                message = f"sqlite: {what}: {error}"
                if _MISSING_SCHEMA.search(str(error)):
                    raise SchemaMissing(message) from error
                raise StorageError(message, hint=self._hint(error)) from error

        return await self._thread.call(guarded)

    def _hint(self, error: BaseException) -> str | None:
        """What to do when this user may not write the file (or its directory)."""
        if not (isinstance(error, PermissionError) or _NOT_WRITABLE.search(str(error))):
            return None
        return not_writable_hint(self._path)

    async def close(self) -> None:
        connection, self._connection = self._connection, None

        if connection is not None:
            try:
                await self._call(connection.close, "closing")
            except StorageError:
                pass
        self._thread.stop()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


# SQLite's words for a file (or directory) this user may not write.
_NOT_WRITABLE = re.compile(r"readonly database|unable to open database file|Permission denied")


# SQLite's words for a table or column that is not there.
_MISSING_SCHEMA = re.compile(r"no such table|no such column|has no column named")


def _in_transaction(
    connection: sqlite3.Connection, work: Callable[[], T], begin: str = "BEGIN IMMEDIATE"
) -> T:
    connection.execute(begin)
    try:
        result = work()
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            # SQLite may have rolled back already (a full disk does, inside COMMIT): then
            # this fails with "no transaction is active", which must not hide the reason.
            with contextlib.suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
        raise
    return result


class SQLiteStorage(Storage):
    dialect = schema.SQLITE

    def __init__(self, path: str, table: str = "events") -> None:
        super().__init__(table)
        self.path = path
        self._reader: _Connection | None = None
        self._writer: _Connection | None = None
        self._identity: tuple[int, int] | None = None  # (device, inode) of the file opened
        self._inserts: dict[int, str] = {}  # rows -> the INSERT of that many (_statement_sizes)

    @classmethod
    def from_url(cls, url: str, table: str) -> SQLiteStorage:
        # sqlite:///var/lib/policyd/policyd.sqlite -> /var/lib/policyd/policyd.sqlite;
        # sqlite://var/policyd.sqlite -> var/policyd.sqlite (relative to the working dir).
        if not url.lower().startswith("sqlite://"):
            raise ValueError(f"not an sqlite:// URL: {url!r}")
        path = url[len("sqlite://") :]
        if not path:
            raise ValueError("sqlite:// URL without a path (want sqlite:///var/lib/policyd/policyd.sqlite)")
        return cls(path, table)

    @property
    def description(self) -> str:
        return f"sqlite:{self.path} table {self.table}"

    async def open(self) -> None:
        what = f"opening {self.path}"
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as error:
            hint = not_writable_hint(self.path) if isinstance(error, PermissionError) else None
            raise StorageError(f"sqlite: {what}: {error}", hint=hint) from error
        writer, reader = _Connection("writer"), _Connection("reader")
        try:
            await writer.open(self.path, what)
            # WAL: readers never wait for the writer.  NORMAL: see the module docstring.
            # No checkpoint by the writer (SQLite's default, at 1000 pages, copies them
            # and fsyncs inside a commit: a 0.6 s stall measured here): sync_to_disk, from
            # the reader, does it every second.
            await writer.run(lambda c: c.execute("PRAGMA journal_mode=WAL").fetchone(), what)
            await writer.run(lambda c: c.execute("PRAGMA synchronous=NORMAL"), what)
            await writer.run(lambda c: c.execute("PRAGMA wal_autocheckpoint=0"), what)
            # Once checkpointed, the write-ahead log is cut back to this when reused: a
            # burst (a spool replayed) does not keep its size on disk.
            await writer.run(lambda c: c.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT_BYTES}"), what)
            await reader.open(self.path, what)
        except BaseException:
            await writer.close()
            await reader.close()
            raise
        self._writer, self._reader = writer, reader
        self._identity = _identity(self.path) if self.path != ":memory:" else None
        self._give_to_directory_owner()

    async def close(self) -> None:
        for connection in (self._reader, self._writer):
            if connection is not None:
                await connection.close()
        self._reader = self._writer = None
        self._give_to_directory_owner()

    def _give_to_directory_owner(self) -> None:
        """Run as root (`policyd migrate` or `top` before the first start, say), the
        file and its -wal and -shm would be root's, and the service's user could not
        write them: they go to the owner of their directory (the service's user, in a
        set-up like /var/lib/policyd), as the daemon would have made them."""
        if os.geteuid() != 0 or self.path == ":memory:":
            return
        try:
            owner = os.stat(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return
        if owner.st_uid == 0:
            return
        for path in (self.path, f"{self.path}-wal", f"{self.path}-shm"):
            with contextlib.suppress(OSError):
                if os.stat(path).st_uid == 0:
                    os.chown(path, owner.st_uid, owner.st_gid)

    def _connections(self) -> tuple[_Connection, _Connection]:
        if self._reader is None or self._writer is None:
            raise StorageError("sqlite: storage is not open")
        return self._reader, self._writer

    async def _read(
        self, work: Callable[[sqlite3.Connection], T], what: str, *, cancellable: bool = False
    ) -> T:
        """`cancellable` for a read of one user's rows (see _Connection.run)."""
        reader, _ = self._connections()
        return await reader.run(work, what, cancellable=cancellable)

    async def _write(self, work: Callable[[sqlite3.Connection], T], what: str) -> T:
        _, writer = self._connections()
        return await writer.run(work, what)

    # -- schema -----------------------------------------------------------------

    def _wanted_indexes(self) -> dict[str, str]:
        table = self.table
        # No index by user: decisions come from memory, and one cost a page of the
        # write-ahead log per event (its rows land wherever their user's are, where these
        # two grow at their end): a fifth of the daemon's CPU per request.  A user's rows
        # (policyd user, held, the status page) are scanned for by ts: 0.25 s at 1 M rows
        # once cached, about ten times that at 10 M; a page's read stops at its timeout.
        return {
            f"{table}_ts": f"CREATE INDEX {table}_ts ON {table}(ts)",
            f"{table}_event_id": f"CREATE UNIQUE INDEX {table}_event_id ON {table}(event_id)",
        }

    def _unwanted_indexes(self) -> list[str]:
        """Indexes earlier versions made (policyd 0.1 summed each request from this one)."""
        return [f"{self.table}_user_ts"]

    def _plan(self, connection: sqlite3.Connection) -> list[tuple[str, str]]:
        table = self.table
        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if not columns:
            definition = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items())
            steps = [(f"create table {table}", f"CREATE TABLE {table} ({definition})")]
            existing_indexes: set[str] = set()
        else:
            steps = [
                (f"add column {table}.{name}", f"ALTER TABLE {table} ADD COLUMN {name} {kind}")
                for name, kind in _COLUMNS.items()
                if name not in columns
            ]
            existing_indexes = {row[1] for row in connection.execute(f"PRAGMA index_list({table})")}
        steps += [
            (f"create index {name}", statement)
            for name, statement in self._wanted_indexes().items()
            if name not in existing_indexes
        ]
        steps += [
            (f"drop index {name} (no longer used)", f"DROP INDEX {name}")
            for name in self._unwanted_indexes()
            if name in existing_indexes
        ]
        existing_tables = {
            str(row[0]) for row in connection.execute(schema.EXISTING_TABLES_SQL[schema.SQLITE])
        }
        steps += schema.missing_tables(table, existing_tables, schema.SQLITE)
        return steps

    async def pending_migrations(self) -> list[str]:
        steps = await self._write(self._plan, "reading the schema")
        return [description for description, _ in steps]

    async def migrate(self) -> list[str]:
        def run(connection: sqlite3.Connection) -> list[tuple[str, str]]:
            def apply() -> list[tuple[str, str]]:
                steps = self._plan(connection)
                for _, statement in steps:
                    connection.execute(statement)
                return steps

            return _in_transaction(connection, apply)

        return [description for description, _ in await self._write(run, "migrating the schema")]

    # -- events -----------------------------------------------------------------

    async def recipients_since(self, sasl_username: str, since: datetime, outcomes: Sequence[Outcome]) -> int:
        marks = ",".join("?" * len(outcomes))
        sql = (
            f"SELECT COALESCE(SUM(recipient_count), 0) FROM {self.table} "
            f"WHERE sasl_username = ? AND ts >= ? AND action IN ({marks})"
        )
        params = (sasl_username, format_ts(since), *(str(outcome) for outcome in outcomes))
        row = await self._read(
            lambda c: c.execute(sql, params).fetchone(), "summing recipients", cancellable=True
        )
        return int(row[0]) if row else 0

    def _insert_sql(self, rows: int) -> str:
        sql = self._inserts.get(rows)
        if sql is None:
            row = "(" + ", ".join("?" * EVENT_VALUES) + ")"
            sql = f"INSERT OR IGNORE INTO {self.table} ({EVENT_COLUMNS}) VALUES " + ", ".join([row] * rows)
            self._inserts[rows] = sql
        return sql

    async def add_events(self, events: Sequence[Event], origin: str | None = None) -> None:
        if not events:
            return
        self._check_file()
        # One multi-row INSERT per chunk, not executemany: the thread binds every value in
        # one go and SQLite inserts the rows in one step with the GIL released, instead of
        # taking the GIL back from the event loop for every row.
        statements: list[tuple[str, list[object]]] = []
        start = 0
        for size in _statement_sizes(len(events)):
            values: list[object] = []
            for event in events[start : start + size]:
                values.extend(event_row(event, format_ts, origin))
            statements.append((self._insert_sql(size), values))
            start += size

        def insert(connection: sqlite3.Connection) -> None:
            def all_chunks() -> None:
                for sql, values in statements:
                    connection.execute(sql, values)

            _in_transaction(connection, all_chunks)
            self._checkpoint_if_big(connection)

        await self._write(insert, "recording events")

    def _checkpoint_if_big(self, connection: sqlite3.Connection) -> None:
        """A checkpoint now, from the writer, if the write-ahead log has grown past
        WAL_CHECKPOINT_BYTES: the one a second (sync_to_disk) cannot keep up with a
        replay, and a log left to fill the disk could never be checkpointed (that needs
        room in the database file)."""
        try:
            if os.path.getsize(f"{self.path}-wal") < WAL_CHECKPOINT_BYTES:
                return
            connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except (OSError, sqlite3.Error):
            pass  # not a failed write: the next batch or sync_to_disk tries again

    def _check_file(self) -> None:
        """Raise DatabaseReplaced if the path no longer names the file opened (one stat,
        before each write: a deleted file would take the writes and lose them)."""
        if self._identity is None:
            return
        now = _identity(self.path)
        if now != self._identity:
            deleted = now is None
            raise DatabaseReplaced(
                f"sqlite: {self.path} no longer names the open database "
                f"({'deleted' if deleted else 'another file was put there'})",
                deleted=deleted,
            )

    async def sync_to_disk(self) -> None:
        """Copy what the WAL holds into the database file and fsync both (from the reader
        connection: the writer goes on meanwhile)."""
        await self._read(lambda c: c.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone(), "syncing to disk")

    async def probe_write(self) -> None:
        sql = f"INSERT INTO {self.table} (ts, sasl_username, sender, client_address, recipient_count) VALUES (?, ?, ?, ?, ?)"

        def probe(connection: sqlite3.Connection) -> None:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.execute(sql, (format_ts(datetime.now(UTC)), "policyd-probe", "", "", 0))
            finally:
                connection.execute("ROLLBACK")

        await self._write(probe, "writing a test row (rolled back)")

    async def max_event_id(self) -> int:
        sql = f"SELECT MAX(rowid) FROM {self.table}"
        row = await self._read(lambda c: c.execute(sql).fetchone(), "reading the last event id")
        return int(row[0]) if row and row[0] is not None else 0

    async def load_window(
        self, since: datetime, up_to_id: int, exclude_origin: str | None, before: datetime | None = None
    ) -> list[UserHistory]:
        until = "" if before is None else " AND ts < ?"
        params: tuple[object, ...] = (format_ts(since), up_to_id, exclude_origin, exclude_origin)
        if before is not None:
            params = (*params, format_ts(before))
        # The ts index's range (the table's newest rows, contiguous: it grows in time
        # order), grouped by user; no ORDER BY ts inside a group (the per-user index
        # would then be scanned whole): Window.load sorts a user's events if needed.
        sql = (
            f"SELECT sasl_username, group_concat({_MS_SQL}), group_concat(recipient_count), "
            f"group_concat({OUTCOME_CODE_SQL}) FROM {self.table} INDEXED BY {self.table}_ts "
            f"WHERE ts >= ? AND rowid <= ? AND (? IS NULL OR origin IS NOT ?){until} GROUP BY sasl_username"
        )

        def load(connection: sqlite3.Connection) -> list[UserHistory]:
            return [
                UserHistory(str(user), split_numbers(times), split_numbers(counts), split_numbers(codes))
                for user, times, counts, codes in connection.execute(sql, params)
            ]

        return await self._read(load, "loading the window")

    async def tail(self, after_id: int, exclude_origin: str, limit: int) -> Tail:
        table = self.table
        sql = (
            f"SELECT rowid, sasl_username, {_MS_SQL}, recipient_count, {OUTCOME_CODE_SQL}, origin "
            f"FROM {table} WHERE rowid > ? AND origin IS NOT ? ORDER BY rowid LIMIT ?"
        )

        def read(connection: sqlite3.Connection) -> Tail:
            # One read transaction: the rows and the highest id agree.
            def both() -> Tail:
                rows = connection.execute(sql, (after_id, exclude_origin, limit)).fetchall()
                top = connection.execute(f"SELECT MAX(rowid) FROM {table}").fetchone()
                return Tail(
                    [
                        TailRow(int(row_id), str(user), int(at), int(count), int(code), str(origin or ""))
                        for row_id, user, at, count, code, origin in rows
                    ],
                    int(top[0]) if top and top[0] is not None else 0,
                )

            return _in_transaction(connection, both, begin="BEGIN")

        return await self._read(read, "reading new events")

    async def tail_summary(self, after_id: int, up_to_id: int, exclude_origin: str) -> tuple[int, int]:
        sql = (
            f"SELECT COUNT(*), COALESCE(SUM(rowid), 0) FROM {self.table} "
            "WHERE rowid > ? AND rowid <= ? AND origin IS NOT ?"
        )

        def read(connection: sqlite3.Connection) -> tuple[int, int]:
            count, total = connection.execute(sql, (after_id, up_to_id, exclude_origin)).fetchone()
            return int(count), int(total)

        return await self._read(read, "reading new events")

    async def existing_event_ids(self, event_ids: Sequence[str], exclude_origin: str) -> set[str]:
        table = self.table

        def find(connection: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(event_ids), EVENT_ID_CHUNK):
                chunk = list(event_ids[start : start + EVENT_ID_CHUNK])
                marks = ", ".join("?" * len(chunk))
                rows = connection.execute(
                    f"SELECT event_id FROM {table} WHERE event_id IN ({marks}) AND origin IS NOT ?",
                    [*chunk, exclude_origin],
                )
                found.update(str(row[0]) for row in rows)
            return found

        return await self._read(find, "looking up event ids")

    async def queue_ids(self, sasl_username: str, since: datetime) -> set[str]:
        sql = (
            f"SELECT DISTINCT queue_id FROM {self.table} "
            "WHERE sasl_username = ? AND ts >= ? AND queue_id IS NOT NULL AND queue_id != ''"
        )
        rows = await self._read(
            lambda c: c.execute(sql, (sasl_username, format_ts(since))).fetchall(),
            "reading queue ids",
            cancellable=True,
        )
        return {str(row[0]) for row in rows}

    async def top_senders(
        self,
        since: datetime,
        limit: int,
        user: str | None = None,
        counted: Sequence[Outcome] = (Outcome.DUNNO, Outcome.HOLD),
    ) -> list[SenderStats]:
        marks = ", ".join("?" * len(counted)) or "NULL"
        only = " AND sasl_username = ?" if user is not None else ""
        sql = (
            "SELECT sasl_username, SUM(recipient_count), COUNT(*), "
            "SUM(action = 'HOLD'), SUM(action = 'REJECT'), MAX(ts), "
            f"SUM(CASE WHEN action IN ({marks}) THEN recipient_count ELSE 0 END), COUNT(DISTINCT client_address) "
            f"FROM {self.table} WHERE ts >= ?{only} GROUP BY sasl_username "
            "ORDER BY 7 DESC, 2 DESC, 1 LIMIT ?"
        )
        params: list[object] = [str(outcome) for outcome in counted]
        params.append(format_ts(since))
        if user is not None:
            params.append(user)
        params.append(limit)
        rows = await self._read(lambda c: c.execute(sql, params).fetchall(), "listing top senders")
        return [
            SenderStats(
                str(name),
                int(recipients),
                int(messages),
                int(held),
                int(rejected),
                parse_ts(last),
                int(counted_sum),
                int(addresses),
            )
            for name, recipients, messages, held, rejected, last, counted_sum, addresses in rows
        ]

    async def user_events(self, sasl_username: str, since: datetime, limit: int) -> list[Event]:
        sql = (
            "SELECT ts, sender, client_address, recipient_count, action, event_id, queue_id "
            f"FROM {self.table} WHERE sasl_username = ? AND ts >= ? ORDER BY ts DESC, rowid DESC LIMIT ?"
        )

        def read(connection: sqlite3.Connection) -> list[Event]:
            # Made into events in the thread too: parsing thousands of timestamps is not
            # the event loop's work.
            rows = connection.execute(sql, (sasl_username, format_ts(since), limit))
            return [
                Event(
                    parse_ts(ts),
                    sasl_username,
                    str(sender or ""),
                    str(client or ""),
                    int(count or 0),
                    outcome_of_stored(action),
                    str(event_id or ""),
                    str(queue_id or ""),
                )
                for ts, sender, client, count, action, event_id, queue_id in rows
            ]

        return await self._read(read, "reading a user's events", cancellable=True)

    async def purge(self, before: datetime, batch_rows: int = PURGE_BATCH_ROWS) -> int:
        table = self.table
        sql = f"DELETE FROM {table} WHERE rowid IN (SELECT rowid FROM {table} WHERE ts < ? LIMIT ?)"
        bound = format_ts(before)
        deleted = 0
        while True:
            # Each batch its own statement (its own short transaction), each its own trip
            # to the thread: the daemon's writes get in between.
            batch: int = await self._write(
                lambda c: c.execute(sql, (bound, batch_rows)).rowcount, "purging old events"
            )
            deleted += batch
            if batch < batch_rows:
                return deleted

    async def count_events(self, before: datetime | None = None) -> int:
        sql = f"SELECT COUNT(*) FROM {self.table}"
        params: tuple[str, ...] = ()
        if before is not None:
            sql, params = f"{sql} WHERE ts < ?", (format_ts(before),)
        row = await self._read(lambda c: c.execute(sql, params).fetchone(), "counting events")
        return int(row[0]) if row else 0

    async def _rules_fetch(self, sql: str, params: Sequence[object]) -> list[tuple[object, ...]]:
        return await self._read(
            lambda c: [tuple(row) for row in c.execute(sql, tuple(params))], "reading rules"
        )

    async def _rules_execute(self, statements: Sequence[tuple[str, Sequence[object]]]) -> list[int]:
        self._check_file()

        def run(connection: sqlite3.Connection) -> list[int]:
            return _in_transaction(
                connection,
                lambda: [connection.execute(sql, tuple(params)).rowcount for sql, params in statements],
            )

        return await self._write(run, "changing rules")

    def backup_command(self) -> str:
        # VACUUM INTO: a consistent copy, even while a daemon writes to the file.
        copy = f"{self.path}.before-migrate".replace("'", "''")
        sql = f"VACUUM INTO '{copy}'"
        quoted = f'"{sql}"' if shlex.quote(self.path) == self.path else shlex.quote(sql)
        return f"sqlite3 {shlex.quote(self.path)} {quoted}"
