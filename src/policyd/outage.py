"""Database health as the daemon sees it, and the log lines that go with it.

One incident at a time: a line when it starts, a reminder a minute while it lasts, a
line when it ends, never a line per request.  An incident in which a write failed ends
only when a write succeeds (and the spool is replayed): a successful read proves
nothing about writes (a full disk reads fine).  After a failure the database is left
alone for `db_retry` seconds, so requests and background tasks are not each made to
wait for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from policyd.logs import log
from policyd.stats import Stats
from policyd.storage import StorageError

T = TypeVar("T")

# While the database stays unavailable, a reminder this often (never a line per request).
INCIDENT_REMINDER_SECONDS = 60.0
# An incident ends once the database has worked this long: a database that fails every
# other write (a disk at its last megabytes) is one incident, not hundreds.
SETTLE_SECONDS = 1.0


def describe_error(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class Outage:
    def __init__(
        self,
        retry_seconds: float,
        stats: Stats,
        spool_path: str,
        spool_empty: Callable[[], bool] = lambda: True,
        reminder_seconds: float = INCIDENT_REMINDER_SECONDS,
    ) -> None:
        self.retry_seconds = retry_seconds
        self.stats = stats
        self.spool_path = spool_path
        self.spool_empty = spool_empty
        self.reminder_seconds = reminder_seconds
        self.active = False
        self.reason = ""  # what the last failure said
        self.hint: str | None = None  # what the admin must do, if the last failure will not pass by itself
        self.write_failed = False  # in this incident
        self._started = 0.0
        self._last_log = 0.0
        self._retry_at = 0.0
        self._at_start: dict[str, int] = {}
        self._ending: asyncio.TimerHandle | None = None  # the end, once SETTLE_SECONDS have passed

    def should_try(self) -> bool:
        """Whether to wait on the database now (not within db_retry of a failure)."""
        return not self.active or time.monotonic() >= self._retry_at

    async def attempt(
        self, operation: Awaitable[T], timeout: float, kind: str, may_end: bool = True
    ) -> T | None:
        """Run a database operation for at most `timeout`; None if it failed or timed out.

        Shielded: a hung server must not hold the caller while a cancelled query waits
        for the server to acknowledge the cancel (asyncpg does); a write that commits
        after we stop waiting is harmless (its spooled copy is skipped on replay).
        `kind` is "write" or "read".  A success may end the incident (see succeeded),
        unless the operation began before the incident did (it raced the failure), or
        the caller ends it itself (`may_end` False: the writer, once it has counted).
        """
        started = time.monotonic()
        task = asyncio.ensure_future(operation)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(timeout):
                result = await asyncio.shield(task)
        except (StorageError, TimeoutError) as error:
            task.add_done_callback(_ignore_result)
            self.failed(error, kind)
            return None
        if may_end and self.active and started > self._started:
            self.succeeded(kind)
        return result

    def failed(self, error: BaseException, kind: str) -> None:
        now = time.monotonic()
        if self._ending is not None:
            self._ending.cancel()  # not settled: the same incident goes on
            self._ending = None
        self._retry_at = now + self.retry_seconds
        self.reason = describe_error(error)
        hint = error.hint if isinstance(error, StorageError) else None
        if hint != self.hint and self.active and hint is not None:
            self._last_log = now - self.reminder_seconds  # a new reason that needs the admin: say it now
        self.hint = hint
        self.stats.database_errors[kind] += 1
        if kind in {"write", "replay"}:
            self.write_failed = True
        if not self.active:
            self.active = True
            self._started = self._last_log = now
            self._at_start = self.stats.reading()
            log.error(
                "database unavailable: %s; %sdeciding from memory and keeping events in %s until it is back",
                self.reason,
                self._needs(),
                self.spool_path,
            )
        elif now - self._last_log >= self.reminder_seconds:
            self._last_log = now
            figures = self._figures()
            log.error(
                "database still unavailable after %.0fs (%s): %s%d requests decided from memory, "
                "%d answered with db_error_action, %d events spooled, %d dropped",
                now - self._started,
                self.reason,
                self._needs(),
                figures["decided_during_outage"],
                figures["answered_error_action"],
                figures["events_spooled"],
                figures["events_dropped"],
            )

    @property
    def permanent(self) -> bool:
        """The last failure will not pass by itself (see StorageError.hint)."""
        return self.hint is not None

    def _needs(self) -> str:
        return f"this will not pass by itself: {self.hint}; " if self.hint else ""

    def succeeded(self, kind: str) -> None:
        """A database operation worked: the end of the incident, if it proves enough.

        A write ends it once nothing waits in the spool (else the replay ends it, once
        caught up, with the count); a read only ends an incident in which no write failed;
        either way only after SETTLE_SECONDS without a failure.
        """
        if not self.active or not self.spool_empty():
            return
        if kind == "read" and self.write_failed:
            return
        if self._ending is None:
            self._ending = asyncio.get_running_loop().call_later(SETTLE_SECONDS, self._settled)

    def _settled(self) -> None:
        # Caught up once, and no failure since: over (new events behind it are normal).
        self._ending = None
        self.ended()

    def settle_now(self) -> None:
        """Stopping: an incident about to end ends now (its line is not lost)."""
        if self._ending is not None:
            self._ending.cancel()
            self._ending = None
            self.ended()

    def ended(self) -> None:
        if self._ending is not None:
            self._ending.cancel()
            self._ending = None
        if not self.active:
            return
        self.active = False
        self.write_failed = False
        self.hint = None
        figures = self._figures()
        log.warning(
            "database is back after %.1fs: %d events replayed from the spool, %d requests were "
            "decided from memory, %d answered with db_error_action, %d events dropped",
            time.monotonic() - self._started,
            figures["events_replayed"],
            figures["decided_during_outage"],
            figures["answered_error_action"],
            figures["events_dropped"],
        )

    def _figures(self) -> dict[str, int]:
        now = self.stats.reading()
        return {name: value - self._at_start.get(name, 0) for name, value in now.items()}
