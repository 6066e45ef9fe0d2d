"""What the pages and the gauges show, read from the running daemon without disturbing it.

Three sources, each bounded:

- the window (memory): every user's counted totals against the limits, scanned in
  chunks that yield to the event loop between them, at most once per SNAPSHOT_SECONDS
  whoever asks (a scrape, a page, both at once);
- the stats object: decisions per minute, sampled once a minute into a ring;
- the database: the top senders and one user's events, each query bounded by a timeout
  and its answer kept for a few seconds; not asked at all while the daemon counts the
  database as unavailable (the pages then say so and show what memory holds).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Generic, TypeVar

from policyd.clock import MILLISECOND, to_ms
from policyd.quota import Outcome, QuotaRules
from policyd.storage import Event, StorageError
from policyd.storage.base import SenderStats
from policyd.window import Sums

if TYPE_CHECKING:
    from policyd.daemon import Daemon

T = TypeVar("T")

# The window is scanned at most this often (its result is shared meanwhile).
SNAPSHOT_SECONDS = 5.0
# Users whose totals are read between two yields to the event loop: about a millisecond.
SCAN_CHUNK_USERS = 2000
# A user at or above this share of a HOLD threshold is shown as close to it.
NEAR_SHARE = 0.8
# Users kept in each list of a snapshot (top, held, rejected).
LIST_USERS = 50
# Database answers are kept this long (a page reloaded in a loop asks once per period).
QUERY_CACHE_SECONDS = 5.0
# Longest a page waits for the database (it then shows what memory holds).
QUERY_TIMEOUT_SECONDS = 2.0
# One user's page reads at most this many of their events (the newest): about 1,400 a
# day for 7 days, a busy account's; a bound on the work one page costs.
USER_EVENTS_MAX = 10_000
# Decisions per minute kept (6 hours).
HISTORY_MINUTES = 360

STATES = ("ok", "near", "held", "rejected")


@dataclass(frozen=True, slots=True)
class UserState:
    """One user against the limits now: counted totals (QuotaRules.limits order), and the
    limit closest to (or furthest past) its HOLD threshold."""

    name: str
    totals: tuple[int, ...]
    state: str  # one of STATES
    limit: int  # index in QuotaRules.limits of the limit that decides `state`
    share: float  # total / HOLD threshold of that limit


def user_state(
    name: str, rules: QuotaRules, totals: tuple[int, ...], rejected: tuple[int, ...] | None = None
) -> UserState:
    """`totals`: counted recipients per limit; `rejected`: recipients rejected within each
    limit's window.  Rejected: at the REJECT threshold, or a message rejected within the
    window (with count_rejected = no a rejected message is not counted, so the count
    alone would not show it); held: at the HOLD threshold; near: past NEAR_SHARE of it."""
    rejected = rejected or (0,) * len(totals)
    worst, worst_share, worst_rank = 0, -1.0, -1
    for index, (limit, total, refused) in enumerate(zip(rules.limits, totals, rejected, strict=True)):
        rank = 3 if total >= limit.reject or refused else 2 if total >= limit.hold else 0
        share = total / limit.hold
        if rank == 0 and share >= NEAR_SHARE:
            rank = 1
        if (rank, share) > (worst_rank, worst_share):
            worst, worst_share, worst_rank = index, share, rank
    state = {0: "ok", 1: "near", 2: "held", 3: "rejected"}[worst_rank]
    return UserState(name, totals, state, worst, worst_share)


@dataclass(frozen=True, slots=True)
class Snapshot:
    at: datetime
    users: int  # users in the window
    entries: int
    top: list[UserState]  # by share of their closest limit, largest first
    held: list[UserState]
    rejected: list[UserState]
    held_count: int
    rejected_count: int


class WindowScan:
    """The window's users against the rules, at most once per SNAPSHOT_SECONDS."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._last: Snapshot | None = None
        self._taken = 0.0
        self._running: asyncio.Task[Snapshot] | None = None

    @property
    def last(self) -> Snapshot | None:
        return self._last

    async def snapshot(self) -> Snapshot:
        if self._last is not None and time.monotonic() - self._taken < SNAPSHOT_SECONDS:
            return self._last
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._scan(), name="policyd-web-scan")
        # Shielded: a client going away does not cancel the scan the others wait for.
        return await asyncio.shield(self._running)

    async def _scan(self) -> Snapshot:
        decider = self.daemon.decider
        assert decider is not None
        rules = self.daemon.settings.rules
        at = self.daemon.clock()
        now_ms = to_ms(at)
        window = decider.window
        names = list(window.users())
        top: list[_Ranked] = []
        held: list[_Ranked] = []
        rejected: list[_Ranked] = []
        held_count = rejected_count = 0
        for first in range(0, len(names), SCAN_CHUNK_USERS):
            if first:
                await asyncio.sleep(0)  # policy requests go first
                if decider.settings.rules is not rules:
                    rules = decider.settings.rules  # reloaded meanwhile: the new limits from here
            for name in names[first : first + SCAN_CHUNK_USERS]:
                state = self._state(name, now_ms, rules)
                if state is None:
                    continue
                _keep(top, (state.share, name, state))
                if state.state == "held":
                    held_count += 1
                    _keep(held, (float(state.totals[state.limit]), name, state))
                elif state.state == "rejected":
                    rejected_count += 1
                    _keep(rejected, (float(state.totals[state.limit]), name, state))
        snapshot = Snapshot(
            at=at,
            users=len(window),
            entries=window.entry_count,
            top=_largest_first(top),
            held=_largest_first(held),
            rejected=_largest_first(rejected),
            held_count=held_count,
            rejected_count=rejected_count,
        )
        self._last, self._taken = snapshot, time.monotonic()
        return snapshot

    def one(self, name: str) -> UserState:
        """One user now (no scan: a few operations)."""
        decider = self.daemon.decider
        assert decider is not None
        rules = decider.settings.rules
        state = self._state(name, to_ms(self.daemon.clock()), rules)
        return state or user_state(name, rules, (0,) * len(rules.limits))

    def _state(self, name: str, now_ms: int, rules: QuotaRules) -> UserState | None:
        """The user against the limits, from the window's sums; None if nothing is held."""
        decider = self.daemon.decider
        assert decider is not None
        window = decider.window
        sums = window.sums(name, now_ms)
        spans = window.spans
        by_limit = []
        for limit in rules.limits:
            span = limit.window // MILLISECOND
            by_limit.append(sums[spans.index(span)] if span in spans else Sums())
        totals = tuple(one.counted(rules.count_rejected) for one in by_limit)
        rejected = tuple(one.reject for one in by_limit)
        if not any(totals) and not any(rejected):
            return None
        return user_state(name, rules, totals, rejected)


