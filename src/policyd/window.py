"""Each user's counted recipients over sliding windows, in memory: pure, time passed in.

The decision reads a user's totals from here, never from the database.  What is kept
per user is the events of the longest window, as (time in milliseconds, recipients,
outcome), in time order, merged when two fall in the same millisecond with the same
outcome.  Milliseconds are what every backend stores, so the window's edge is exactly
the database's: an event at ``t`` is inside a window of length ``w`` at ``now`` while
``t >= now - w``, as ``ts >= since`` in SQL.

Several window lengths (one per configured limit) are answered from the one list: each
has its own head (the first event still inside it) and its own running sums, one per
outcome, so that a change of ``count_rejected`` at reload needs nothing re-read.  Heads
only move forward: an event leaves a window once, even if the clock is later stepped
back.  Memory grows with the users active in the longest window and their events there,
never with the history kept in the database.

Times are integers (milliseconds since the epoch, UTC); nothing here reads a clock.
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from policyd.quota import Outcome

# Outcome codes as kept in the entries.
OUTCOME_CODES: dict[Outcome, int] = {Outcome.DUNNO: 0, Outcome.HOLD: 1, Outcome.REJECT: 2}
OUTCOMES: tuple[Outcome, ...] = (Outcome.DUNNO, Outcome.HOLD, Outcome.REJECT)
_CODE_BITS = 2
_CODE_MASK = (1 << _CODE_BITS) - 1
# Slots of one span in _User.state: its head (an entry index), then a sum per outcome.
_STRIDE = 1 + len(OUTCOMES)
# Expired entries are cut from the front once they are at least this many and at least
# half of the list (amortised O(1) per event, no copy per request).
_COMPACT_MIN = 16
_NEVER = 2**62


class _User:
    """One user: ``entries`` holds pairs (ms, recipients << 2 | outcome), oldest first."""

    __slots__ = ("entries", "expires", "floor", "last_seen", "state")

    def __init__(self, spans: int) -> None:
        self.entries = array("q")
        self.state = [0] * (spans * _STRIDE)
        self.last_seen = 0  # ms of the newest event
        self.floor = 0  # events before this (ms) were reset and are ignored
        # No head can move before this time (ms): until then advancing costs nothing.
        # Kept at or before the true next expiry (0: look now; nothing held: never).
        self.expires = _NEVER


@dataclass(frozen=True, slots=True)
class Sums:
    """A user's recipients inside one window, by outcome."""

    dunno: int = 0
    hold: int = 0
    reject: int = 0

    def counted(self, count_rejected: bool) -> int:
        """What counts toward the quota: sent or held mail (and rejected, if configured)."""
        return self.dunno + self.hold + (self.reject if count_rejected else 0)


