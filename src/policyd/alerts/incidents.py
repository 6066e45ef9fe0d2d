"""Which decisions start or raise an incident: pure, fed each counted verdict.

An incident is one user over one limit: it starts when the user's total first reaches
the limit's HOLD threshold (or REJECT at once), is raised once if it then reaches
REJECT, and ends when a decision finds the user back under the HOLD threshold, or the
user is reset.  Each start and each raise is told once; nothing else is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from policyd.quota import Limit


class Level(IntEnum):
    HOLD = 1
    REJECT = 2


@dataclass(frozen=True, slots=True)
class Crossing:
    """`user` reached `level` of `limit` with `total` recipients (at `at`, ms)."""

    user: str
    limit: Limit
    level: Level
    total: int
    at: int


def level_of(limit: Limit, total: int) -> Level | None:
    if total >= limit.reject:
        return Level.REJECT
    if total >= limit.hold:
        return Level.HOLD
    return None


class Incidents:
    """The incidents open now (user and limit -> the highest level told)."""

    def __init__(self) -> None:
        self._open: dict[tuple[str, str], Level] = {}

    def __len__(self) -> int:
        return len(self._open)

    def observe(self, user: str, limits: Sequence[Limit], totals: Sequence[int], at: int) -> list[Crossing]:
        """The crossings this decision makes (totals include its message)."""
        crossings = []
        for limit, total in zip(limits, totals, strict=True):
            key = (user, limit.label)
            level = level_of(limit, total)
            told = self._open.get(key)
            if level is None:
                if told is not None:
                    del self._open[key]  # back under: the incident is over
                continue
            if told is None or level > told:
                self._open[key] = level
                crossings.append(Crossing(user, limit, level, total, at))
        return crossings

    def reset(self, user: str) -> None:
        """The user was reset: their incidents are over."""
        for key in [key for key in self._open if key[0] == user]:
            del self._open[key]

    def open_for(self, user: str) -> dict[str, Level]:
        return {label: level for (name, label), level in self._open.items() if name == user}
