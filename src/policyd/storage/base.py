"""The storage interface every backend implements, and the records it deals in.

A backend knows SQL and its driver; it knows nothing about quotas.  Driver errors are
wrapped at this boundary as ``StorageError`` so the rest of the daemon handles one
exception type whatever the database.
"""

from __future__ import annotations

import abc
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from policyd.quota import Outcome

_TABLE_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

# Rows deleted per statement when purging: small enough that a purge of millions of
# rows never holds a lock the daemons wait on for more than a moment.
PURGE_BATCH_ROWS = 5000


class StorageError(Exception):
    """The database failed (unreachable, locked, full, ...)."""


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
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


# The order of the values in `event_row`, for the backends' INSERT statements.
EVENT_COLUMNS = "ts, sasl_username, sender, client_address, recipient_count, action, event_id"


def event_row(event: Event, ts: Callable[[datetime], Any]) -> tuple[Any, ...]:
    """An event's values in EVENT_COLUMNS order, its timestamp converted by `ts`."""
    return (
        ts(event.ts),
        event.sasl_username,
        event.sender,
        event.client_address,
        event.recipient_count,
        str(event.outcome),
        event.event_id,
    )


@dataclass(frozen=True, slots=True)
class SenderStats:
    """One line of `policyd top`."""

    sasl_username: str
    recipients: int
    messages: int
    held: int
    rejected: int
    last_seen: datetime


def check_table_name(name: str) -> str:
    """Table names end up in SQL text, so only plain identifiers are allowed."""
    if not _TABLE_NAME_RE.match(name):
        raise ValueError(f"table name {name!r} must be letters, digits and _ (at most 64)")
    return name


def utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(UTC)


class Storage(abc.ABC):
    """A place to keep events.  All methods may raise StorageError."""

    def __init__(self, table: str) -> None:
        self.table = check_table_name(table)

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

    @abc.abstractmethod
    async def migrate(self) -> list[str]:
        """Create or upgrade the schema in place, keeping every row; returns the steps done."""

    @abc.abstractmethod
    async def recipients_since(self, sasl_username: str, since: datetime, outcomes: Sequence[Outcome]) -> int:
        """Sum of recipient_count of the user's events at or after `since` with these outcomes."""

    @abc.abstractmethod
    async def add_events(self, events: Sequence[Event]) -> None:
        """Store events in one transaction; an event_id already stored is skipped."""

    @abc.abstractmethod
    async def top_senders(self, since: datetime, limit: int) -> list[SenderStats]:
        """Users by recipients since `since`, largest first (all outcomes)."""

    @abc.abstractmethod
    async def purge(self, before: datetime, batch_rows: int = PURGE_BATCH_ROWS) -> int:
        """Delete events older than `before`, in batches; returns the number deleted."""

    @abc.abstractmethod
    async def count_events(self) -> int:
        """Number of rows in the table (for tests, status and the CLI)."""
