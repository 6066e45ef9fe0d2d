"""Keeps the window in step with the database: the bulk load at start, then the tail.

Every row carries the `origin` of the daemon run that wrote it, so a daemon reads back
only what others wrote (other relays, an earlier run of its own before a restart,
go-policyd): what it decided itself is in its window already.

The load at start reads, grouped by user in one query, the events of the longest window
up to a fence (the highest row id minus TAIL_OVERLAP_IDS rows' worth of ids); the tail
then reads every row after the fence one by one, every TAIL_INTERVAL_SECONDS.

Row ids are given at insert, not at commit: a transaction holding id 7 may become
visible after one holding id 8.  So the tail does not simply continue after the last id
it saw: it re-reads every row above the table's highest id of SETTLE_SECONDS ago, and
skips the ids it has already counted.  Nothing assumes ids are dense: on a Galera
cluster each node hands out every Nth id (auto_increment_increment = N, its own
offset), so ids have gaps and the nodes' rows interleave; the overlaps are counted in
rows (TAIL_OVERLAP_IDS times the storage's id_step ids).  A row that becomes visible
more than SETTLE_SECONDS after a higher one (a transaction stalled that long between insert and
commit) is not counted by daemons already running; they count it at their next start.
"""

from __future__ import annotations

import asyncio
import ctypes
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime, timedelta

from policyd.clock import from_ms, to_ms, utc_now
from policyd.decider import Decider
from policyd.logs import log
from policyd.outage import Outage, describe_error
from policyd.rules import RuntimeRules
from policyd.stats import Stats
from policyd.storage import SchemaMissing, Storage, StorageError
from policyd.storage.base import StoredRules
from policyd.window import OUTCOMES, Window

# How often the tail asks for new rows.  With writes taking a few ms, a message another
# relay accepted is counted here within about this plus a query (docs/shared-database.md).
TAIL_INTERVAL_SECONDS = 0.25
# Rows read one at a time by the first polls rather than in the bulk load: a transaction
# still in flight when the load ran is found by the tail once it commits.
TAIL_OVERLAP_IDS = 5000
# A row is still looked for this long after a higher id was seen.
SETTLE_SECONDS = 5.0
# Rows read per query; a poll goes on with the next batch for up to TAIL_BATCH_SECONDS.
TAIL_BATCH_ROWS = 10_000
TAIL_BATCH_SECONDS = 1.0
# One tail query at most (a query this slow counts as a database failure).
TAIL_QUERY_TIMEOUT_SECONDS = 5.0
# The bulk load is one query; bounded only so that a hung server cannot hold the start forever.
LOAD_TIMEOUT_SECONDS = 300.0
# Another daemon counts as active while rows of its this recent are being read by the
# tail (rows read at start are not a sign: they may be this daemon's previous run's).
OTHERS_ACTIVE_SECONDS = 600.0
# The table's highest id below what was read, for this long: it was re-created.
IDS_BACK_SECONDS = 2.0
# Right after the load, another daemon may be writing and not read yet: assume one is,
# for a few tail intervals.
OTHERS_UNKNOWN_SECONDS = 2.0
# How often users with nothing left in any window are dropped (and how many per pass).
EXPIRE_INTERVAL_SECONDS = 10.0
EXPIRE_BATCH_USERS = 50_000
# The rules tables (overrides, allow / block entries, resets) are checked with the tail,
# by one query of their largest ids and row counts, and read whole only when it changed:
# a change made by `policyd quota|allow|block|reset` applies within about this interval.
RULES_QUERY_TIMEOUT_SECONDS = 2.0
# Missing rules tables are said at most this often (the previous rules stay in use).
RULES_ERROR_LOG_SECONDS = 600.0


