"""From a request to an answer: the decision plus the storage it needs.

This is the one place where the pure quota rules meet storage.  It also owns what
keeps mail flowing when storage misbehaves: a bounded wait on the database, the
answer to give instead (`db_error_action`), and one log line per incident rather than
one per request.  Writes from concurrent requests are grouped into one transaction
(group commit); each request still waits for its own write before Postfix gets the
answer, so once a user has been answered, every daemon sharing the database sees it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from policyd.config import Settings
from policyd.logs import log
from policyd.protocol import PolicyRequest
from policyd.quota import Message, Outcome, Verdict, counted_outcomes, decide_quota, precheck
from policyd.storage import Event, Storage, StorageError

# Events written in one transaction at most; more wait for the next one.
MAX_BATCH_EVENTS = 500
# While the database stays broken, a reminder this often (never a line per request).
INCIDENT_REMINDER_SECONDS = 60.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class StorageIncident:
    """Turns a stream of storage failures into three kinds of log line: start, reminder, end."""

    def __init__(self, reminder_seconds: float = INCIDENT_REMINDER_SECONDS) -> None:
        self.reminder_seconds = reminder_seconds
        self.active = False
        self.failures = 0
        self.total_incidents = 0
        self._started = 0.0
        self._last_log = 0.0

    def failed(self, error: BaseException, answered: str) -> None:
        now = time.monotonic()
        self.failures += 1
        reason = describe_error(error)
        if not self.active:
            self.active = True
            self.total_incidents += 1
            self._started = self._last_log = now
            log.error(
                "database error: %s; answering %r where a decision needs it, until it recovers",
                reason,
                answered,
            )
        elif now - self._last_log >= self.reminder_seconds:
            self._last_log = now
            log.error(
                "database still failing for %.0fs: %d requests affected so far; last error: %s",
                now - self._started,
                self.failures,
                reason,
            )

    def succeeded(self) -> None:
        if self.active:
            log.warning(
                "database recovered after %.1fs; %d requests were affected",
                time.monotonic() - self._started,
                self.failures,
            )
            self.active = False
            self.failures = 0


def describe_error(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__


class BatchWriter:
    """Group commit: events queued while a transaction runs go into the next one."""

    def __init__(self, storage: Storage, max_batch: int = MAX_BATCH_EVENTS) -> None:
        self.storage = storage
        self.max_batch = max_batch
        self._pending: list[tuple[Event, asyncio.Future[None]]] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="policyd-writer")

    async def write(self, event: Event, timeout: float) -> None:
        """Queue the event and wait (at most `timeout`) until it is committed."""
        if self._closing:
            raise StorageError("shutting down, not accepting new events")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        self._wakeup.set()
        # shield: a request that gives up waiting must not cancel the shared transaction.
        await asyncio.wait_for(asyncio.shield(future), timeout)

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                try:
                    await self.storage.add_events([event for event, _ in batch])
                except Exception as error:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                            future.exception()  # retrieved: the waiter may have timed out
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
            if self._closing:
                return

    async def close(self, timeout: float) -> None:
        """Write what is queued (bounded by `timeout`), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout)
            except TimeoutError:
                log.error("shutdown: %d queued events could not be written in time", len(self._pending))


class Accountant:
    """Decides each request and records what it counted."""

    def __init__(self, storage: Storage, settings: Settings, clock: Callable[[], datetime] = utc_now) -> None:
        self.storage = storage
        self.settings = settings
        self.clock = clock
        self.incident = StorageIncident()
        self.writer = BatchWriter(storage)
        self.decisions: dict[str, int] = {outcome.value: 0 for outcome in Outcome}

    async def start(self) -> None:
        self.writer.start()

    async def close(self) -> None:
        await self.writer.close(timeout=max(5.0, self.settings.db_timeout))

    async def decide(self, request: PolicyRequest) -> str:
        """The action to answer.  Raises RequestValueError on a request Postfix would not send."""
        message = Message.from_request(request)
        settings = self.settings  # one consistent snapshot, even if a reload happens meanwhile
        rules = settings.rules
        now = self.clock()
        verdict = precheck(rules, message, now.astimezone())
        if verdict is None:
            verdict = await self._count(message, settings, now)
            if verdict is None:
                return settings.db_error_action
        elif verdict.reason in {"blacklisted", "whitelisted"}:
            log.info(
                "%s %s user : %s/%s/%s/%d",
                verdict.outcome.value,
                verdict.reason.capitalize() if verdict.reason == "whitelisted" else verdict.reason,
                message.sasl_username,
                message.sender,
                message.client_address,
                message.recipient_count,
            )
        self.decisions[verdict.outcome.value] += 1
        return verdict.action

    async def _count(self, message: Message, settings: Settings, now: datetime) -> Verdict | None:
        rules = settings.rules
        try:
            recipients_before = await asyncio.wait_for(
                self.storage.recipients_since(
                    message.sasl_username, now - rules.window, counted_outcomes(rules)
                ),
                settings.db_timeout,
            )
        except (StorageError, TimeoutError) as error:
            self.incident.failed(error, settings.db_error_action)
            return None
        recipients_last_24h = recipients_before + message.recipient_count
        verdict = decide_quota(rules, recipients_last_24h)
        event = Event(
            ts=now,
            sasl_username=message.sasl_username,
            sender=message.sender,
            client_address=message.client_address,
            recipient_count=message.recipient_count,
            outcome=verdict.outcome,
        )
        try:
            await self.writer.write(event, settings.db_timeout)
        except (StorageError, TimeoutError) as error:
            # The decision is sound (the total was read); only the record is late or lost.
            self.incident.failed(error, verdict.action)
        else:
            self.incident.succeeded()
        self._log_counted(message, verdict, recipients_last_24h, settings)
        return verdict

    @staticmethod
    def _log_counted(message: Message, verdict: Verdict, total: int, settings: Settings) -> None:
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
                settings.rules.quota,
                message.sasl_username,
                message.sender,
                message.client_address,
            )
        elif verdict.outcome is Outcome.REJECT:
            log.info(
                "REJECTING overquota (%d>%d) for user %s using %s from ip [%s]",
                total,
                settings.rules.reject_quota,
                message.sasl_username,
                message.sender,
                message.client_address,
            )
