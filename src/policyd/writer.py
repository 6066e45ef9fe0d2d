"""Gets every counted event onto local disk before its answer goes out, and into the
database behind it.

Two tasks, each with a thread of its own for the files:

- The journal: events submitted while it was busy are appended to the spool in one
  write (spool.py), then their answers go out.  That is the promise: an answered event
  is on disk (fsync'd within a second), so a crash of policyd loses none.  The write is
  made from the event loop itself, as Redis writes its append-only file: a write to the
  page cache takes microseconds, a round trip to a thread about 60 µs of CPU.  What may
  block (the fsync each second, a new segment) runs in the journal's thread, and appends
  wait behind it there meanwhile; an append that was slow all the same (a disk in
  trouble) sends them all there for a minute, so the loop goes on answering.
- The database: reads the spool in order, from where it has got to, and writes batches
  of up to MAX_BATCH_EVENTS in one transaction each.  Nothing of it is on the answers'
  path: a slow or stopped database only makes the spool grow, up to spool_max_size.

When the spool cannot take an event (full, or its disk is), the answer waits for the
database instead, bounded by `db_timeout` plus a grace; when neither can, the event is
dropped, and counted (the outage's end line says how many).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from policyd.clock import from_ms, to_ms
from policyd.config import Settings
from policyd.logs import log
from policyd.outage import INCIDENT_REMINDER_SECONDS, Outage
from policyd.permissions import hint_for
from policyd.quota import Outcome
from policyd.spool import Opened, Position, Spool, SpoolFull, encode_event
from policyd.stats import Stats
from policyd.storage import DatabaseReplaced, Event, SchemaMissing, Storage, StorageError
from policyd.worker import WorkerThread

# Events written to the database in one transaction at most.
MAX_BATCH_EVENTS = 500
# Events just spooled kept in memory for the database at most (about 500 bytes each: at
# most 5 MB); past that (an outage, a database a second or more behind) the backlog is
# read back from the spool.  50,000 could hold 25 MB whenever the database lagged.
MAX_FRESH_EVENTS = 10_000
# How much longer than db_timeout a request waits for its event to be recorded.
WRITE_GRACE_SECONDS = 1.0
# A missing table is made again at most this often (a migration that does not stick, a
# table dropped again and again: the outage says so meanwhile).
MIGRATE_AGAIN_SECONDS = 10.0
# How often the spool is fsync'd (and the database's position in it saved), and the
# database made durable against a power cut (storage.sync_to_disk, for SQLite): a power
# cut loses at most this much of the latest events.
SYNC_INTERVAL_SECONDS = 1.0


# An append from the event loop slower than this (a disk in trouble) sends appends through
# the journal's thread for SLOW_APPEND_PAUSE_SECONDS.
SLOW_APPEND_SECONDS = 0.02
SLOW_APPEND_PAUSE_SECONDS = 60

T = TypeVar("T")


class _Queued:
    """An event waiting to be recorded, and who to tell (None once told)."""

    __slots__ = ("arrived", "committed", "done", "event")

    def __init__(self, event: Event, done: Callable[[], None], arrived: float, committed: bool) -> None:
        self.event = event
        self.done: Callable[[], None] | None = done
        self.arrived = arrived  # loop time
        self.committed = committed  # told once in the database, not once in the spool


def _release(queued: list[_Queued]) -> None:
    """Tell those waiting on these events (whatever became of them), each once."""
    for item in queued:
        done, item.done = item.done, None
        if done is not None:
            try:
                done()
            except Exception:
                log.exception("answering after a write failed unexpectedly")


class EventWriter:
    def __init__(
        self,
        *,
        storage: Storage,
        spool: Spool,
        outage: Outage,
        stats: Stats,
        settings: Settings,
        origin: str,
        held: Callable[[int], Iterable[tuple[str, int, int, Outcome]]] | None = None,
    ) -> None:
        self.storage = storage
        # The window's events (Window.held): what a database deleted under us is given back.
        self.held = held
        self.spool = spool
        self.outage = outage
        self.stats = stats
        self.settings = settings
        self.origin = origin  # written with every row: the tail skips its own daemon's
        self._loop = asyncio.get_running_loop()  # made by the daemon, inside its loop
        # One thread appends to the spool, another reads it for the database: an append
        # never waits behind a read.
        self._journal_thread = WorkerThread("policyd-spool-append")
        self._reader_thread = WorkerThread("policyd-spool-read")
        self._pending: list[_Queued] = []  # waiting for the journal
        self._unspooled: list[_Queued] = []  # the spool refused them: waiting for the database
        self._journal_busy = 0  # calls in the journal's thread under way
        self._quick_appends_from = 0.0  # loop time: appends from the loop again (_append_here)
        self._journal_wakeup = asyncio.Event()
        self._database_wakeup = asyncio.Event()
        self._spooled_to = spool.end  # the spool holds every event before this (loop's view)
        self._read_from = spool.done  # the database has every event before this
        # What was just spooled, still in memory, from where the database has got: written
        # from here rather than read back from the spool (a backlog is read back).
        self._fresh: deque[tuple[Position, Position, list[Event]]] = deque()
        self._fresh_events = 0
        # Spooled, answered once the database has them (the spool's position after each).
        self._after_commit: deque[tuple[Position, _Queued]] = deque()
        self._spool_ok = True
        self._last_loss_log = -INCIDENT_REMINDER_SECONDS
        self._late_check_due = False
        self._migrated_at = -MIGRATE_AGAIN_SECONDS  # monotonic (see _add_events)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self.caught_up = asyncio.Event()  # the database has everything spooled so far

    @property
    def queued(self) -> int:
        return len(self._pending) + len(self._unspooled)

    def caught_up_now(self) -> bool:
        """The database has every event spooled so far, and none waits outside the spool."""
        return not self._unspooled and self._read_from >= self._spooled_to

    @property
    def spool_ok(self) -> bool:
        """The spool takes events (false after it refused some: full, or unwritable)."""
        return self._spool_ok

    @property
    def backlog_bytes(self) -> int:
        """Bytes of events in the spool the database does not have yet."""
        return self.spool.pending_bytes

    async def open_spool(self) -> list[Event]:
        """Open the spool (raises SpoolLocked when another daemon has it); returns the events
        a previous run left there, not in the database yet as far as the spool knows."""
        try:
            opened = await self._in_journal_thread(self.spool.open)
        except OSError as error:
            # Not fatal: mail keeps flowing; answers then wait for the database.
            hint = hint_for(error, str(self.spool.path))
            log.error(
                "spool: cannot open %s: %s; %sanswers wait for the database",
                self.spool.path,
                error,
                f"this will not pass by itself: {hint}; " if hint else "",
            )
            self._spool_ok = False
            opened = Opened()
        for problem in opened.problems:
            log.error("spool: %s", problem)
        if opened.events:
            log.warning(
                "spool: %d events from a previous run are waiting for the database", len(opened.events)
            )
        self.stats.spool_damaged += opened.damaged
        self._spooled_to = self.spool.end
        self._read_from = self.spool.done
        return opened.events

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._journal_loop(), name="policyd-journal"),
            asyncio.create_task(self._database_loop(), name="policyd-database-writer"),
            asyncio.create_task(self._sync_loop(), name="policyd-sync-to-disk"),
        ]
        self._database_wakeup.set()

    # -- taking events -------------------------------------------------------------

    def submit(self, event: Event, done: Callable[[], None], committed: bool = False) -> None:
        """Queue the event; `done()` is called once it is in the spool (or, when the spool
        cannot take it, in the database, or dropped), exactly once.  With `committed`,
        once it is in the database (the decider's strict path: other daemons then see it
        before this one answers, as each decision of theirs reads the database first).

        Bounded: `done()` is called at the latest `db_timeout` plus a grace after the
        event arrived, whatever the disks are doing (see _release_late); the event stays
        queued.
        """
        if self._closing:
            raise StorageError("shutting down, not accepting new events")
        self._pending.append(_Queued(event, done, self._loop.time(), committed))
        if not self._journal_wakeup.is_set():
            self._journal_wakeup.set()

    async def write(self, event: Event) -> None:
        """submit(), awaited."""
        future: asyncio.Future[None] = self._loop.create_future()

        def done() -> None:
            if not future.done():
                future.set_result(None)

        self.submit(event, done)
        await future

    @property
    def _bound(self) -> float:
        return self.settings.db_timeout + WRITE_GRACE_SECONDS

    # -- the journal -----------------------------------------------------------------

    async def _journal_loop(self) -> None:
        while True:
            await self._journal_wakeup.wait()
            self._journal_wakeup.clear()
            while self._pending:
                batch, self._pending = self._pending, []
                watchdog = self._loop.call_at(batch[0].arrived + self._bound, self._release_late, batch)
                try:
                    await self._journal(batch)
                except Exception:
                    # A bug must not leave requests waiting forever or stop later writes.
                    log.exception("spooling %d events failed unexpectedly", len(batch))
                    _release(batch)
                finally:
                    watchdog.cancel()
            if self._closing:
                return

    async def _journal(self, batch: list[_Queued]) -> None:
        events = [queued.event for queued in batch]
        records = [encode_event(event) for event in events]
        try:
            appended = self._append_here(records)
            if appended is None:
                appended = await self._in_journal_thread(self.spool.append_records, records)
        except (SpoolFull, OSError) as error:
            self._spool_refused(error, batch)
            return
        end, taken = appended
        self.stats.events_spooled += taken
        if not self._spool_ok:
            self._spool_ok = True
            log.warning("spool: %s takes events again", self.spool.path)
        start, self._spooled_to = self._spooled_to, end
        contiguous = (self._fresh and self._fresh[-1][1] == start) or self._read_from == start
        if contiguous and self._fresh_events + taken <= MAX_FRESH_EVENTS:
            self._fresh.append((start, end, events[:taken]))
            self._fresh_events += taken
        else:
            self._fresh.clear()  # too far behind: the backlog is read back from the spool
            self._fresh_events = 0
        self.caught_up.clear()
        spooled = batch[:taken]
        # On disk: the answers may go out, but those waiting for the database.
        _release([queued for queued in spooled if not queued.committed])
        for queued in spooled:
            if queued.committed:
                self._after_commit.append((end, queued))
                # In the spool already: a database slower than db_timeout is not waited
                # for (the others' strict reads may then miss it, as in an outage).
                self._loop.call_at(queued.arrived + self.settings.db_timeout, _release, [queued])
        if not self._database_wakeup.is_set():
            self._database_wakeup.set()
        if taken < len(batch):
            self._spool_refused(
                SpoolFull(f"{self.spool.path} would exceed its limit of {self.spool.max_bytes} bytes"),
                batch[taken:],
            )

    def _append_here(self, records: list[bytes]) -> tuple[Position, int] | None:
        """Append from the event loop, if that is one quick write: nothing else is using
        the spool's file meanwhile, no append was slow lately, no new segment is due.
        None: the journal's thread must do it."""
        if self._journal_busy or self._loop.time() < self._quick_appends_from:
            return None
        started = time.monotonic()
        appended = self.spool.append_quick(records)
        took = time.monotonic() - started
        if took > SLOW_APPEND_SECONDS:
            # The disk is struggling: from a thread for a while, so the loop keeps answering.
            self._quick_appends_from = self._loop.time() + SLOW_APPEND_PAUSE_SECONDS
            log.warning(
                "spool: appending to %s took %d ms; appending from a thread for the next %d s",
                self.spool.path,
                took * 1000,
                SLOW_APPEND_PAUSE_SECONDS,
            )
        return appended

    async def _in_journal_thread(self, function: Callable[..., T], *args: Any) -> T:
        """function(*args) in the journal's thread; meanwhile appends queue behind it."""
        self._journal_busy += 1
        try:
            return await self._journal_thread.call(function, *args)
        finally:
            self._journal_busy -= 1

    def _spool_refused(self, error: BaseException, batch: list[_Queued]) -> None:
        """The spool cannot take these: their answers wait for the database instead, or,
        if the database is known to be down too, they are lost (and counted) at once."""
        now = self._loop.time()
        lost = self.outage.active and not self.outage.should_try()
        if self._spool_ok or now - self._last_loss_log >= INCIDENT_REMINDER_SECONDS:
            self._last_loss_log = now
            if lost:
                # The count of lost events is in the line that ends the outage.
                log.error("spool: %s; events are being lost until the database is back", error)
            else:
                log.error(
                    "spool: %s; answers wait for the database until the spool takes events again", error
                )
        self._spool_ok = False
        if lost:
            self.stats.events_dropped += len(batch)
            _release(batch)
            return
        self._unspooled.extend(batch)
        self._database_wakeup.set()

    def _release_late(self, batch: list[_Queued]) -> None:
        """A batch is late (a disk in trouble): answer its requests, and those queued behind
        it that have waited the bound; look again when the next queued one will have."""
        _release(batch)
        now = self._loop.time()
        queues = (self._pending, self._unspooled)
        _release([queued for queue in queues for queued in queue if queued.arrived + self._bound <= now])
        waiting = [queued.arrived for queue in queues for queued in queue if queued.done is not None]
        if waiting and not self._late_check_due:
            self._late_check_due = True
            self._loop.call_at(min(waiting) + self._bound, self._check_queued)

    def _check_queued(self) -> None:
        self._late_check_due = False
        self._release_late([])

    # -- the database ------------------------------------------------------------------

    async def _database_loop(self) -> None:
        while True:
            if self.caught_up_now():
                self.caught_up.set()
                self.outage.succeeded("write")  # the backlog, if any, is in: an outage ends
                if self._closing:
                    return
                self._database_wakeup.clear()
                await self._database_wakeup.wait()
                continue
            if not self.outage.should_try() and not self._closing:
                await asyncio.sleep(min(self.outage.retry_seconds, 0.2))
                continue
            try:
                if self._unspooled:
                    await self._write_unspooled()
                elif not await self._write_spooled() and self._closing:
                    return  # stopping, and the database still fails: it waits in the spool
            except Exception:
                # A bug: say so, and try again later rather than die.
                log.exception(
                    "writing to the database failed unexpectedly; retrying in %gs", self.outage.retry_seconds
                )
                await asyncio.sleep(self.outage.retry_seconds)

    async def _write_spooled(self) -> bool:
        """The next batch from the spool into the database; False if the database failed."""
        events, end, taken = self._from_memory()
        if not taken:
            # Behind what is in memory: read it back (up to where memory starts).
            stop = self._fresh[0][0] if self._fresh else self._spooled_to
            batch = await self._reader_thread.call(self.spool.read, self._read_from, MAX_BATCH_EVENTS, stop)
            events, end = batch.events, batch.end
        backlog = self.outage.active  # written now, these are the outage's replayed events
        if events and not await self._add(events):
            return False  # the outage is told; the same batch again once db_retry has passed
        for _ in range(taken):
            _, _, written = self._fresh.popleft()
            self._fresh_events -= len(written)
        self._read_from = end
        while self._after_commit and self._after_commit[0][0] <= end:
            _release([self._after_commit.popleft()[1]])
        if self.spool.commit(end):
            await self._reader_thread.call(self.spool.delete_finished)
        self.stats.events_written += len(events)
        if backlog:
            self.stats.events_replayed += len(events)
        return True

    def _from_memory(self) -> tuple[list[Event], Position, int]:
        """The next events to write, if memory has them from where the database has got:
        (events, where they end, how many spooled batches they are)."""
        fresh = self._fresh
        if not fresh or fresh[0][0] != self._read_from:
            return [], self._read_from, 0
        events: list[Event] = []
        end = self._read_from
        taken = 0
        for _, batch_end, batch in fresh:
            if events and len(events) + len(batch) > MAX_BATCH_EVENTS:
                break
            events.extend(batch)
            end = batch_end
            taken += 1
        return events, end, taken

    async def _write_unspooled(self) -> None:
        batch = self._unspooled[:MAX_BATCH_EVENTS]
        if await self._add([queued.event for queued in batch]):
            self.stats.events_written += len(batch)
        else:
            # Neither the spool nor the database: lost, and counted.
            self.stats.events_dropped += len(batch)
        del self._unspooled[: len(batch)]
        _release(batch)

    async def _add(self, events: list[Event]) -> bool:
        # The writer ends an outage itself, once caught up and counted (_database_loop).
        started = time.monotonic()
        written = await self.outage.attempt(
            self._add_events(events), self.settings.db_timeout, kind="write", may_end=False
        )
        if written:
            self.stats.write_batches += 1
            self.stats.write_seconds.observe(time.monotonic() - started)
            self.stats.write_batch_events.observe(len(events))
        return bool(written)

    async def _add_events(self, events: list[Event]) -> bool:
        """add_events with a result, so that success is told apart from attempt()'s None.

        A table dropped (or a database re-created) under the daemon is made again, and
        the batch written into it: what the daemon holds is not lost with the table."""
        try:
            await self.storage.add_events(events, self.origin)
        except DatabaseReplaced as error:
            await self._reopen(error, events)
        except SchemaMissing as error:
            now = time.monotonic()
            if not self.settings.auto_migrate or now < self._migrated_at + MIGRATE_AGAIN_SECONDS:
                raise  # auto_migrate = no: the admin creates it (`policyd migrate`)
            self._migrated_at = now
            log.error("%s; creating the table again (was it dropped, or the database re-created?)", error)
            for step in await self.storage.migrate():
                log.info("schema: %s", step)
            await self.storage.add_events(events, self.origin)
        return True

    async def _reopen(self, error: DatabaseReplaced, events: list[Event]) -> None:
        """The file at the database's path, made anew if it was deleted, with what the
        window holds from before `events` (the oldest not written yet) in it."""
        await self.storage.reopen()
        for step in await self.storage.migrate():
            log.info("schema: %s", step)
        given_back: list[Event] = []
        if error.deleted and self.held is not None:
            given_back = [
                Event(from_ms(at), user, "", "", recipients, outcome)
                for user, at, recipients, outcome in self.held(to_ms(events[0].ts))
            ]
        log.error(
            "%s; %s",
            error,
            f"a new one is made with the {len(given_back)} events of the window the daemon holds "
            "(without their senders and client addresses, which it does not keep)"
            if error.deleted
            else "using the file now there (the window keeps counting what it holds)",
        )
        for first in range(0, len(given_back), MAX_BATCH_EVENTS):
            await self.storage.add_events(given_back[first : first + MAX_BATCH_EVENTS], self.origin)
        await self.storage.add_events(events, self.origin)

    # -- durability --------------------------------------------------------------------

    async def _sync_loop(self) -> None:
        written = 0
        while not self._closing:
            await asyncio.sleep(SYNC_INTERVAL_SECONDS)
            try:
                await self._in_journal_thread(self.spool.sync)
            except OSError as error:
                log.debug("syncing the spool: %s", error)
            # During an outage too: while the spool is replayed (the outage lasts until it
            # is), and when the write-ahead log itself filled the disk, a checkpoint is
            # what lets SQLite reuse it.
            if self.stats.events_written == written and not self.outage.active:
                continue
            try:
                async with asyncio.timeout(SYNC_INTERVAL_SECONDS * 10):
                    await self.storage.sync_to_disk()
            except (StorageError, TimeoutError) as error:
                # Not an outage by itself: a write failing for the same reason will say so.
                log.debug("syncing the database to disk: %s", error)
                continue
            written = self.stats.events_written

    # -- stopping ------------------------------------------------------------------------

    async def close(self, timeout: float) -> None:
        """Spool what is queued and let the database catch up, bounded by `timeout`; what
        the database did not get waits in the spool for the next start."""
        self._closing = True
        self._journal_wakeup.set()
        self._database_wakeup.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        if self._pending or self._unspooled:
            log.error("shutdown: %d queued events could not be recorded in time", self.queued)
        try:
            await self._in_journal_thread(self.spool.close)
        except OSError as error:
            log.error("spool: closing %s: %s", self.spool.path, error)
        if self.spool.pending_bytes:
            log.warning(
                "spool: %d bytes of events wait in %s for the next start",
                self.spool.pending_bytes,
                self.spool.path,
            )
        self._journal_thread.stop()
        self._reader_thread.stop()
