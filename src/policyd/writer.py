"""Gets each counted event into the database, or into the spool when the database cannot
take it, before its answer goes out.

Events of concurrent requests share one transaction (group commit): while a batch is
being committed the next one gathers.  A request waits for its own event to be committed
or fsync'd in the spool (bounded: `db_timeout` plus a grace), so a crash of policyd
(kill -9) loses no answered event.  What the database cannot take goes to the spool
(spool.py) and is replayed in order, exactly once, when it is back; while the spool
holds anything, new events go behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from policyd.config import Settings
from policyd.logs import log
from policyd.outage import INCIDENT_REMINDER_SECONDS, Outage
from policyd.spool import Spool, SpoolFull
from policyd.stats import Stats
from policyd.storage import Event, Storage, StorageError

# Events written in one transaction at most; more wait for the next one.
MAX_BATCH_EVENTS = 500
# Batches being written at once: the next one starts while the last commits (its trip to
# the database and back is then off the answers' path), not more (they would only queue
# in the database).
BATCHES_IN_FLIGHT = 2
# How much longer than db_timeout a request waits for its event to reach the spool.
WRITE_GRACE_SECONDS = 1.0
# How often what was committed is made durable against a power cut (storage.sync_to_disk):
# a power cut loses at most this much of the latest events (SQLite; servers decide alone).
SYNC_INTERVAL_SECONDS = 1.0


class _Queued:
    """An event waiting to be written, and who to tell (None once told)."""

    __slots__ = ("arrived", "done", "event")

    def __init__(self, event: Event, done: Callable[[], None], arrived: float) -> None:
        self.event = event
        self.done: Callable[[], None] | None = done
        self.arrived = arrived  # loop time


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
    ) -> None:
        self.storage = storage
        self.spool = spool
        self.outage = outage
        self.stats = stats
        self.settings = settings
        self.origin = origin  # written with every row: the tail skips its own daemon's
        self._replayed = 0  # since the spool last emptied
        self._last_drop_log = -INCIDENT_REMINDER_SECONDS
        self._loop = asyncio.get_running_loop()  # made by the daemon, inside its loop
        self._pending: list[_Queued] = []
        self._late_check_due = False  # a timer will look at the queue for late requests
        self._wakeup = asyncio.Event()
        self._replay_wakeup = asyncio.Event()
        self._spool_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def open_spool(self) -> list[Event]:
        """Open the spool; returns the events a previous run left there (not in the
        database yet, as far as the spool knows)."""
        try:
            events, problems = await asyncio.to_thread(self.spool.open)
        except OSError as error:
            # Not fatal: mail keeps flowing; only events the database refuses would be lost.
            log.error("spool: cannot open %s: %s", self.spool.path, error)
            events, problems = [], []
        for problem in problems:
            log.error("spool: %s", problem)
        if events:
            log.warning("spool: %d events from a previous run are waiting for the database", len(events))
        return events

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="policyd-writer"),
            asyncio.create_task(self._replay_loop(), name="policyd-replay"),
            asyncio.create_task(self._sync_loop(), name="policyd-sync-to-disk"),
        ]
        if self.spool.pending_bytes:
            self._replay_wakeup.set()

    def submit(self, event: Event, done: Callable[[], None]) -> None:
        """Queue the event; `done()` is called once it is in the database or the spool (or
        dropped), exactly once.

        Bounded: if even the spool is slow (a disk in trouble), `done()` is called
        `db_timeout` plus a grace after the event arrived, and the event stays queued.
        The bound is kept by one timer for the batch being written (see _release_late),
        not by a timer per event.
        """
        if self._closing:
            raise StorageError("shutting down, not accepting new events")
        self._pending.append(_Queued(event, done, self._loop.time()))
        if not self._wakeup.is_set():
            self._wakeup.set()

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

    async def _write_loop(self) -> None:
        in_flight: set[asyncio.Task[None]] = set()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                if len(in_flight) >= BATCHES_IN_FLIGHT:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                batch = self._pending[:MAX_BATCH_EVENTS]
                del self._pending[:MAX_BATCH_EVENTS]
                task = asyncio.create_task(self._write_and_release(batch))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
            if self._closing:
                if in_flight:
                    await asyncio.wait(in_flight)
                return

    async def _write_and_release(self, batch: list[_Queued]) -> None:
        watchdog = self._loop.call_at(batch[0].arrived + self._bound, self._release_late, batch)
        try:
            await self._write_batch([queued.event for queued in batch])
        except Exception:
            # A bug must not leave requests waiting forever or stop later writes.
            log.exception("writing %d events failed unexpectedly", len(batch))
        finally:
            watchdog.cancel()
            _release(batch)

    def _release_late(self, batch: list[_Queued]) -> None:
        """A batch being written is late: answer its requests, and those queued behind it
        that have waited the bound; look again when the next queued one will have."""
        _release(batch)
        now = self._loop.time()
        _release([queued for queued in self._pending if queued.arrived + self._bound <= now])
        waiting = [queued.arrived for queued in self._pending if queued.done is not None]
        if waiting and not self._late_check_due:
            self._late_check_due = True
            self._loop.call_at(min(waiting) + self._bound, self._check_queued)

    def _check_queued(self) -> None:
        self._late_check_due = False
        self._release_late([])

    async def _sync_loop(self) -> None:
        synced = 0
        while not self._closing:
            await asyncio.sleep(SYNC_INTERVAL_SECONDS)
            written = self.stats.events_written + self.stats.events_replayed
            if written == synced or self.outage.active:
                continue
            try:
                async with asyncio.timeout(SYNC_INTERVAL_SECONDS * 10):
                    await self.storage.sync_to_disk()
            except (StorageError, TimeoutError) as error:
                # Not an outage by itself: a write failing for the same reason will say so.
                log.debug("syncing the database to disk: %s", error)
                continue
            synced = written

    async def _write_batch(self, events: list[Event]) -> None:
        if self.spool.pending_bytes:
            # Behind a spool being replayed: wait for the replay's batch in progress, and
            # stay behind what is left of it, so the database gets every event in order.
            async with self._spool_lock:
                if self.spool.pending_bytes:
                    await self._append(events)
                    return
        if self.outage.should_try():
            written = await self.outage.attempt(
                self._add_events(events), self.settings.db_timeout, kind="write"
            )
            if written:
                self.stats.events_written += len(events)
                self.stats.write_batches += 1
                return
        async with self._spool_lock:
            await self._append(events)

    async def _add_events(self, events: list[Event]) -> bool:
        """add_events with a result, so that success is told apart from attempt()'s None."""
        await self.storage.add_events(events, self.origin)
        return True

    async def _append(self, events: list[Event]) -> None:
        """Append to the spool; the caller holds the spool lock."""
        try:
            await asyncio.to_thread(self.spool.append, events)
        except (SpoolFull, OSError) as error:
            self.stats.events_dropped += len(events)
            now = asyncio.get_running_loop().time()
            if now - self._last_drop_log >= INCIDENT_REMINDER_SECONDS:
                self._last_drop_log = now
                # The count of lost events is in the line that ends the outage.
                log.error("spool: %s; events are being lost until the database is back", error)
            return
        self.stats.events_spooled += len(events)
        self._replay_wakeup.set()

    async def _replay_loop(self) -> None:
        while True:
            await self._replay_wakeup.wait()
            self._replay_wakeup.clear()
            while self.spool.pending_bytes and not self._closing:
                if not self.outage.should_try():
                    await asyncio.sleep(min(self.outage.retry_seconds, 1.0))
                    continue
                try:
                    await self._replay_one_batch()
                except Exception:
                    # A damaged spool or a bug: say so, and try again later rather than die.
                    log.exception(
                        "spool: replay failed unexpectedly; retrying in %gs", self.outage.retry_seconds
                    )
                    await asyncio.sleep(self.outage.retry_seconds)
            if self._closing:
                return

    async def _replay_one_batch(self) -> None:
        # The lock is held from reading the batch to recording its offset: new events
        # wait (their requests are answered within the write bound anyway) and then go
        # behind the spool, or, once it is empty, straight to the database.  Without
        # this the replay could chase a steady load forever.
        async with self._spool_lock:
            batch = await asyncio.to_thread(self.spool.read_batch, MAX_BATCH_EVENTS)
            try:
                # The same bound as a live write: new events wait for this lock.  A batch
                # that commits after the timeout is harmless: replayed again, skipped.
                async with asyncio.timeout(self.settings.db_timeout):
                    await self.storage.add_events(batch.events, self.origin)
            except (StorageError, TimeoutError) as error:
                self.outage.failed(error, "replay")
                return
            await asyncio.to_thread(self.spool.commit, batch.end_offset)
            self.stats.events_replayed += len(batch.events)
            self._replayed += len(batch.events)
            if self.spool.pending_bytes:
                return
            if self.outage.active:
                self.outage.ended()
            else:
                log.warning("spool: replayed %d events", self._replayed)
            self._replayed = 0

    async def close(self, timeout: float) -> None:
        """Write what is queued (to the database or the spool), bounded by `timeout`."""
        self._closing = True
        self._wakeup.set()
        self._replay_wakeup.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if self._pending:
                log.error("shutdown: %d queued events could not be written in time", len(self._pending))
        if self.spool.pending_bytes:
            log.warning(
                "spool: %d bytes of events wait in %s for the next start",
                self.spool.pending_bytes,
                self.spool.path,
            )
