"""One user as `policyd user` shows it: pure, from the user's events, the rules and the time.

The totals are what the quota counts (quota.counted_outcomes, nothing before the user's
last reset), in each limit's window, the user's overrides in place.  "Back under" is when
the total drops below the limit's HOLD threshold if nothing more is sent: the moment the
oldest events that keep it up leave the window.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from policyd.clock import MILLISECOND, from_ms, to_ms
from policyd.quota import Limit, QuotaRules, counted_outcomes
from policyd.rules import ListEntry, Override, Reset
from policyd.storage import Event


@dataclass(frozen=True, slots=True)
class LimitState:
    limit: Limit
    total: int
    state: str  # ok, held, rejected
    back_under: datetime | None  # None: under it already


@dataclass(frozen=True, slots=True)
class UserView:
    user: str
    state: str
    limits: list[LimitState]
    overrides: list[Override]
    entries: list[ListEntry]
    reset: Reset | None
    senders: list[tuple[str, int]]  # (sender, recipients) in the longest window
    client_addresses: list[tuple[str, int]]
    events: list[tuple[Event, bool]]  # (event, counted), newest first


_RANK = {"ok": 0, "held": 1, "rejected": 2}


def user_view(
    user: str,
    events: Sequence[Event],
    *,
    rules: QuotaRules,
    overrides: Sequence[Override],
    entries: Sequence[ListEntry],
    resets: Sequence[Reset],
    now: datetime,
    recent: int = 20,
) -> UserView:
    """`events`: the user's events of the longest window, oldest first; `rules`: with the
    user's overrides in place already."""
    now_ms = to_ms(now)
    mine = [reset for reset in resets if reset.sasl_username == user]
    reset = max(mine, key=lambda item: item.before_ms, default=None)
    floor = reset.before_ms if reset is not None else None
    outcomes = set(counted_outcomes(rules))

    def counted(event: Event) -> bool:
        return event.outcome in outcomes and (floor is None or to_ms(event.ts) >= floor)

    states = []
    for limit in rules.limits:
        since = now_ms - limit.window // MILLISECOND
        inside = [event for event in events if to_ms(event.ts) >= since and counted(event)]
        total = sum(event.recipient_count for event in inside)
        state = "rejected" if total >= limit.reject else "held" if total >= limit.hold else "ok"
        back_under = None
        remaining = total
        for event in inside:
            if remaining < limit.hold:
                break
            remaining -= event.recipient_count
            back_under = from_ms(to_ms(event.ts) + limit.window // MILLISECOND + 1)
        states.append(LimitState(limit, total, state, back_under))
    longest = max(limit.window for limit in rules.limits)
    window_events = [event for event in events if event.ts >= now - longest]
    senders: dict[str, int] = {}
    addresses: dict[str, int] = {}
    for event in window_events:
        senders[event.sender] = senders.get(event.sender, 0) + event.recipient_count
        addresses[event.client_address] = addresses.get(event.client_address, 0) + event.recipient_count
    worst = max((item.state for item in states), key=_RANK.__getitem__, default="ok")
    return UserView(
        user=user,
        state=worst,
        limits=states,
        overrides=[item for item in overrides if item.sasl_username == user and item.active(now_ms)],
        entries=list(entries),
        reset=reset,
        senders=sorted(senders.items(), key=lambda item: (-item[1], item[0])),
        client_addresses=sorted(addresses.items(), key=lambda item: (-item[1], item[0])),
        events=[(event, counted(event)) for event in reversed(window_events[-recent:])] if recent else [],
    )


def window_of(rules: QuotaRules) -> timedelta:
    return max(limit.window for limit in rules.limits)
