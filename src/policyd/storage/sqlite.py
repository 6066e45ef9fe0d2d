"""SQLite backend: the embedded default, nothing to install.

WAL journal, so the reader connection never waits for the writer's fsync.  Each
connection runs in its own thread (aiosqlite), so the event loop never blocks on disk.
Timestamps are stored as UTC text ``YYYY-MM-DD HH:MM:SS.mmm`` (what DATETIME(3) holds
in MariaDB), which sorts and compares correctly as text.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import aiosqlite

from policyd.quota import Outcome
from policyd.storage.base import (
    EVENT_COLUMNS,
    EVENT_ID_CHUNK,
    EVENT_VALUES,
    OUTCOME_CODE_SQL,
    PURGE_BATCH_ROWS,
    Event,
    SenderStats,
    Storage,
    StorageError,
    Tail,
    TailRow,
    UserHistory,
    event_row,
    split_numbers,
    utc,
)

# How long SQLite itself waits on a lock held by another process (policyd purge, say)
# before failing.  The daemon bounds its own wait separately (db_timeout).
BUSY_TIMEOUT_SECONDS = 5.0

_TS_FORMAT = "%Y-%m-%d %H:%M:%S.%f"
# ts (text) as milliseconds since the epoch: julianday() parses it in C; the double it
# returns is exact to well under a millisecond, so rounding gives the stored value.
_MS_SQL = "CAST(round((julianday(ts) - 2440587.5) * 86400000) AS INTEGER)"

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


def format_ts(moment: datetime) -> str:
    return utc(moment).strftime(_TS_FORMAT)[:-3]


def parse_ts(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)


@asynccontextmanager
async def _wrapped_errors(what: str) -> AsyncIterator[None]:
    try:
        yield
    except (sqlite3.Error, OSError, ValueError) as error:
        raise StorageError(f"sqlite: {what}: {error}") from error


class SQLiteStorage(Storage):
    def __init__(self, path: str, table: str = "events") -> None:
        super().__init__(table)
        self.path = path
        self._reader: aiosqlite.Connection | None = None
        self._writer: aiosqlite.Connection | None = None

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
        async with _wrapped_errors(f"opening {self.path}"):
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True, mode=0o750)
            self._writer = await aiosqlite.connect(
                self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None
            )
            await self._writer.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk before Postfix gets its answer.
            await self._writer.execute("PRAGMA synchronous=FULL")
            self._reader = await aiosqlite.connect(
                self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None
            )

    async def close(self) -> None:
        for connection in (self._reader, self._writer):
            if connection is not None:
                try:
                    await connection.close()
                except (sqlite3.Error, ValueError):
                    pass
        self._reader = self._writer = None

    def _connections(self) -> tuple[aiosqlite.Connection, aiosqlite.Connection]:
        if self._reader is None or self._writer is None:
            raise StorageError("sqlite: storage is not open")
        return self._reader, self._writer

    async def _existing_columns(self) -> set[str]:
        _, writer = self._connections()
        cursor = await writer.execute(f"PRAGMA table_info({self.table})")
        return {row[1] for row in await cursor.fetchall()}

    async def _existing_indexes(self) -> set[str]:
        _, writer = self._connections()
        cursor = await writer.execute(f"PRAGMA index_list({self.table})")
        return {row[1] for row in await cursor.fetchall()}

    def _wanted_indexes(self) -> dict[str, str]:
        table = self.table
        return {
            # Covers the per-request sum: the user's rows in the window, read from the index alone.
            f"{table}_user_ts": f"CREATE INDEX {table}_user_ts ON {table}(sasl_username, ts, action, recipient_count)",
            f"{table}_ts": f"CREATE INDEX {table}_ts ON {table}(ts)",
            f"{table}_event_id": f"CREATE UNIQUE INDEX {table}_event_id ON {table}(event_id)",
        }

    async def _plan(self) -> list[tuple[str, str]]:
        columns = await self._existing_columns()
        if not columns:
            definition = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items())
            steps = [(f"create table {self.table}", f"CREATE TABLE {self.table} ({definition})")]
            existing_indexes: set[str] = set()
        else:
            steps = [
                (f"add column {self.table}.{name}", f"ALTER TABLE {self.table} ADD COLUMN {name} {kind}")
                for name, kind in _COLUMNS.items()
                if name not in columns
            ]
            existing_indexes = await self._existing_indexes()
        steps += [
            (f"create index {name}", statement)
            for name, statement in self._wanted_indexes().items()
            if name not in existing_indexes
        ]
        return steps

    async def pending_migrations(self) -> list[str]:
        async with _wrapped_errors("reading the schema"):
            return [description for description, _ in await self._plan()]

    async def migrate(self) -> list[str]:
        _, writer = self._connections()
        async with _wrapped_errors("migrating the schema"):
            await writer.execute("BEGIN IMMEDIATE")
            try:
                steps = await self._plan()
                for _, statement in steps:
                    await writer.execute(statement)
                await writer.execute("COMMIT")
            except BaseException:
                await writer.execute("ROLLBACK")
                raise
        return [description for description, _ in steps]

    async def recipients_since(self, sasl_username: str, since: datetime, outcomes: Sequence[Outcome]) -> int:
        reader, _ = self._connections()
        marks = ",".join("?" * len(outcomes))
        async with _wrapped_errors("summing recipients"):
            cursor = await reader.execute(
                f"SELECT COALESCE(SUM(recipient_count), 0) FROM {self.table} "
                f"WHERE sasl_username = ? AND ts >= ? AND action IN ({marks})",
                (sasl_username, format_ts(since), *(str(outcome) for outcome in outcomes)),
            )
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def add_events(self, events: Sequence[Event], origin: str | None = None) -> None:
        if not events:
            return
        _, writer = self._connections()
        rows = [event_row(event, format_ts, origin) for event in events]
        marks = ", ".join("?" * EVENT_VALUES)
        async with _wrapped_errors("recording events"):
            await writer.execute("BEGIN IMMEDIATE")
            try:
                await writer.executemany(
                    f"INSERT OR IGNORE INTO {self.table} ({EVENT_COLUMNS}) VALUES ({marks})", rows
                )
                await writer.execute("COMMIT")
            except BaseException:
                await writer.execute("ROLLBACK")
                raise

    async def max_event_id(self) -> int:
        reader, _ = self._connections()
        async with _wrapped_errors("reading the last event id"):
            cursor = await reader.execute(f"SELECT MAX(rowid) FROM {self.table}")
            row = await cursor.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    async def load_window(
        self, since: datetime, up_to_id: int, exclude_origin: str, before: datetime | None = None
    ) -> list[UserHistory]:
        reader, _ = self._connections()
        until = "" if before is None else " AND ts < ?"
        params: tuple[object, ...] = (format_ts(since), up_to_id, exclude_origin)
        if before is not None:
            params = (*params, format_ts(before))
        async with _wrapped_errors("loading the window"):
            cursor = await reader.execute(
                "SELECT sasl_username, group_concat(ms), group_concat(rc), group_concat(code) FROM ("
                f"SELECT sasl_username, {_MS_SQL} AS ms, recipient_count AS rc, {OUTCOME_CODE_SQL} AS code "
                f"FROM {self.table} WHERE ts >= ? AND rowid <= ? AND origin IS NOT ?{until} "
                "ORDER BY sasl_username, ts) GROUP BY sasl_username",
                params,
            )
            rows = await cursor.fetchall()
        return [
            UserHistory(str(user), split_numbers(times), split_numbers(counts), split_numbers(codes))
            for user, times, counts, codes in rows
        ]

    async def tail(self, after_id: int, exclude_origin: str, limit: int) -> Tail:
        reader, _ = self._connections()
        async with _wrapped_errors("reading new events"):
            # One read transaction: the highest id and the rows agree.
            await reader.execute("BEGIN")
            try:
                cursor = await reader.execute(
                    f"SELECT rowid, sasl_username, {_MS_SQL}, recipient_count, {OUTCOME_CODE_SQL}, origin "
                    f"FROM {self.table} WHERE rowid > ? AND origin IS NOT ? ORDER BY rowid LIMIT ?",
                    (after_id, exclude_origin, limit),
                )
                rows = await cursor.fetchall()
                cursor = await reader.execute(f"SELECT MAX(rowid) FROM {self.table}")
                top = await cursor.fetchone()
            finally:
                await reader.execute("COMMIT")
        return Tail(
            [
                TailRow(int(row_id), str(user), int(at), int(count), int(code), str(origin or ""))
                for row_id, user, at, count, code, origin in rows
            ],
            int(top[0]) if top and top[0] is not None else 0,
        )

    async def existing_event_ids(self, event_ids: Sequence[str], exclude_origin: str) -> set[str]:
        reader, _ = self._connections()
        found: set[str] = set()
        async with _wrapped_errors("looking up event ids"):
            for start in range(0, len(event_ids), EVENT_ID_CHUNK):
                chunk = list(event_ids[start : start + EVENT_ID_CHUNK])
                marks = ", ".join("?" * len(chunk))
                cursor = await reader.execute(
                    f"SELECT event_id FROM {self.table} WHERE event_id IN ({marks}) AND origin IS NOT ?",
                    [*chunk, exclude_origin],
                )
                found.update(str(row[0]) for row in await cursor.fetchall())
        return found

    async def top_senders(self, since: datetime, limit: int) -> list[SenderStats]:
        reader, _ = self._connections()
        async with _wrapped_errors("listing top senders"):
            cursor = await reader.execute(
                "SELECT sasl_username, SUM(recipient_count), COUNT(*), "
                "SUM(action = 'HOLD'), SUM(action = 'REJECT'), MAX(ts) "
                f"FROM {self.table} WHERE ts >= ? GROUP BY sasl_username "
                "ORDER BY 2 DESC, 1 LIMIT ?",
                (format_ts(since), limit),
            )
            rows = await cursor.fetchall()
        return [
            SenderStats(str(user), int(recipients), int(messages), int(held), int(rejected), parse_ts(last))
            for user, recipients, messages, held, rejected, last in rows
        ]

    async def purge(self, before: datetime, batch_rows: int = PURGE_BATCH_ROWS) -> int:
        _, writer = self._connections()
        deleted = 0
        async with _wrapped_errors("purging old events"):
            while True:
                cursor = await writer.execute(
                    f"DELETE FROM {self.table} WHERE rowid IN "
                    f"(SELECT rowid FROM {self.table} WHERE ts < ? LIMIT ?)",
                    (format_ts(before), batch_rows),
                )
                deleted += cursor.rowcount
                if cursor.rowcount < batch_rows:
                    return deleted

    async def count_events(self) -> int:
        reader, _ = self._connections()
        async with _wrapped_errors("counting events"):
            cursor = await reader.execute(f"SELECT COUNT(*) FROM {self.table}")
            row = await cursor.fetchone()
        return int(row[0]) if row else 0