_Ranked = tuple[float, str, UserState]


def _keep(heap: list[_Ranked], item: _Ranked) -> None:
    """Keep the LIST_USERS largest (a min-heap: its smallest goes first)."""
    if len(heap) < LIST_USERS:
        heapq.heappush(heap, item)
    elif item[:2] > heap[0][:2]:
        heapq.heapreplace(heap, item)


def _largest_first(heap: list[_Ranked]) -> list[UserState]:
    return [item[2] for item in sorted(heap, key=lambda item: (-item[0], item[1]))]


@dataclass(frozen=True, slots=True)
class Minute:
    start: datetime
    counts: dict[str, int]  # outcome ("DUNNO", "HOLD", "REJECT") -> decisions


class DecisionHistory:
    """Decisions per minute by outcome, from the stats counters (a ring of HISTORY_MINUTES)."""

    def __init__(self, daemon: Daemon, minutes: int = HISTORY_MINUTES) -> None:
        self.daemon = daemon
        self.minutes: deque[Minute] = deque(maxlen=minutes)
        self._since = self._minute_start(daemon.clock())
        self._base = self._counts()

    def _counts(self) -> dict[str, int]:
        counts = {outcome.value: 0 for outcome in Outcome}
        for (outcome, _), count in list(self.daemon.stats.decisions.items()):
            counts[outcome] = counts.get(outcome, 0) + count
        return counts

    @staticmethod
    def _minute_start(moment: datetime) -> datetime:
        return moment.replace(second=0, microsecond=0)

    def sample(self) -> None:
        """Close the minutes that have ended (called about once a minute)."""
        now = self.daemon.clock()
        start = self._minute_start(now)
        if start <= self._since:
            return
        counts = self._counts()
        self.minutes.append(Minute(self._since, _difference(counts, self._base)))
        # Minutes with nothing sampled since (the clock jumped forward): empty ones.
        minute = timedelta(minutes=1)
        missing = min(int((start - self._since) / minute) - 1, self.minutes.maxlen or 0)
        for number in range(missing, 0, -1):
            self.minutes.append(Minute(start - number * minute, {}))
        self._since, self._base = start, counts

    def current(self) -> Minute:
        """The minute under way, so far."""
        return Minute(self._since, _difference(self._counts(), self._base))

    async def run(self) -> None:
        while True:
            now = self.daemon.clock()
            await asyncio.sleep(max(0.5, 60.5 - now.second - now.microsecond / 1e6))
            self.sample()


def _difference(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {key: value - before.get(key, 0) for key, value in now.items()}


@dataclass(frozen=True, slots=True)
class Answer(Generic[T]):
    """A database answer, or why there is none (then `value` is None)."""

    value: T | None
    problem: str = ""


class DatabaseViews:
    """The database's side of the pages: bounded, cached, never while it is unavailable."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._cache: dict[tuple[object, ...], tuple[float, Answer[object]]] = {}

    async def top_senders(self, limit: int) -> Answer[list[SenderStats]]:
        since = self.daemon.clock() - self.daemon.settings.rules.window
        return await self._ask(("top", limit), lambda storage: storage.top_senders(since, limit))

    async def user_events(self, name: str, days: int) -> Answer[list[Event]]:
        since = self.daemon.clock() - timedelta(days=days)
        return await self._ask(
            ("user", name, days), lambda storage: storage.user_events(name, since, USER_EVENTS_MAX)
        )

    async def _ask(self, key: tuple[object, ...], query: Callable[..., Awaitable[T]]) -> Answer[T]:
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and now - cached[0] < QUERY_CACHE_SECONDS:
            return cached[1]  # type: ignore[return-value]
        outage, storage = self.daemon.outage, self.daemon.storage
        if storage is None or outage is None or not self.daemon.opened:
            return Answer(None, "the database is not open yet")
        if outage.active:
            return Answer(None, f"the database is unavailable ({outage.reason})")
        answer: Answer[T]
        try:
            async with asyncio.timeout(QUERY_TIMEOUT_SECONDS):
                answer = Answer(await query(storage))
        except StorageError as error:
            answer = Answer(None, f"the database failed: {error}")
        except TimeoutError:
            answer = Answer(None, f"the database did not answer within {QUERY_TIMEOUT_SECONDS:g}s")
        if len(self._cache) > 256:
            self._cache.clear()
        self._cache[key] = (now, answer)  # type: ignore[assignment]
        return answer

    def forget(self) -> None:
        self._cache.clear()
