"""The storage interface every backend implements, and the records it deals in.

A backend knows SQL and its driver; it knows nothing about quotas.  Driver errors are
wrapped at this boundary as ``StorageError`` so the rest of the daemon handles one
exception type whatever the database.
"""

from __future__ import annotations

import abc
import hashlib
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from policyd.quota import Outcome
from policyd.rules import ListEntry, Override, Reset
from policyd.storage import schema

_TABLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

# Rows deleted per statement when purging: small enough that a purge of millions of
# rows never holds a lock the daemons wait on for more than a moment.
PURGE_BATCH_ROWS = 5000


class StorageError(Exception):
    """The database failed (unreachable, locked, full, ...).

    `hint`: what the admin must do, when the error will not pass by itself (a wrong
    password, a missing database, a file the daemon's user may not write): `permanent`.
    """

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint

    @property
    def permanent(self) -> bool:
        return self.hint is not None


class DatabaseReplaced(StorageError):
    """The database file was deleted (or another put at its path) under the daemon:
    writes would go into a file nobody will read again."""

    def __init__(self, message: str, deleted: bool) -> None:
        super().__init__(message)
        self.deleted = deleted


class SchemaMissing(StorageError):
    """The table (or a column of it) is not there: dropped, or the database re-created
    under the daemon.  migrate() makes it again."""


_id_random = random.SystemRandom()
_id_bits = random.Random(_id_random.getrandbits(128))


def new_event_id() -> str:
    """32 hex digits: the time in ms, then 80 random bits.  Unique, and increasing with
    time, so each insert lands at the end of the unique index instead of anywhere in it."""
    return f"{time.time_ns() // 1_000_000:012x}{_id_bits.getrandbits(80):020x}"


@dataclass(slots=True)
class Event:
    """One counted message, as stored in the events table."""

    ts: datetime  # timezone-aware, UTC
    sasl_username: str
    sender: str
    client_address: str
    recipient_count: int
    outcome: Outcome
    # Unique per event: replaying a write that may already have landed is harmless.
    event_id: str = field(default_factory=new_event_id)
    # Postfix's queue id of the message ("" when Postfix did not send one).
    queue_id: str = ""


# The order of the values in `event_row`, for the backends' INSERT statements.
EVENT_COLUMNS = (
    "ts, sasl_username, sender, client_address, recipient_count, action, event_id, queue_id, origin"
)
EVENT_VALUES = len(EVENT_COLUMNS.split(","))


def event_row(event: Event, ts: Callable[[datetime], Any], origin: str | None) -> tuple[Any, ...]:
    """An event's values in EVENT_COLUMNS order, its timestamp converted by `ts`."""
    return (
        ts(event.ts),
        event.sasl_username,
        event.sender,
        event.client_address,
        event.recipient_count,
        str(event.outcome),
        event.event_id,
        event.queue_id or None,
        origin,
    )


def outcome_of_stored(action: object) -> Outcome:
    """The outcome of a stored `action` value (go-policyd's rows have none: DUNNO)."""
    if isinstance(action, bytes | bytearray):
        action = bytes(action).decode("ascii", "replace")
    text = str(action or "").strip().upper()
    return Outcome(text) if text in Outcome.__members__ else Outcome.DUNNO


# Outcome codes the window-loading queries return (as window.OUTCOME_CODES).
OUTCOME_CODE_SQL = "CASE action WHEN 'HOLD' THEN 1 WHEN 'REJECT' THEN 2 ELSE 0 END"
# Event ids asked about in one statement at most (existing_event_ids).
EVENT_ID_CHUNK = 500


@dataclass(frozen=True, slots=True)
class UserHistory:
    """One user's events in a window, read in bulk: times (ms since the epoch, UTC),
    recipients and outcome codes (0 DUNNO, 1 HOLD, 2 REJECT), the i-th of each together."""

    sasl_username: str
    times: list[int]
    counts: list[int]
    codes: list[int]


@dataclass(frozen=True, slots=True)
class TailRow:
    """One event row written by someone else, as the tail reads it."""

    row_id: int
    sasl_username: str
    at: int  # ms since the epoch, UTC
    recipient_count: int
    code: int  # 0 DUNNO, 1 HOLD, 2 REJECT
    origin: str  # "" for rows written without one (go-policyd, an older policyd)


