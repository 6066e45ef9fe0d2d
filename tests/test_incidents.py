"""Incidents against a brute-force model: told once when a user first reaches a limit,
once more at REJECT, again only after a decision found them back under it."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.alerts.incidents import Incidents, Level
from policyd.quota import Limit

DAY = Limit(hold=10, reject=20, window=timedelta(hours=24))
HOUR = Limit(hold=3, reject=6, window=timedelta(hours=1), name="3/1h")
LIMITS = (DAY, HOUR)


def model_crossings(history: list[tuple[str, tuple[int, int]]]) -> list[tuple[str, str, Level]]:
    """Replays each user's totals: a crossing whenever the level goes above the highest
    told since that user was last below the limit."""
    told: dict[tuple[str, str], int] = {}
    out = []
    for user, totals in history:
        for limit, total in zip(LIMITS, totals, strict=True):
            level = 2 if total >= limit.reject else 1 if total >= limit.hold else 0
            key = (user, limit.label)
            if level == 0:
                told.pop(key, None)
            elif level > told.get(key, 0):
                told[key] = level
                out.append((user, limit.label, Level(level)))
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alice", "bob"]), st.tuples(st.integers(0, 30), st.integers(0, 8))),
        max_size=60,
    )
)
def test_incidents_equal_the_model(history: list[tuple[str, tuple[int, int]]]) -> None:
    incidents = Incidents()
    got = []
    for at, (user, totals) in enumerate(history):
        got += [(c.user, c.limit.label, c.level) for c in incidents.observe(user, LIMITS, totals, at)]
    assert got == model_crossings(history)


def test_hold_then_reject_then_over_until_back_under() -> None:
    incidents = Incidents()
    assert [c.level for c in incidents.observe("alice", (DAY,), (10,), 1)] == [Level.HOLD]
    assert incidents.observe("alice", (DAY,), (15,), 2) == []  # still the same incident
    assert [c.level for c in incidents.observe("alice", (DAY,), (25,), 3)] == [Level.REJECT]
    assert incidents.observe("alice", (DAY,), (12,), 4) == []  # down to HOLD: not told again
    assert incidents.observe("alice", (DAY,), (5,), 5) == []  # back under: over
    assert [c.level for c in incidents.observe("alice", (DAY,), (11,), 6)] == [Level.HOLD]  # a new one


def test_a_reset_ends_the_users_incidents() -> None:
    incidents = Incidents()
    incidents.observe("alice", LIMITS, (10, 3), 1)
    incidents.observe("bob", LIMITS, (10, 0), 1)
    assert incidents.open_for("alice") == {DAY.label: Level.HOLD, "3/1h": Level.HOLD}
    incidents.reset("alice")
    assert incidents.open_for("alice") == {}
    assert len(incidents) == 1
    assert len(incidents.observe("alice", LIMITS, (10, 3), 2)) == 2
