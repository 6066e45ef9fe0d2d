"""From a request to an answer: the decision plus the storage it needs.

This is the one place where the pure quota rules meet storage, and it owns what keeps
mail flowing when storage misbehaves:

- Every wait on the database is bounded (`db_timeout`).  After a failure the database
  is left alone for `db_retry` seconds, so requests are not each made to wait for it.
- While the database is unavailable, decisions continue from memory: each user's total
  as last computed, plus what this daemon counted since.  Only a user it knows nothing
  about gets `db_error_action`.
- No event is lost: what the database cannot take goes to the spool (spool.py) and is
  replayed, in order and exactly once, when it is back.
- One log line when an outage starts, a reminder while it lasts, one when it ends.

Writes from concurrent requests are grouped into one transaction (group commit).  Each
request waits for its own write (or its spool append) before Postfix gets the answer,
so once a user has been answered, every daemon sharing the database sees the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Iterable
from datetime import UTC, datetime
from typing import Any, TypeVar

from policyd.config import Settings
from policyd.logs import log
from policyd.protocol import PolicyRequest
from policyd.quota import (
    Message,
    Outcome,
    QuotaRules,
    Verdict,
    counted_outcomes,
    decide_quota,
    outcome_of_action,
    precheck,
)
from policyd.spool import Spool, SpoolFull
from policyd.storage import Event, Storage, StorageError

T = TypeVar("T")

# Events written in one transaction at most; more wait for the next one.
MAX_BATCH_EVENTS = 500
# While the database stays unavailable, a reminder this often (never a line per request).
INCIDENT_REMINDER_SECONDS = 60.0
# How much longer than db_timeout a request waits for its event to reach the spool.
WRITE_GRACE_SECONDS = 1.0
# Users whose totals are remembered for outages; the least recently seen are forgotten first.
MAX_KNOWN_USERS = 200_000


def utc_now() -> datetime:
    return datetime.now(UTC)


def describe_error(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class Outage:
    """Database health as the daemon sees it, and the log lines that go with it."""

    def __init__(self, retry_seconds: float, reminder_seconds: float = INCIDENT_REMINDER_SECONDS) -> None:
        self.retry_seconds = retry_seconds
        self.reminder_seconds = reminder_seconds
        self.active = False
        self.decided_from_memory = 0
        self.answered_error_action = 0
        self.spooled = 0
        self.dropped = 0
        self._started = 0.0
        self._last_log = 0.0
        self._retry_at = 0.0

    def should_try(self) -> bool:
        """Whether a request should wait on the database now."""
        return not self.active or time.monotonic() >= self._retry_at

    async def attempt(self, operation: Coroutine[Any, Any, T], timeout: float, spool_path: str) -> T | None:
        """Run a database operation for at most `timeout`; None if it failed or timed out.

        Shielded: a hung server must not hold the answer while a cancelled query waits
        for the server to acknowledge the cancel (asyncpg does), and a write that commits
        after we stop waiting is harmless (its spooled copy is skipped on replay).  A
        success ends an outage only if it began after the outage did (an earlier one
        raced the failure) and nothing was spooled (then the replay ends it, once caught
        up, with the count).
        """
        started = time.monotonic()
        task = asyncio.ensure_future(operation)
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(timeout):
                result = await asyncio.shield(task)
        except (StorageError, TimeoutError) as error:
            task.add_done_callback(_ignore_result)
            self.failed(error, spool_path)
            return None
        if self.active and started > self._started and self.spooled == 0:
            self.ended(replayed=0)
        return result

    def failed(self, error: BaseException, spool_path: str) -> None:
        now = time.monotonic()
        self._retry_at = now + self.retry_seconds
        if not self.active:
            self.active = True
            self._started = self._last_log = now
            self.decided_from_memory = self.answered_error_action = self.spooled = self.dropped = 0
            log.error(
                "database unavailable: %s; deciding from memory and keeping events in %s until it is back",
                describe_error(error),
                spool_path,
            )
        elif now - self._last_log >= self.reminder_seconds:
            self._last_log = now
            log.error(
                "database still unavailable after %.0fs (%s): %d requests decided from memory, "
                "%d answered with db_error_action, %d events spooled, %d dropped",
                now - self._started,
                describe_error(error),
                self.decided_from_memory,
                self.answered_error_action,
                self.spooled,
                self.dropped,
            )

    def ended(self, replayed: int) -> None:
        if self.active:
            self.active = False
            log.warning(
                "database is back after %.1fs: %d events replayed from the spool, %d requests were "
                "decided from memory, %d answered with db_error_action, %d events dropped",
                time.monotonic() - self._started,
                replayed,
                self.decided_from_memory,
                self.answered_error_action,
                self.dropped,
            )


class KnownTotals:
    """Each user's recipients in the window as last computed, for deciding during outages.

    A total only grows while the database is away (old events cannot be expired without
    it), so an outage errs on the side of holding a busy user a little early.
    """

    def __init__(self, max_users: int = MAX_KNOWN_USERS) -> None:
        self.max_users = max_users
        self._totals: OrderedDict[str, int] = OrderedDict()

    def get(self, user: str) -> int | None:
        return self._totals.get(user)

    def set(self, user: str, total: int) -> None:
        self._totals[user] = total
        self._totals.move_to_end(user)
        if len(self._totals) > self.max_users:
            self._totals.popitem(last=False)


class EventWriter:
    """Gets each event into the database, or into the spool when the database cannot take it.

    One task writes batches (group commit); another replays the spool when the database
    is back.  While the spool holds anything, new events are appended behind it, so the
    database receives every event in order.
    """

    def __init__(self, storage: Storage, spool: Spool, outage: Outage, settings: Settings) -> None:
        self.storage = storage
        self.spool = spool
        self.outage = outage
        self.settings = settings
        # Counted recipients per user that are in the spool, not yet in the database:
        # added to what the database says, so a replay in progress hides nothing.
        self.spooled_recipients: Counter[str] = Counter()
        self.replayed = 0
        self._last_drop_log = -INCIDENT_REMINDER_SECONDS
        self._pending: list[tuple[Event, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._replay_wakeup = asyncio.Event()
        self._spool_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def start(self) -> None:
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
            self._track(events, +1)
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="policyd-writer"),
            asyncio.create_task(self._replay_loop(), name="policyd-replay"),
        ]
        if events:
            self._replay_wakeup.set()

    def _track(self, events: Iterable[Event], sign: int) -> None:
        counted = counted_outcomes(self.settings.rules)
        for event in events:
            if event.outcome in counted:
                self.spooled_recipients[event.sasl_username] += sign * event.recipient_count
                if self.spooled_recipients[event.sasl_username] <= 0:
                    del self.spooled_recipients[event.sasl_username]

    async def write(self, event: Event) -> None:
        """Queue the event; return once it is in the database or the spool (or dropped).

        The wait is bounded: if even the spool is slow (a disk in trouble), the answer goes
        out anyway and the event stays queued.
        """
        if self._closing:
            raise StorageError("shutting down, not accepting new events")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        self._wakeup.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.settings.db_timeout + WRITE_GRACE_SECONDS):
                await asyncio.shield(future)

    async def _write_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[:MAX_BATCH_EVENTS]
                del self._pending[:MAX_BATCH_EVENTS]
                try:
                    await self._write_batch([event for event, _ in batch])
                except Exception:
                    # A bug must not leave requests waiting forever or stop later writes.
                    log.exception("writing %d events failed unexpectedly", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_result(None)
            if self._closing:
                return

    async def _write_batch(self, events: list[Event]) -> None:
        if self.spool.pending_bytes:
            # Behind a spool being replayed: wait for the replay's batch in progress, and
            # stay behind what is left of it, so the database gets every event in order.
            async with self._spool_lock:
                if self.spool.pending_bytes:
                    await self._append(events)
                    return
        if self.outage.should_try() and await self._write_to_database(events):
            return
        async with self._spool_lock:
            await self._append(events)

    async def _write_to_database(self, events: list[Event]) -> bool:
        written = await self.outage.attempt(
            self._add_events(events), self.settings.db_timeout, str(self.spool.path)
        )
        return written is not None

    async def _add_events(self, events: list[Event]) -> bool:
        """add_events with a result, so that success is told apart from attempt()'s None."""
        await self.storage.add_events(events)
        return True

    async def _append(self, events: list[Event]) -> None:
        """Append to the spool; the caller holds the spool lock."""
        try:
            await asyncio.to_thread(self.spool.append, events)
        except (SpoolFull, OSError) as error:
            self.outage.dropped += len(events)
            now = time.monotonic()
            if now - self._last_drop_log >= INCIDENT_REMINDER_SECONDS:
                self._last_drop_log = now
                # The count of lost events is in the line that ends the outage.
                log.error("spool: %s; events are being lost until the database is back", error)
            return
        self.outage.spooled += len(events)
        self._track(events, +1)
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
                    await self.storage.add_events(batch.events)
            except (StorageError, TimeoutError) as error:
                self.outage.failed(error, str(self.spool.path))
                return
            await asyncio.to_thread(self.spool.commit, batch.end_offset)
            self._track(batch.events, -1)
            self.replayed += len(batch.events)
            if self.spool.pending_bytes:
                return
            if self.outage.active:
                self.outage.ended(self.replayed)
            else:
                log.warning("spool: replayed %d events", self.replayed)
            self.replayed = 0

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