@dataclass(frozen=True, slots=True)
class Tail:
    rows: list[TailRow]
    max_id: int  # the highest row id in the table (anyone's), 0 when empty


def split_numbers(text: str | bytes | None) -> list[int]:
    """The integers of a comma-separated list (what GROUP_CONCAT / group_concat return)."""
    if not text:
        return []
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("ascii")
    return list(map(int, text.split(",")))


@dataclass(frozen=True, slots=True)
class SenderStats:
    """One line of `policyd top`."""

    sasl_username: str
    recipients: int
    messages: int
    held: int
    rejected: int
    last_seen: datetime
    # What the quota counts (the outcomes asked for; resets are the caller's), and how
    # many distinct client addresses.
    counted: int = 0
    client_addresses: int = 0


def check_table_name(name: str) -> str:
    """Table names end up in SQL text, so only plain identifiers are allowed."""
    if not _TABLE_NAME_RE.match(name):
        raise ValueError(f"table name {name!r} must be letters, digits and _ (at most 64)")
    return name


def utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC)


def utc_text(moment: datetime) -> str:
    """UTC to the millisecond, cut (never rounded): "YYYY-MM-DD HH:MM:SS.mmm", what SQLite's
    `ts` holds and MariaDB/MySQL's DATETIME(3) takes.  isoformat, in C: strftime took
    2.7 µs of each event's write, this 1.4."""
    if moment.tzinfo is not UTC:
        moment = utc(moment)
    return moment.isoformat(" ", "milliseconds")[:23]


@dataclass(frozen=True, slots=True)
class StoredRules:
    """What the rules tables hold (resets: those asked for)."""

    overrides: list[Override]
    entries: list[ListEntry]
    resets: list[Reset]


