"""The in-memory window against a brute-force model: every event kept, every sum recomputed."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.quota import Outcome
from policyd.window import OUTCOME_CODES, Sums, Window

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_780_000_000_000  # ms, some day in 2026


@dataclass
class Model:
    """What the window must answer: a plain list of every event, summed on demand."""

    spans: tuple[int, ...]
    events: dict[str, list[tuple[int, int, Outcome]]] = field(default_factory=dict)
    floors: dict[str, int] = field(default_factory=dict)

    def add(self, user: str, at: int, recipients: int, outcome: Outcome, now: int) -> bool:
        if at < now - max(self.spans) or at < self.floors.get(user, 0):
            return False
        self.events.setdefault(user, []).append((at, recipients, outcome))
        return True

    def reset(self, user: str, before: int) -> None:
        self.floors[user] = max(self.floors.get(user, 0), before)
        self.events[user] = [event for event in self.events.get(user, []) if event[0] >= before]

    def sums(self, user: str, now: int) -> tuple[Sums, ...]:
        result = []
        for span in sorted(set(self.spans), reverse=True):
            inside = [event for event in self.events.get(user, []) if event[0] >= now - span]
            result.append(
                Sums(
                    *(
                        sum(recipients for _, recipients, outcome in inside if outcome is wanted)
                        for wanted in (Outcome.DUNNO, Outcome.HOLD, Outcome.REJECT)
                    )
                )
            )
        return tuple(result)


def replay(
    spans: list[int],
    script: list[tuple],  # type: ignore[type-arg]
    after_each: Callable[[Window, Model, int], None] | None = None,
) -> tuple[Window, Model, int]:
    """A window and the model fed the same script of adds and resets (each add answered
    as the model says), `after_each(window, model, now)` after each step."""
    window = Window(spans)
    model = Model(tuple(spans))
    now = T0
    for kind, step, user, late, recipients, outcome in script:
        now += step
        if kind == "add":
            assert window.add(user, now - late, recipients, outcome, now) == (
                model.add(user, now - late, recipients, outcome, now)
                and any(now - late >= now - span for span in spans)
            )
        else:
            window.reset(user, now - late)
            model.reset(user, now - late)
        if after_each is not None:
            after_each(window, model, now)
    return window, model, now


outcomes = st.sampled_from([Outcome.DUNNO, Outcome.HOLD, Outcome.REJECT])
users = st.sampled_from(["alice", "bob", "carol"])
span_sets = st.lists(st.sampled_from([1_000, 60_000, HOUR, DAY, 7 * DAY]), min_size=1, max_size=3)
# (step forward in ms, user, how late the event is, recipients, outcome); an occasional reset.
steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("add"),
            st.integers(0, 2 * HOUR),
            users,
            st.one_of(st.just(0), st.integers(0, DAY + HOUR)),
            st.integers(0, 5000),
            outcomes,
        ),
        st.tuples(st.just("reset"), st.integers(0, HOUR), users, st.integers(0, DAY), st.just(0), outcomes),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(spans=span_sets, script=steps)
def test_window_equals_the_brute_force_model(spans: list[int], script: list[tuple]) -> None:  # type: ignore[type-arg]

    def same_sums(window: Window, model: Model, now: int) -> None:
        for name in ("alice", "bob", "carol"):
            assert window.sums(name, now) == model.sums(name, now), (name, now)
            expected = tuple(total.counted(False) for total in model.sums(name, now))
            assert window.totals(name, now, count_rejected=False) == expected
            expected = tuple(total.counted(True) for total in model.sums(name, now))
            assert window.totals(name, now, count_rejected=True) == expected

    window, _, now = replay(spans, script, same_sums)
    # Memory: nothing outside the longest window is held once time has moved on.
    later = now + max(spans) + 1
    window.expire(later)
    assert len(window) == 0
    assert window.entry_count == 0


@settings(max_examples=200, deadline=None)
@given(spans=span_sets, script=steps, cut=st.integers(0, 2 * DAY))
def test_what_is_held_gives_the_same_sums(spans: list[int], script: list[tuple], cut: int) -> None:  # type: ignore[type-arg]
    """held(): what a lost database is given back, summed like the model (per user,
    millisecond and outcome), from `since` to before `before`."""
    window, model, now = replay(spans, script)
    before = now - cut
    since = now - max(spans)
    got: dict[tuple[str, int, Outcome], int] = {}
    for user, at, recipients, outcome in window.held(since, before):
        assert since <= at < before
        got[user, at, outcome] = got.get((user, at, outcome), 0) + recipients
    want: dict[tuple[str, int, Outcome], int] = {}
    for user, events in model.events.items():
        for at, recipients, outcome in events:
            if since <= at < before:
                want[user, at, outcome] = want.get((user, at, outcome), 0) + recipients
    assert {key: value for key, value in got.items() if value} == {
        key: value for key, value in want.items() if value
    }


@settings(max_examples=200, deadline=None)
@given(spans=span_sets, script=steps, new_spans=span_sets)
def test_changing_the_spans_keeps_what_is_held(
    spans: list[int], script: list[tuple], new_spans: list[int]
) -> None:  # type: ignore[type-arg]
    """A reload to other window lengths answers as a model that always had them, for as far
    back as the old longest window reaches."""
    window, model, now = replay(spans, script)
    window.set_spans(new_spans, now)
    reach = max(spans)
    for name in ("alice", "bob", "carol"):
        got = window.sums(name, now)
        for span, total in zip(sorted(set(new_spans), reverse=True), got, strict=True):
            if span <= reach:
                [want] = Model((span,), model.events, model.floors).sums(name, now)
                assert total == want


def test_the_edge_is_exact_to_the_millisecond() -> None:
    window = Window([DAY])
    window.add("alice", T0, 9, Outcome.DUNNO, T0)
    assert window.totals("alice", T0 + DAY, False) == (9,)  # t >= now - 24h: still inside
    assert window.totals("alice", T0 + DAY + 1, False) == (0,)  # one millisecond later: out


def test_rejected_count_only_when_configured() -> None:
    window = Window([DAY])
    window.add("alice", T0, 5, Outcome.DUNNO, T0)
    window.add("alice", T0 + 1, 7, Outcome.HOLD, T0 + 1)
    window.add("alice", T0 + 2, 300, Outcome.REJECT, T0 + 2)
    assert window.totals("alice", T0 + 3, count_rejected=False) == (12,)
    assert window.totals("alice", T0 + 3, count_rejected=True) == (312,)
    assert window.sums("alice", T0 + 3) == (Sums(5, 7, 300),)


def test_several_windows_from_one_list() -> None:
    window = Window([HOUR, DAY])
    assert window.spans == (DAY, HOUR)  # longest first
    window.add("alice", T0, 100, Outcome.DUNNO, T0)
    window.add("alice", T0 + 2 * HOUR, 10, Outcome.DUNNO, T0 + 2 * HOUR)
    assert window.totals("alice", T0 + 2 * HOUR, False) == (110, 10)
    assert window.totals("alice", T0 + 3 * HOUR + 1, False) == (110, 0)
    assert window.totals("alice", T0 + DAY + 1, False) == (10, 0)


def test_a_late_event_goes_in_its_place() -> None:
    window = Window([HOUR])
    window.add("alice", T0 + 10_000, 1, Outcome.DUNNO, T0 + 10_000)
    assert window.add("alice", T0, 2, Outcome.DUNNO, T0 + 10_000)  # another relay's, 10 s old
    assert window.events("alice", T0 + 10_000) == [(T0, 2, Outcome.DUNNO), (T0 + 10_000, 1, Outcome.DUNNO)]
    assert window.totals("alice", T0 + HOUR, False) == (3,)
    assert window.totals("alice", T0 + HOUR + 1, False) == (1,)
    assert not window.add("alice", T0, 5, Outcome.DUNNO, T0 + 2 * HOUR)  # too old to count anywhere


def test_events_in_the_same_millisecond_share_an_entry() -> None:
    window = Window([HOUR])
    for _ in range(1000):
        window.add("alice", T0, 1, Outcome.DUNNO, T0)
    assert window.entry_count == 1
    assert window.totals("alice", T0, False) == (1000,)


def test_reset_forgets_now_and_later_arrivals() -> None:
    window = Window([DAY])
    window.add("alice", T0, 1400, Outcome.DUNNO, T0)
    assert window.reset("alice", T0 + 1000) == 1400
    assert window.totals("alice", T0 + 1000, False) == (0,)
    assert not window.add("alice", T0 + 500, 3, Outcome.DUNNO, T0 + 2000)  # decided before the reset
    assert window.add("alice", T0 + 1500, 3, Outcome.DUNNO, T0 + 2000)
    assert window.totals("alice", T0 + 2000, False) == (3,)


def test_remove_takes_back_one_event() -> None:
    window = Window([DAY])
    window.add("alice", T0, 4, Outcome.DUNNO, T0)
    window.add("alice", T0 + 5, 6, Outcome.HOLD, T0 + 5)
    assert window.remove("alice", T0 + 5, 6, Outcome.HOLD, T0 + 6)
    assert not window.remove("alice", T0 + 5, 6, Outcome.HOLD, T0 + 6)  # once only
    assert window.totals("alice", T0 + 6, False) == (4,)


def test_bulk_load_equals_adding_one_by_one() -> None:
    times = [T0 + 30, T0, T0 + 10, T0 + 10]
    counts = [1, 2, 3, 4]
    codes = [OUTCOME_CODES[Outcome.DUNNO], OUTCOME_CODES[Outcome.HOLD], 0, 2]
    bulk = Window([HOUR, DAY])
    bulk.load("alice", times, counts, codes, T0 + HOUR + 5)
    single = Window([HOUR, DAY])
    for at, recipients, code in sorted(zip(times, counts, codes, strict=True)):
        single.add(
            "alice", at, recipients, [Outcome.DUNNO, Outcome.HOLD, Outcome.REJECT][code], T0 + HOUR + 5
        )
    for now in (T0 + HOUR + 5, T0 + HOUR + 11, T0 + DAY + 11):
        assert bulk.sums("alice", now) == single.sums("alice", now)


def test_expired_users_are_dropped_least_recent_first() -> None:
    window = Window([HOUR])
    window.add("old", T0, 1, Outcome.DUNNO, T0)
    window.add("new", T0 + HOUR, 1, Outcome.DUNNO, T0 + HOUR)
    assert window.expire(T0 + HOUR + 1) == 1
    assert "old" not in window and "new" in window
    assert window.expire(T0 + HOUR + 1) == 0


def test_memory_does_not_grow_with_history() -> None:
    window = Window([HOUR])
    for minute in range(10 * 24 * 60):  # ten days, one message a minute
        now = T0 + minute * 60_000
        window.add("alice", now, 1, Outcome.DUNNO, now)
    assert window.totals("alice", now, False) == (61,)  # the edge is inclusive: 60 minutes ago counts
    assert window.entry_count <= 2 * 60 + 16


def test_negative_recipients_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Window([HOUR]).add("alice", T0, -1, Outcome.DUNNO, T0)
    with pytest.raises(ValueError, match="positive"):
        Window([0])
