"""From a request to a verdict: the rules, the user's totals from the window, the record.

For a counted message the whole step - read the user's totals, decide, add the message
to the window - runs without yielding to the event loop, so two requests of one user
(from any number of connections) are decided one after the other, each seeing the
other's recipients: exact, as go-policyd's mutex was.  Only then does the request wait
for its event to be recorded (writer.py); the next request of that user does not wait
for that, it already sees the message in the window.

The window holds what the database holds for the longest limit window (loaded at start,
kept up to date by sync.py) plus everything this daemon decided.  Until it has been
loaded (the database down at start), it holds only this run's decisions and the spool
a previous run left; a user it knows nothing about then gets `db_error_action`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

from policyd import logs
from policyd.clock import MILLISECOND, from_ms, to_ms, utc_now
from policyd.config import Settings
from policyd.logs import log, printable
from policyd.outage import Outage
from policyd.protocol import PolicyRequest
from policyd.quota import (
    Limit,
    Message,
    Outcome,
    QuotaRules,
    Verdict,
    decide,
    outcome_of_action,
    precheck,
    strip_login_domain,
)
from policyd.rules import RuntimeRules
from policyd.stats import Stats
from policyd.storage import Event
from policyd.window import Window
from policyd.writer import EventWriter

# The strict path (several daemons on one database).  A decision first reads the other
# daemons' new rows when the user is within reach of a threshold: when their total, plus
# what they sent in the last STRICT_RATE_MS times the number of daemons (as if each were
# receiving as much), reaches STRICT_FROM of a limit's HOLD threshold, up to its REJECT
# threshold (beyond it nothing can change the answer).  Below, the tail (every 250 ms)
# is close enough: the others cannot have accepted the other half meanwhile unless they
# take far more than this daemon sees.
STRICT_FROM = 0.5
STRICT_RATE_MS = 1000


def window_spans(rules: QuotaRules) -> list[int]:
    """The window lengths (ms) the rules need, one per distinct limit window."""
    return [limit.window // MILLISECOND for limit in rules.limits]


class Decider:
    def __init__(
        self,
        *,
        settings: Settings,
        window: Window,
        writer: EventWriter,
        outage: Outage,
        stats: Stats,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self.window = window
        self.writer = writer
        self.outage = outage
        self.stats = stats
        self.clock = clock
        # The window holds the database's history (loaded at start, or once it came back).
        self.complete = False
        # The spool a previous run left, counted at start: if the database turns out to
        # have some of them already, they are taken back (sync.py).
        self.adopted: list[Event] = []
        # Set by the daemon when other daemons may write to the database: reads their new
        # rows now (bounded), and tells whether any are active.
        self.catch_up: Callable[[float], Awaitable[bool]] | None = None
        self.others_active: Callable[[], int] = lambda: 0
        # Told each counted decision (user, limits, totals, ms): the alerts' incidents.
        self.alerts: Callable[[str, tuple[Limit, ...], tuple[int, ...], int], None] | None = None
        self._strict_tasks: set[asyncio.Future[None]] = set()
        # The database's allow / block entries and per-user overrides (sync.py keeps them).
        self.runtime = RuntimeRules()
        self._override_settings: dict[str, tuple[Settings, QuotaRules, Settings]] = {}
        self._said_domain = False  # _tell_about_domains, once a run
        # Positions of the limits in window.spans (QuotaRules.limits order).
        self._span_index: tuple[int, ...] = ()
        self._index_spans(settings.rules)

    def _index_spans(self, rules: QuotaRules) -> None:
        spans = self.window.spans
        self._span_index = tuple(spans.index(span) for span in window_spans(rules))
        self._identity = tuple(range(len(spans)))

    def reload(self, settings: Settings) -> bool:
        """New settings; True if the window must be reloaded (a longer window than held)."""
        longest_before = self.window.longest
        self.window.set_spans(window_spans(settings.rules), to_ms(self.clock()))
        self.settings = settings
        self._index_spans(settings.rules)
        return self.window.longest > longest_before

    def adopt(self, events: Sequence[Event]) -> None:
        """Count events a previous run spooled (before anything is known from the database)."""
        now = to_ms(self.clock())
        for event in events:
            self.window.add(event.sasl_username, to_ms(event.ts), event.recipient_count, event.outcome, now)
        self.adopted.extend(events)

    def totals(self, user: str, now_ms: int, rules: QuotaRules) -> tuple[int, ...]:
        """The user's counted recipients in each limit's window (rules.limits order)."""
        by_span = self.window.totals(user, now_ms, rules.count_rejected)
        if self._span_index == self._identity:
            return by_span
        return tuple(by_span[index] for index in self._span_index)

    def submit(self, request: PolicyRequest, answer: Callable[[Verdict], None]) -> None:
        """Decide `request`; `answer(verdict)` is called once the answer may go out: at
        once when nothing is recorded, else once the event is recorded (writer.py).

        Raises RequestValueError on a request Postfix would not send.
        """
        settings = self.settings  # one consistent snapshot, even if a reload happens meanwhile
        message = Message.from_request(request, settings.strip_domain is True)
        rules = settings.rules
        now = self.clock()
        self.stats.requests[message.protocol_state or "(none)"] += 1
        # The local time only where office hours need it: the conversion costs more than
        # the rest of the precheck.
        listed = bool(rules.whitelist) and rules.listed(rules.whitelist, message)
        runtime = self.runtime
        now_ms = to_ms(now)
        verdict = precheck(rules, message, now.astimezone() if listed else now, runtime, now_ms)
        if verdict is not None:
            self.stats.decisions[verdict.outcome.value, ""] += 1
            if verdict.entry:
                log.info(
                    "%s %s by list entry %s: %s/%s/%s/%d",
                    verdict.outcome.value,
                    verdict.reason,
                    verdict.entry,
                    message.sasl_username,
                    message.sender,
                    message.client_address,
                    message.recipient_count,
                )
            elif verdict.reason in {"blacklisted", "whitelisted"}:
                # go-policyd v0.77's lines, word for word (tests/fixtures/go-policyd-log-formats.txt).
                log.info(
                    "%s user: %s/%s/%s/%d",
                    "skipping whitelisted" if verdict.reason == "whitelisted" else "Holding blacklisted",
                    message.sasl_username,
                    message.sender,
                    message.client_address,
                    message.recipient_count,
                )
            if log.isEnabledFor(logging.DEBUG):
                _log_decision(message, verdict, rules)
            answer(verdict)
            return
        if runtime.overrides:
            settings = self._with_overrides(settings, message.sasl_username, now_ms)
            rules = settings.rules
        if (
            self.catch_up is not None
            and self.others_active()
            and (self.complete or message.sasl_username in self.window)
            and self._near_a_threshold(rules, message, now_ms)
        ):
            # Strict path: read what the other daemons decided lately first.  The task
            # is kept until it ends (the loop holds tasks only weakly).
            task = asyncio.ensure_future(self._count_strictly(message, settings, answer))
            self._strict_tasks.add(task)
            task.add_done_callback(self._strict_tasks.discard)
            return
        self._count(message, settings, now_ms, answer)

    def _with_overrides(self, settings: Settings, user: str, now_ms: int) -> Settings:
        """The settings with the user's overrides of the limits (same windows) in place."""
        rules = self.runtime.rules_for(user, settings.rules, now_ms)
        if rules is settings.rules:
            return settings
        cached = self._override_settings.get(user)
        if cached is not None and cached[0] is settings and cached[1] is rules:
            return cached[2]
        effective = dataclasses.replace(settings, rules=rules)
        self._override_settings[user] = (settings, rules, effective)
        return effective

    def set_runtime(self, runtime: RuntimeRules) -> None:
        """New rules from the database (sync.py): used from the next decision on."""
        self.runtime = runtime
        self._override_settings = {}

    async def decide(self, request: PolicyRequest) -> Verdict:
        """submit(), awaited: the verdict once it may go out."""
        future: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self.submit(request, future.set_result)
        return await future

    async def _count_strictly(
        self, message: Message, settings: Settings, answer: Callable[[Verdict], None]
    ) -> None:
        catch_up = self.catch_up
        try:
            if catch_up is not None and await catch_up(settings.db_timeout):
                self.stats.strict_reads += 1
        finally:
            # Read or not (the database may be slow: then from the window, as always), the
            # decision itself runs from here without yielding: atomic again.  Its answer
            # waits until the event is in the database, so the other daemons' strict reads
            # see it: at most one message per connection is unseen, as when every request
            # read the database.
            self._count(message, settings, to_ms(self.clock()), answer, committed=True)

    def _count(
        self,
        message: Message,
        settings: Settings,
        now_ms: int,
        answer: Callable[[Verdict], None],
        committed: bool = False,
    ) -> None:
        """Totals, decision, the message into the window, the event to the writer: no await
        anywhere, so no other request of this user in between."""
        rules = settings.rules
        user = message.sasl_username
        if not self.complete and user not in self.window:
            # Nothing known about this user and no history from the database yet: the
            # configured answer; the message is still recorded, so the user is known now.
            outcome = outcome_of_action(settings.db_error_action)
            verdict = Verdict(
                settings.db_error_action,
                outcome,
                record=True,
                reason="database unavailable",
                totals=tuple(message.recipient_count for _ in rules.limits),
                total=message.recipient_count,
            )
            self.stats.answered_error_action += 1
        else:
            recipients = message.recipient_count
            verdict = decide(rules, [total + recipients for total in self.totals(user, now_ms, rules)])
            if self.outage.active or not self.complete:
                self.stats.decided_during_outage += 1
        if (
            settings.strip_domain is None
            and not self._said_domain
            and "@" in user
            and user not in self.window
        ):
            self._tell_about_domains(user)
        self.window.add(user, now_ms, message.recipient_count, verdict.outcome, now_ms)
        if self.alerts is not None and verdict.totals:
            self.alerts(user, rules.limits, verdict.totals, now_ms)  # a look-up; no I/O
        self.stats.decisions[verdict.outcome.value, verdict.limit.label if verdict.limit else ""] += 1
        self.stats.events_counted += 1
        self._log_counted(message, verdict, rules)
        if log.isEnabledFor(logging.DEBUG):
            _log_decision(message, verdict, rules)
        event = Event(
            from_ms(now_ms),
            user,
            message.sender,
            message.client_address,
            message.recipient_count,
            verdict.outcome,
            queue_id=message.queue_id,
        )
        # Waiting for the database makes sense only while it answers.
        self.writer.submit(event, functools.partial(answer, verdict), committed and not self.outage.active)

    def _tell_about_domains(self, user: str) -> None:
        """A new user@domain whose short name the window knows (go-policyd's rows): said
        once a run, while strip_domain is not set."""
        short = strip_login_domain(user)
        if short != user and short in self.window:
            self._said_domain = True
            log.warning(
                "%s is counted apart from %s, whose recipients are in the window (go-policyd cut "
                "@domain off logins): set strip_domain = yes to count them as one, or "
                "strip_domain = no to keep whole names and silence this",
                printable(user),
                printable(short),
            )

    def _near_a_threshold(self, rules: QuotaRules, message: Message, now_ms: int) -> bool:
        """Whether this decision takes the strict path (see STRICT_FROM)."""
        others = self.others_active()
        user = message.sasl_username
        recipients = message.recipient_count
        before = self.totals(user, now_ms, rules)
        reach: int | None = None
        for limit, total in zip(rules.limits, before, strict=True):
            after = total + recipients
            if after >= limit.reject:
                continue
            if after >= limit.hold * STRICT_FROM:
                return True
            if reach is None:
                reach = (max(others, 1) + 1) * (
                    self.window.recent(user, now_ms, STRICT_RATE_MS, rules.count_rejected) + recipients
                )
            if after + reach >= limit.hold * STRICT_FROM:
                return True
        return False

    @staticmethod
    def _log_counted(message: Message, verdict: Verdict, rules: QuotaRules) -> None:
        # go-policyd v0.77's lines, word for word, so existing grep and monit rules keep
        # working (its format strings: tests/fixtures/go-policyd-log-formats.txt).
        logs.info(
            f"Updating db: {message.sasl_username}/{message.sender}/{message.client_address}/"
            f"{message.recipient_count}/{verdict.total}"
        )
        limit = verdict.limit
        # The primary limit's lines stay go-policyd's; another limit's name follows.
        named = f" (limit {limit.label})" if limit is not None and limit is not rules.limits[0] else ""
        # By the same quick path as the line above: a phished account's bot gets these
        # for every message, at the moment the load is highest.
        if verdict.outcome is Outcome.HOLD and limit is not None:
            logs.info(
                f"DEFERRING overquota ({verdict.total}>{limit.hold}) for user {message.sasl_username} "
                f"using {message.sender} from ip [{message.client_address}]{named}"
            )
        elif verdict.outcome is Outcome.REJECT and limit is not None:
            # go-policyd rejected from twice its quota and says so ("3000>2x1500"); a
            # rejectquota of policyd's own that is not twice the quota is shown as it is.
            threshold = f"2x{limit.hold}" if limit.reject == 2 * limit.hold else str(limit.reject)
            logs.info(
                f"REJECTING overquota ({verdict.total}>{threshold}) for user {message.sasl_username} "
                f"using {message.sender} from ip [{message.client_address}]{named}"
            )


def _quoted(text: str) -> str:
    """A value for the debug line: in quotes, its quotes and backslashes escaped and its
    control characters as \\xNN, so that no value can pass for another field."""
    return '"' + printable(text.replace("\\", "\\\\").replace('"', '\\"')) + '"'


def _log_decision(message: Message, verdict: Verdict, rules: QuotaRules) -> None:
    """log_level = debug: every decision with what it was made from."""
    totals = ", ".join(
        f"{total} of {limit.label}" for limit, total in zip(rules.limits, verdict.totals, strict=False)
    )
    log.debug(
        "decision: %s (%s) for user=%s sender=%s client=%s recipients=%d stage=%s queue_id=%s%s",
        _quoted(verdict.action),
        verdict.reason,
        _quoted(message.sasl_username),
        _quoted(message.sender),
        _quoted(message.client_address),
        message.recipient_count,
        _quoted(message.protocol_state),
        message.queue_id or "-",
        f" totals: {totals}" if totals else "",
    )