class Storage(abc.ABC):
    """A place to keep events.  All methods may raise StorageError."""

    # How the rules tables are rendered (storage/schema.py).
    dialect: str = schema.SQLITE

    def __init__(self, table: str) -> None:
        self.table = check_table_name(table)
        # How far apart consecutive row ids are (auto_increment_increment: on a Galera
        # cluster each node hands out every Nth id), as last seen; the tail scales the
        # number of ids it re-reads by it, so that it covers as many rows.
        self.id_step = 1

    @classmethod
    @abc.abstractmethod
    def from_url(cls, url: str, table: str) -> Storage:
        """The backend for a `database` URL of its scheme (validated here, not connected)."""

    @property
    @abc.abstractmethod
    def description(self) -> str:
        """Where the data is, for logs (never contains a password)."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect.  Does not create or change the schema (see migrate)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def pending_migrations(self) -> list[str]:
        """What migrate() would do, one line per step; empty when up to date."""

    async def reopen(self) -> None:
        """Close and open again (after DatabaseReplaced: the file now at the path)."""
        await self.close()
        await self.open()

    @abc.abstractmethod
    async def migrate(self) -> list[str]:
        """Create or upgrade the schema in place, keeping every row; returns the steps done."""

    @abc.abstractmethod
    async def recipients_since(self, sasl_username: str, since: datetime, outcomes: Sequence[Outcome]) -> int:
        """Sum of recipient_count of the user's events at or after `since` with these outcomes."""

    @abc.abstractmethod
    async def add_events(self, events: Sequence[Event], origin: str | None = None) -> None:
        """Store events in one transaction; an event_id already stored is skipped.

        `origin` names the daemon run that writes them (the tail of each daemon skips
        its own rows).
        """

    async def sync_to_disk(self) -> None:
        """Make what was committed durable against a power cut (for a backend whose commits
        are not fsync'd each; a database server has its own settings for that)."""
        return None

    @abc.abstractmethod
    async def queue_ids(self, sasl_username: str, since: datetime) -> set[str]:
        """The Postfix queue ids recorded with the user's events at or after `since`
        (`policyd held`: the only messages its release and delete may touch)."""

    @abc.abstractmethod
    async def probe_write(self) -> None:
        """Write one row in a transaction that is rolled back: raises StorageError (with
        its hint) if this user may not write the table.  For `check-config --connect`."""

    @abc.abstractmethod
    async def max_event_id(self) -> int:
        """The highest row id in the table (0 when empty)."""

    @abc.abstractmethod
    async def load_window(
        self, since: datetime, up_to_id: int, exclude_origin: str | None, before: datetime | None = None
    ) -> list[UserHistory]:
        """Every user's events at or after `since` (and before `before`, if given) with a
        row id at most `up_to_id`, except those written by `exclude_origin` (None: every
        origin; the faster query on a big table), grouped by user (a user's events in
        any order: Window.load sorts them)."""

    @abc.abstractmethod
    async def tail(self, after_id: int, exclude_origin: str, limit: int) -> Tail:
        """Rows with an id above `after_id` not written by `exclude_origin`, in id order
        (at most `limit`), and the highest id in the table."""

    @abc.abstractmethod
    async def tail_summary(self, after_id: int, up_to_id: int, exclude_origin: str) -> tuple[int, int]:
        """How many rows have an id above `after_id` and at most `up_to_id`, not written by
        `exclude_origin`, and the sum of their ids: the tail compares it with what it
        has read of that range, and reads it again only if a row came in late."""

    @abc.abstractmethod
    async def existing_event_ids(self, event_ids: Sequence[str], exclude_origin: str) -> set[str]:
        """Which of these event ids are stored, in rows not written by `exclude_origin`."""

    @abc.abstractmethod
    async def top_senders(
        self,
        since: datetime,
        limit: int,
        user: str | None = None,
        counted: Sequence[Outcome] = (Outcome.DUNNO, Outcome.HOLD),
    ) -> list[SenderStats]:
        """Users (or only `user`) since `since`, by the recipients of the `counted`
        outcomes, then by recipients of all outcomes, largest first."""

    @abc.abstractmethod
    async def user_events(self, sasl_username: str, since: datetime, limit: int) -> list[Event]:
        """The user's events at or after `since`, newest first (at most `limit`), with their
        senders and client addresses: the status page's view of one user."""

    @abc.abstractmethod
    async def purge(self, before: datetime, batch_rows: int = PURGE_BATCH_ROWS) -> int:
        """Delete events older than `before`, in batches; returns the number deleted."""

    @abc.abstractmethod
    async def count_events(self, before: datetime | None = None) -> int:
        """Number of rows in the table (for tests, status and the CLI); with `before`,
        those purge(before) would delete."""

    def backup_command(self) -> str:
        """A shell command that copies the table aside (`policyd migrate --dry-run` shows it)."""
        return f"back up table {self.table} with your database's own tool"

    # -- the rules tables (described once in schema.py) ------------------------------

    @abc.abstractmethod
    async def _rules_fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """Rows of one query on the rules tables (`sql` with ? placeholders)."""

    @abc.abstractmethod
    async def _rules_execute(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        """Statements on the rules tables in one transaction; the rows each changed."""

    async def rules_signature(self) -> tuple[int, ...]:
        """The largest id and row count of each rules table: changes when anything does."""
        rows = await self._rules_fetch(schema.signature_sql(self.table, self.dialect), ())
        return tuple(int(value) for value in rows[0]) if rows else ()

    async def load_rules(self, resets_since_ms: int) -> StoredRules:
        """Every override and list entry, and the resets forgetting events at or after
        `resets_since_ms` (older ones change nothing the window holds)."""
        t, d = self.table, self.dialect
        overrides = [
            Override(
                str(user), int(window), int(hold), int(reject), _opt_int(until), str(reason), int(created)
            )
            for _, user, window, hold, reject, until, reason, created in await self._rules_fetch(
                schema.select_sql(schema.OVERRIDES, t, d), ()
            )
        ]
        entries = [
            ListEntry(
                str(kind),
                str(target),
                str(user),
                str(action),
                _opt_int(until),
                str(reason),
                int(created),
                "database",
                int(entry_id),
            )
            for entry_id, kind, target, user, action, until, reason, created in await self._rules_fetch(
                schema.select_sql(schema.LISTS, t, d), ()
            )
        ]
        resets = [
            Reset(int(reset_id), str(user), int(before), str(reason), int(created))
            for reset_id, user, before, reason, created in await self._rules_fetch(
                schema.select_sql(schema.RESETS, t, d, " WHERE before_ms >= ?"), (resets_since_ms,)
            )
        ]
        return StoredRules(overrides, entries, resets)

    async def set_override(self, override: Override) -> None:
        """The user's override for that window, in place of any earlier one."""
        t, d = self.table, self.dialect
        await self._rules_execute(
            [
                (
                    schema.delete_sql(schema.OVERRIDES, t, d, "sasl_username = ? AND window_ms = ?"),
                    (override.sasl_username, override.window_ms),
                ),
                (
                    schema.insert_sql(schema.OVERRIDES, t, d),
                    (
                        override.sasl_username,
                        override.window_ms,
                        override.hold,
                        override.reject,
                        override.until_ms,
                        override.reason,
                        override.created_ms,
                    ),
                ),
            ]
        )

    async def remove_overrides(self, sasl_username: str, window_ms: int | None = None) -> int:
        """The user's overrides (of one window, or all); returns how many were removed."""
        t, d = self.table, self.dialect
        statement: tuple[str, Sequence[Any]]
        if window_ms is None:
            statement = (schema.delete_sql(schema.OVERRIDES, t, d, "sasl_username = ?"), (sasl_username,))
        else:
            statement = (
                schema.delete_sql(schema.OVERRIDES, t, d, "sasl_username = ? AND window_ms = ?"),
                (sasl_username, window_ms),
            )
        [removed] = await self._rules_execute([statement])
        return removed

    async def add_list_entry(self, entry: ListEntry) -> None:
        """The entry, in place of any for the same target and user (allow or block)."""
        t, d = self.table, self.dialect
        await self._rules_execute(
            [
                (
                    schema.delete_sql(schema.LISTS, t, d, "target = ? AND sasl_username = ?"),
                    (entry.target, entry.user),
                ),
                (
                    schema.insert_sql(schema.LISTS, t, d),
                    (
                        entry.kind,
                        entry.target,
                        entry.user,
                        entry.action,
                        entry.until_ms,
                        entry.reason,
                        entry.created_ms,
                    ),
                ),
            ]
        )

    async def remove_list_entries(self, target: str, sasl_username: str | None = None) -> int:
        """Entries for the target (of that user only, when given); returns how many."""
        t, d = self.table, self.dialect
        statement: tuple[str, Sequence[Any]]
        if sasl_username is None:
            statement = (schema.delete_sql(schema.LISTS, t, d, "target = ?"), (target,))
        else:
            statement = (
                schema.delete_sql(schema.LISTS, t, d, "target = ? AND sasl_username = ?"),
                (target, sasl_username),
            )
        [removed] = await self._rules_execute([statement])
        return removed

    async def add_reset(self, reset: Reset) -> None:
        t, d = self.table, self.dialect
        await self._rules_execute(
            [
                (
                    schema.insert_sql(schema.RESETS, t, d),
                    (reset.sasl_username, reset.before_ms, reset.reason, reset.created_ms),
                )
            ]
        )

    async def claim_alert(
        self, sasl_username: str, limit_label: str, level: int, *, at_ms: int, window_ms: int, origin: str
    ) -> bool:
        """Whether this daemon is the one to tell that `sasl_username` reached `level`
        (1 HOLD, 2 REJECT) of the limit `limit_label` at `at_ms`: False if that incident
        was told already, by any daemon sharing the database (an alert of this level or
        higher for the limit within its window, since the user's last reset), or is
        being claimed by another at this moment (the unique claim)."""
        t, d = self.table, self.dialect
        alerts = schema.quote(schema.ALERTS.name(schema.table_name_for(t, d)), d)
        resets = schema.quote(schema.RESETS.name(schema.table_name_for(t, d)), d)
        [(reset_ms,)] = await self._rules_fetch(
            f"SELECT COALESCE(MAX(created_ms), 0) FROM {resets} WHERE sasl_username = ?", (sasl_username,)
        )
        since = max(at_ms - window_ms, int(reset_ms))
        [(told,)] = await self._rules_fetch(
            f"SELECT COUNT(*) FROM {alerts} WHERE sasl_username = ? AND limit_label = ? AND level >= ? AND at_ms >= ?",
            (sasl_username, limit_label, level, since),
        )
        if int(told):
            return False
        # Two daemons crossing in one incident at once: one claim between them (the
        # window's bucket of the moment, and the last reset, name the incident).
        claim = hashlib.sha256(
            f"{sasl_username}\0{limit_label}\0{level}\0{at_ms // max(window_ms, 1)}\0{reset_ms}".encode()
        ).hexdigest()[:32]
        [inserted] = await self._rules_execute(
            [
                (
                    schema.insert_unless_there_sql(schema.ALERTS, t, d),
                    (claim, sasl_username, limit_label, level, at_ms, origin),
                )
            ]
        )
        return inserted == 1


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)