class WindowSync:
    def __init__(
        self,
        *,
        storage: Storage,
        window: Window,
        decider: Decider,
        outage: Outage,
        stats: Stats,
        origin: str,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.storage = storage
        self.window = window
        self.decider = decider
        self.outage = outage
        self.stats = stats
        self.origin = origin
        self.clock = clock
        self.loaded = asyncio.Event()
        # Every visible row up to `cursor` has been read; rows above `low` are read again
        # (they may have been joined by rows that committed late), `_seen` has their ids.
        self.cursor = 0
        self.low = 0
        self._seen: dict[int, None] = {}
        self._seen_sum = 0  # of the ids in _seen (see _read_new)
        self._marks: deque[tuple[float, int]] = deque()  # (monotonic time, cursor then)
        self._reading: tuple[asyncio.Future[bool], float] | None = None  # a read in progress
        # Other daemons by origin: when a recent row of theirs was last read (monotonic).
        self._origins: dict[str, float] = {}
        self._assume_others_until = 0.0  # monotonic; see OTHERS_UNKNOWN_SECONDS
        self._ids_back_since: float | None = None  # monotonic; see IDS_BACK_SECONDS
        self.on_reset: Callable[[str], None] | None = None  # a user reset (the alerts' incidents end)
        self.last_poll = 0.0  # monotonic time of the last successful poll
        # The rules tables as last read (their signature), the resets applied to the window.
        self.rules_signature: tuple[int, ...] | None = None
        self._resets_applied: set[int] = set()
        self._rules_error_logged = float("-inf")

    # -- the load ------------------------------------------------------------------

    async def load(self, own_rows: bool = False) -> None:
        """Fill the window from the database (raises StorageError or TimeoutError).

        `own_rows`: this run may have written rows already (the writer runs: the first
        load failed), which are in the window: leave them out, by a slower query.
        """
        started = time.monotonic()
        now = self.clock()
        async with asyncio.timeout(LOAD_TIMEOUT_SECONDS):
            top = await self.storage.max_event_id()
            fence = max(0, top - TAIL_OVERLAP_IDS * self.storage.id_step)
            since = now - timedelta(milliseconds=self.window.longest)
            histories = await self.storage.load_window(since, fence, self.origin if own_rows else None)
            adopted = self.decider.adopted
            known = (
                await self.storage.existing_event_ids([event.event_id for event in adopted], self.origin)
                if adopted
                else set()
            )
        now_ms = to_ms(now)
        events = 0
        users = len(histories)
        while histories:
            history = histories.pop()  # each user's lists freed as soon as they are in
            self.window.load(history.sasl_username, history.times, history.counts, history.codes, now_ms)
            events += len(history.times)
        give_back_freed_memory()
        # Spooled by an earlier run and also in the database (a write that committed
        # after it was given up on): counted from the database, so taken back here.
        taken_back = 0
        for event in adopted:
            if event.event_id in known and self.window.remove(
                event.sasl_username, to_ms(event.ts), event.recipient_count, event.outcome, now_ms
            ):
                taken_back += 1
        self.decider.adopted = []
        self.low = self.cursor = fence
        self._forget_seen()
        self._marks.clear()
        # The rows after the fence, one by one, before the window is declared complete.
        async with asyncio.timeout(LOAD_TIMEOUT_SECONDS):
            await self._read_new(bounded=False)
        await self.refresh_rules()
        self.decider.complete = True
        self._assume_others_until = time.monotonic() + OTHERS_UNKNOWN_SECONDS
        self.loaded.set()
        log.info(
            "window loaded in %.1fs: %d users, %d events of the last %s%s",
            time.monotonic() - started,
            users,
            events,
            _span_text(self.window.longest),
            f" ({taken_back} spooled events were in the database already)" if taken_back else "",
        )

    async def load_older(self, before_ms: int) -> None:
        """After a reload made the longest window longer: read the part not held (every
        origin: this daemon's own old events are no longer in the window either)."""
        now = self.clock()
        since = now - timedelta(milliseconds=self.window.longest)
        histories = await self.storage.load_window(
            since, await self.storage.max_event_id(), exclude_origin=None, before=from_ms(before_ms)
        )
        now_ms = to_ms(now)
        for history in histories:
            self.window.load(history.sasl_username, history.times, history.counts, history.codes, now_ms)

    # -- the rules -----------------------------------------------------------------

    async def refresh_rules(self) -> bool:
        """Read the rules tables if they changed, and apply them (new resets to the
        window); True if anything changed.  Either way the rules in use are kept.

        A database failure is left to the tail and the writer, which report the
        database's incidents (one line each, and its end): said here only at debug level,
        and tried again at the next tail.  Rules tables missing (not migrated) are said
        at most every RULES_ERROR_LOG_SECONDS."""
        try:
            async with asyncio.timeout(RULES_QUERY_TIMEOUT_SECONDS):
                read = await self._read_rules()
        except (StorageError, TimeoutError) as error:
            log.debug(
                "reading the rules tables failed (tried again with the tail): %s", describe_error(error)
            )
            return False
        if read is None:
            return False
        signature, stored = read
        if stored is None:
            return False
        runtime = RuntimeRules.build(stored.overrides, stored.entries, stored.resets)
        first = self.rules_signature is None
        self.rules_signature = signature
        self.decider.set_runtime(runtime)
        for reset in stored.resets:
            if reset.reset_id in self._resets_applied:
                continue
            self._resets_applied.add(reset.reset_id)
            forgotten = self.window.reset(reset.sasl_username, reset.before_ms)
            if self.on_reset is not None:
                self.on_reset(reset.sasl_username)
            if not first:
                log.info(
                    "reset of user %s applied: %d recipients forgotten (%s)",
                    reset.sasl_username,
                    forgotten,
                    reset.reason or "no reason given",
                )
        if runtime.overrides or runtime.entries or not first:
            log.info("rules %s: %s", "loaded" if first else "changed, applied", runtime.summary())
        return True

    async def _read_rules(self) -> tuple[tuple[int, ...], StoredRules | None] | None:
        """(signature, the tables' rows, or None if the signature is unchanged); None
        when the tables are missing."""
        try:
            signature = await self.storage.rules_signature()
            if signature == self.rules_signature:
                return signature, None
            return signature, await self.storage.load_rules(to_ms(self.clock()) - self.window.longest)
        except SchemaMissing as error:
            now = time.monotonic()
            if now - self._rules_error_logged >= RULES_ERROR_LOG_SECONDS:
                self._rules_error_logged = now
                log.warning(
                    "the rules tables cannot be read (%s); run `policyd migrate`. Keeping the rules in use",
                    describe_error(error),
                )
            return None

    # -- the tail ------------------------------------------------------------------

    async def poll(self) -> bool:
        """Read what others wrote since the last poll into the window; False if the
        database failed (the outage is told).  Each query is a bounded database attempt.

        Reads never overlap: a caller finding one in progress that began after it asked
        shares it, else waits for it and starts a fresh one (so that what was committed
        before the call is read).
        """
        asked = time.monotonic()
        while True:
            if self._reading is None:
                read = asyncio.ensure_future(self._read_new(bounded=True))
                self._reading = (read, time.monotonic())
                read.add_done_callback(self._read_done)
                return await asyncio.shield(read)
            running, started = self._reading
            if running.done():
                # Finished, its done-callback not run yet (that needs the loop; awaiting a
                # finished future does not yield): clear it here, or this loop would spin.
                self._read_done(running)
                if started >= asked:
                    return running.result()
                continue
            result = await asyncio.shield(running)
            if started >= asked:
                return result

    def _read_done(self, read: asyncio.Future[bool]) -> None:
        if self._reading is not None and self._reading[0] is read:
            self._reading = None
        if not read.cancelled():
            read.exception()  # retrieved: a waiter that gave up must not leave it unseen

    async def catch_up(self, timeout: float) -> bool:
        """Read the others' new rows now (the strict path of a decision), for at most
        `timeout`; False if that could not be done in time (decide from the window)."""
        if not self.loaded.is_set() or not self.outage.should_try():
            return False
        try:
            async with asyncio.timeout(timeout):
                return await self.poll()
        except TimeoutError:
            return False

    def others_active(self) -> int:
        """How many other daemons write to this database (recent rows of theirs read by
        the tail in the last OTHERS_ACTIVE_SECONDS; at least one just after the load)."""
        assumed = 1 if time.monotonic() < self._assume_others_until else 0
        if not self._origins:
            return assumed
        horizon = time.monotonic() - OTHERS_ACTIVE_SECONDS
        for origin in [origin for origin, seen in self._origins.items() if seen < horizon]:
            del self._origins[origin]
        return max(len(self._origins), assumed)

    async def _read_new(self, bounded: bool) -> bool:
        """The rows above `low` not counted yet, into the window.

        Bounded (the tail): each query through the outage, and at most about
        TAIL_BATCH_SECONDS of batches.  Not bounded (the load at start, before listening):
        until everything visible is read; errors raise.
        """
        started = time.monotonic()
        after = self.low
        seen = self._seen
        counted = 0
        if bounded and self.low < self.cursor:
            # What was read above `low` is read again only if the database has other rows
            # there now (committed late): parsing thousands of rows every poll to find none
            # would cost the answers a few ms each time.
            summary = await self.outage.attempt(
                self.storage.tail_summary(self.low, self.cursor, self.origin),
                TAIL_QUERY_TIMEOUT_SECONDS,
                kind="read",
            )
            if summary is None:
                return False
            if summary == (len(seen), self._seen_sum):
                after = self.cursor
            else:
                self.stats.tail_rereads += 1
        while True:
            query = self.storage.tail(after, self.origin, TAIL_BATCH_ROWS)
            if bounded:
                tail = await self.outage.attempt(query, TAIL_QUERY_TIMEOUT_SECONDS, kind="read")
                if tail is None:
                    return False
            else:
                tail = await query
            if tail.max_id < self.cursor:
                # Ids went back: the table was re-created, or its newest rows deleted (or
                # a node lags behind, for a moment).  Once it lasts, go on from its top:
                # what is there is counted already or, in a new table, the rows of the
                # last moment (not counted: never twice).
                now = time.monotonic()
                if self._ids_back_since is None:
                    self._ids_back_since = now
                if now - self._ids_back_since >= IDS_BACK_SECONDS:
                    log.warning(
                        "the events table's ids went back from %d to %d (re-created, or rows deleted?); "
                        "reading new rows from there",
                        self.cursor,
                        tail.max_id,
                    )
                    self.cursor = self.low = tail.max_id
                    self._marks.clear()
                    self._forget_seen()  # the new table's ids may be the old ones
                    self._ids_back_since = None
                break
            self._ids_back_since = None
            now_ms = to_ms(self.clock())
            recent = now_ms - int(OTHERS_ACTIVE_SECONDS * 1000)
            for row in tail.rows:
                if row.row_id in seen:
                    continue
                seen[row.row_id] = None
                self._seen_sum += row.row_id
                self.window.add(row.sasl_username, row.at, row.recipient_count, OUTCOMES[row.code], now_ms)
                counted += 1
                if bounded and row.at >= recent:
                    self._origins[row.origin] = time.monotonic()
            if len(tail.rows) < TAIL_BATCH_ROWS:
                self.cursor = max(self.cursor, tail.max_id)  # everything visible is read
                break
            after = tail.rows[-1].row_id
            self.cursor = max(self.cursor, after)
            if bounded and time.monotonic() - started > TAIL_BATCH_SECONDS:
                break  # far behind (a big spool replayed elsewhere): more next time
        self.stats.events_tailed += counted
        self._settle()
        self.last_poll = time.monotonic()
        return True

    def _settle(self) -> None:
        """Move `low` up to the cursor of SETTLE_SECONDS ago (never more than
        TAIL_OVERLAP_IDS rows' worth of ids below the cursor, never above it); forget ids
        at or below it."""
        now = time.monotonic()
        self._marks.append((now, self.cursor))
        low = max(self.low, self.cursor - TAIL_OVERLAP_IDS * self.storage.id_step)
        while self._marks and self._marks[0][0] <= now - SETTLE_SECONDS:
            low = max(low, self._marks.popleft()[1])
        low = min(low, self.cursor)
        if low > self.low:
            self.low = low
            for row_id in [row_id for row_id in self._seen if row_id <= low]:
                del self._seen[row_id]
                self._seen_sum -= row_id

    def _forget_seen(self) -> None:
        self._seen.clear()
        self._seen_sum = 0

    async def run(self) -> None:
        """Load (retrying until the database answers), then tail and expire, until cancelled."""
        while not self.loaded.is_set():
            if self.outage.should_try():
                try:
                    await self.load(own_rows=True)
                    self.outage.succeeded("read")
                    break
                except (StorageError, TimeoutError) as error:
                    self.outage.failed(error, "load")
            await asyncio.sleep(min(self.outage.retry_seconds, 1.0))
        next_expiry = time.monotonic() + EXPIRE_INTERVAL_SECONDS
        while True:
            await asyncio.sleep(TAIL_INTERVAL_SECONDS)
            if time.monotonic() >= next_expiry:
                next_expiry = time.monotonic() + EXPIRE_INTERVAL_SECONDS
                self.window.expire(to_ms(self.clock()), EXPIRE_BATCH_USERS)
            if not self.outage.should_try():
                continue
            try:
                await self.poll()
            except Exception:
                # A bug: say so, keep tailing (the window may lag; mail flows).
                log.exception("reading other daemons' events failed unexpectedly")
            if not self.outage.should_try():
                continue
            try:
                await self.refresh_rules()
            except Exception:
                log.exception("applying the rules tables failed unexpectedly")


def give_back_freed_memory() -> None:
    """Return to the system what the load freed (its lists of every event, read at
    once): glibc keeps freed memory for reuse otherwise, and the daemon's size would
    stay that of its start."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory stays reusable, that is all


def _span_text(milliseconds: int) -> str:
    hours = milliseconds / 3_600_000
    return f"{hours:g}h"