class Window:
    """Per-user sliding sums for a fixed set of window lengths (``spans``, in ms)."""

    def __init__(self, spans: Sequence[int]) -> None:
        self._users: OrderedDict[str, _User] = OrderedDict()  # least recently active first
        self._spans: tuple[int, ...] = ()
        self._longest = 0
        self._events = 0  # entries held, over all users
        self.set_spans(spans, now=None)

    # -- shape ---------------------------------------------------------------

    @property
    def spans(self) -> tuple[int, ...]:
        return self._spans

    @property
    def longest(self) -> int:
        return self._longest

    def set_spans(self, spans: Sequence[int], now: int | None) -> None:
        """Change the window lengths, keeping every entry held (a reload).

        A longer window than before cannot be answered from memory alone: the entries
        older than the old longest window were dropped.  The caller reloads from the
        database in that case (see ``covers``).
        """
        wanted = tuple(sorted(set(spans), reverse=True))
        if not wanted or min(wanted) <= 0:
            raise ValueError(f"window lengths must be positive, not {spans!r}")
        self._spans = wanted
        self._longest = wanted[0]
        self._shortest = wanted[-1]
        self._zeros = (0,) * len(wanted)
        for user in self._users.values():
            self._recount(user, now)

    def _recount(self, user: _User, now: int | None) -> None:
        user.expires = 0
        entries = user.entries
        state = [0] * (len(self._spans) * _STRIDE)
        for index, span in enumerate(self._spans):
            cut = None if now is None else now - span
            base = index * _STRIDE
            head = 0 if cut is None else self._first_at_or_after(entries, cut)
            state[base] = head
            for position in range(2 * head, len(entries), 2):
                packed = entries[position + 1]
                state[base + 1 + (packed & _CODE_MASK)] += packed >> _CODE_BITS
        user.state = state

    # -- reading ---------------------------------------------------------------

    def sums(self, name: str, now: int) -> tuple[Sums, ...]:
        """The user's sums in each window (in the order of ``spans``) at ``now``."""
        user = self._users.get(name)
        if user is None:
            return tuple(Sums() for _ in self._spans)
        self._advance(user, now)
        state = user.state
        return tuple(
            Sums(state[base + 1], state[base + 2], state[base + 3]) for base in range(0, len(state), _STRIDE)
        )

    def totals(self, name: str, now: int, count_rejected: bool) -> tuple[int, ...]:
        """What counts toward the quota in each window (in the order of ``spans``)."""
        user = self._users.get(name)
        if user is None:
            return self._zeros
        if now >= user.expires:
            self._advance(user, now)
        state = user.state
        if len(state) == _STRIDE:  # one window: the usual case
            return (state[1] + state[2] + state[3] if count_rejected else state[1] + state[2],)
        if count_rejected:
            return tuple(
                state[base + 1] + state[base + 2] + state[base + 3] for base in range(0, len(state), _STRIDE)
            )
        return tuple(state[base + 1] + state[base + 2] for base in range(0, len(state), _STRIDE))

    def recent(self, name: str, now: int, span: int, count_rejected: bool) -> int:
        """What counts toward the quota in the last `span` ms (scanned from the newest
        entry back: cheap for a span much shorter than the windows)."""
        user = self._users.get(name)
        if user is None:
            return 0
        entries = user.entries
        cut = now - span
        total = 0
        position = len(entries) - 2
        while position >= 0 and entries[position] >= cut:
            packed = entries[position + 1]
            if count_rejected or packed & _CODE_MASK != OUTCOME_CODES[Outcome.REJECT]:
                total += packed >> _CODE_BITS
            position -= 2
        return total

    def last_seen(self, name: str) -> int | None:
        user = self._users.get(name)
        return None if user is None else user.last_seen

    def events(self, name: str, now: int) -> list[tuple[int, int, Outcome]]:
        """The user's entries inside the longest window: (ms, recipients, outcome)."""
        user = self._users.get(name)
        if user is None:
            return []
        self._advance(user, now)
        entries = user.entries
        head = user.state[0]
        return [
            (
                entries[position],
                entries[position + 1] >> _CODE_BITS,
                OUTCOMES[entries[position + 1] & _CODE_MASK],
            )
            for position in range(2 * head, len(entries), 2)
        ]

    def users(self) -> Iterator[str]:
        """Every user held, least recently active first."""
        return iter(list(self._users))

    def __len__(self) -> int:
        return len(self._users)

    def held(self, since: int, before: int) -> Iterator[tuple[str, int, int, Outcome]]:
        """What the window holds from `since` to before `before`: (user, ms, recipients,
        outcome), recipients of one millisecond and outcome together.  What a database
        lost under the daemon can be given back."""
        for name, user in self._users.items():
            entries = user.entries
            start = max(since, user.floor)
            for position in range(0, len(entries), 2):
                at = entries[position]
                if at >= before:
                    break
                if at >= start:
                    packed = entries[position + 1]
                    yield name, at, packed >> _CODE_BITS, OUTCOMES[packed & _CODE_MASK]

    def __contains__(self, name: object) -> bool:
        return name in self._users

    @property
    def entry_count(self) -> int:
        """Entries held over all users (expired ones not yet cut included)."""
        return self._events

    # -- changing ----------------------------------------------------------------

    def add(self, name: str, at: int, recipients: int, outcome: Outcome, now: int) -> bool:
        """Record an event; False if it is outside every window (too old) or reset.

        ``at`` may be earlier than events already held (another relay's event arriving
        late): it is put in its place.
        """
        if recipients < 0:
            raise ValueError("recipients must not be negative")
        user = self._users.get(name)
        if user is None:
            if at < now - self._longest:
                return False
            user = self._users[name] = _User(len(self._spans))
        else:
            self._users.move_to_end(name)
            if now >= user.expires:
                self._advance(user, now)
        if at < now - self._longest or at < user.floor:
            return False
        code = OUTCOME_CODES[outcome]
        entries = user.entries
        state = user.state
        # Where the event goes: merged into the last entry when it has the same
        # millisecond and outcome, else at the end (the usual case), else in its place
        # among the others (another relay's event arriving late).
        inserted = True
        if entries and at == entries[-2] and entries[-1] & _CODE_MASK == code:
            entries[-1] += recipients << _CODE_BITS
            position = len(entries) // 2 - 1
            inserted = False
        elif not entries or at > entries[-2]:
            entries.append(at)
            entries.append((recipients << _CODE_BITS) | code)
            position = len(entries) // 2 - 1
        else:
            position = bisect.bisect_right(_Times(entries), at)
            entries.insert(2 * position, (recipients << _CODE_BITS) | code)
            entries.insert(2 * position, at)
        if inserted:
            self._events += 1
        counted = False
        for index, span in enumerate(self._spans):
            base = index * _STRIDE
            head = state[base]
            if position >= head and at >= now - span:
                state[base + 1 + code] += recipients
                counted = True
            elif inserted:
                # Outside this window: such an event can only land at or before the head
                # (everything from the head on is inside), which moves up by one.
                state[base] = head + 1
        user.last_seen = max(user.last_seen, at)
        # The new entry leaves the shortest window first, one millisecond after its edge.
        user.expires = min(user.expires, at + self._shortest + 1)
        return counted

    def remove(self, name: str, at: int, recipients: int, outcome: Outcome, now: int) -> bool:
        """Take back an event added earlier (it turned out to be counted twice)."""
        user = self._users.get(name)
        if user is None:
            return False
        self._advance(user, now)
        entries = user.entries
        code = OUTCOME_CODES[outcome]
        position = self._first_at_or_after(entries, at)
        while 2 * position < len(entries) and entries[2 * position] == at:
            packed = entries[2 * position + 1]
            if packed & _CODE_MASK == code and packed >> _CODE_BITS >= recipients:
                entries[2 * position + 1] = packed - (recipients << _CODE_BITS)
                state = user.state
                for base in range(0, len(state), _STRIDE):
                    if position >= state[base]:
                        state[base + 1 + code] -= recipients
                return True
            position += 1
        return False

    def reset(self, name: str, before: int) -> int:
        """Forget the user's events before ``before`` (ms), now and when they arrive late.

        Returns the recipients forgotten from the longest window.
        """
        user = self._users.get(name)
        if user is None:
            user = self._users[name] = _User(len(self._spans))
        user.floor = max(user.floor, before)
        user.expires = 0
        entries = user.entries
        keep_from = self._first_at_or_after(entries, before)
        state = user.state
        forgotten = 0
        for base in range(0, len(state), _STRIDE):
            head = state[base]
            for position in range(head, keep_from):
                packed = entries[2 * position + 1]
                state[base + 1 + (packed & _CODE_MASK)] -= packed >> _CODE_BITS
                if base == 0:
                    forgotten += packed >> _CODE_BITS
            state[base] = max(head, keep_from)
        self._compact(user)
        return forgotten

    def expire(self, now: int, limit: int | None = None) -> int:
        """Drop users with nothing left in any window; returns how many were dropped.

        Users are kept least recently active first, so this stops at the first one still
        active (and after `limit` users at most, to bound the work of one call).
        """
        dropped = 0
        cut = now - self._longest
        users = self._users
        while users and (limit is None or dropped < limit):
            user = next(iter(users.values()))
            if user.last_seen >= cut or user.floor >= cut:
                break
            users.popitem(last=False)
            self._events -= len(user.entries) // 2
            dropped += 1
        return dropped

    def clear(self) -> None:
        self._users.clear()
        self._events = 0

    def load(
        self, name: str, times: Sequence[int], counts: Sequence[int], codes: Sequence[int], now: int
    ) -> None:
        """Add a user's events read in bulk (outcome codes as OUTCOME_CODES).

        The fast path, for the start: a user not held yet gets the entries in one go.
        """
        if name in self._users or not times:
            for at, recipients, code in sorted(zip(times, counts, codes, strict=True)):
                self.add(name, at, recipients, OUTCOMES[code], now)
            return
        if any(later < earlier for earlier, later in itertools.pairwise(times)):
            rows = sorted(zip(times, counts, codes, strict=True))
            times = [row[0] for row in rows]
            counts = [row[1] for row in rows]
            codes = [row[2] for row in rows]
        user = _User(len(self._spans))
        packed = [(recipients << _CODE_BITS) | code for recipients, code in zip(counts, codes, strict=True)]
        pairs = array("q", bytes(16 * len(times)))
        pairs[0::2] = array("q", times)
        pairs[1::2] = array("q", packed)
        user.entries = pairs
        user.last_seen = times[-1]
        self._events += len(times)
        self._recount(user, now)
        self._users[name] = user
        self._compact(user)
        if not user.entries:
            del self._users[name]

    # -- internals -----------------------------------------------------------------

    def _advance(self, user: _User, now: int) -> None:
        """Move every window's head past the entries now outside it; note when the next
        one will leave (user.expires), so that until then this is not even called."""
        entries = user.entries
        state = user.state
        count = len(entries) // 2
        moved = False
        expires = _NEVER
        for index, span in enumerate(self._spans):
            base = index * _STRIDE
            head = state[base]
            cut = now - span
            while head < count and entries[2 * head] < cut:
                packed = entries[2 * head + 1]
                state[base + 1 + (packed & _CODE_MASK)] -= packed >> _CODE_BITS
                head += 1
                moved = True
            state[base] = head
            if head < count:
                expires = min(expires, entries[2 * head] + span + 1)
        user.expires = expires
        if moved and state[0] >= _COMPACT_MIN and state[0] * 2 >= count:
            self._compact(user)

    def _compact(self, user: _User) -> None:
        """Cut the entries that are outside every window (before the longest one's head)."""
        state = user.state
        head = state[0]  # the longest window's head is the smallest
        if head == 0:
            return
        del user.entries[: 2 * head]
        self._events -= head
        for base in range(0, len(state), _STRIDE):
            state[base] -= head

    @staticmethod
    def _first_at_or_after(entries: array[int], at: int) -> int:
        """Index of the first entry at or after `at` (entries are pairs: search the times)."""
        return bisect.bisect_left(_Times(entries), at)

    @staticmethod
    def _first_after(entries: array[int], at: int) -> int:
        return bisect.bisect_right(_Times(entries), at)


class _Times(Sequence[int]):
    """The times of a pair array, as a sequence bisect can search (no copy)."""

    __slots__ = ("_entries",)

    def __init__(self, entries: array[int]) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries) // 2

    def __getitem__(self, index: int) -> int:  # type: ignore[override]
        return self._entries[2 * index]