class Accountant:
    """Decides each request and records what it counted."""

    def __init__(self, storage: Storage, settings: Settings, clock: Callable[[], datetime] = utc_now) -> None:
        self.storage = storage
        self.settings = settings
        self.clock = clock
        self.outage = Outage(settings.db_retry)
        self.known = KnownTotals()
        self.writer = EventWriter(
            storage, Spool(settings.spool, settings.spool_max_size), self.outage, settings
        )
        self.decisions: Counter[str] = Counter()

    async def start(self) -> None:
        await self.writer.start()

    async def close(self) -> None:
        await self.writer.close(timeout=max(5.0, self.settings.db_timeout))

    def reload(self, settings: Settings) -> None:
        self.settings = self.writer.settings = settings
        self.outage.retry_seconds = settings.db_retry

    async def decide(self, request: PolicyRequest) -> str:
        """The action to answer.  Raises RequestValueError on a request Postfix would not send."""
        message = Message.from_request(request)
        settings = self.settings  # one consistent snapshot, even if a reload happens meanwhile
        now = self.clock()
        verdict = precheck(settings.rules, message, now.astimezone())
        if verdict is None:
            verdict = await self._count(message, settings, now)
        elif verdict.reason in {"blacklisted", "whitelisted"}:
            log.info(
                "%s %s user : %s/%s/%s/%d",
                verdict.outcome.value,
                "Whitelisted" if verdict.reason == "whitelisted" else "blacklisted",
                message.sasl_username,
                message.sender,
                message.client_address,
                message.recipient_count,
            )
        self.decisions[verdict.outcome.value] += 1
        return verdict.action

    async def _recipients_before(
        self, user: str, rules: QuotaRules, settings: Settings, now: datetime
    ) -> int | None:
        """The user's counted recipients in the window before this message, or None if unknown."""
        if self.outage.should_try():
            in_database = await self.outage.attempt(
                self.storage.recipients_since(user, now - rules.window, counted_outcomes(rules)),
                settings.db_timeout,
                str(self.writer.spool.path),
            )
            if in_database is not None:
                return in_database + self.writer.spooled_recipients.get(user, 0)
        return self.known.get(user)

    async def _count(self, message: Message, settings: Settings, now: datetime) -> Verdict:
        rules = settings.rules
        user = message.sasl_username
        recipients_before = await self._recipients_before(user, rules, settings, now)
        if recipients_before is None:
            # Nothing known about this user and no database: the configured answer, but the
            # message is still recorded, so the user is known from now on.
            self.outage.answered_error_action += 1
            recipients_before = 0
            outcome = outcome_of_action(settings.db_error_action)
            verdict = Verdict(settings.db_error_action, outcome, record=True, reason="database unavailable")
            recipients_last_24h = message.recipient_count
        else:
            if self.outage.active:
                self.outage.decided_from_memory += 1
            recipients_last_24h = recipients_before + message.recipient_count
            verdict = decide_quota(rules, recipients_last_24h)
        counted = verdict.outcome in counted_outcomes(rules)
        self.known.set(user, recipients_last_24h if counted else recipients_before)
        await self.writer.write(
            Event(
                ts=now,
                sasl_username=user,
                sender=message.sender,
                client_address=message.client_address,
                recipient_count=message.recipient_count,
                outcome=verdict.outcome,
            )
        )
        self._log_counted(message, verdict, recipients_last_24h, rules)
        return verdict

    @staticmethod
    def _log_counted(message: Message, verdict: Verdict, total: int, rules: QuotaRules) -> None:
        # go-policyd's lines, word for word, so existing grep and monit rules keep working.
        log.info(
            "Updating db: %s/%s/%s/%d/%d",
            message.sasl_username,
            message.sender,
            message.client_address,
            message.recipient_count,
            total,
        )
        if verdict.outcome is Outcome.HOLD:
            log.info(
                "DEFERRING overquota (%d>%d) for user %s using %s from ip [%s]",
                total,
                rules.quota,
                message.sasl_username,
                message.sender,
                message.client_address,
            )
        elif verdict.outcome is Outcome.REJECT:
            log.info(
                "REJECTING overquota (%d>%d) for user %s using %s from ip [%s]",
                total,
                rules.reject_quota,
                message.sasl_username,
                message.sender,
                message.client_address,
            )
