"""The quota decision: pure functions of a message, the user's recent totals and the time.

No I/O here.  The caller (decider.py) reads the user's totals from the in-memory window
(window.py), hands them to ``decide`` and records the message with what it returns.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, time, timedelta

from policyd.protocol import PolicyRequest
from policyd.rules import ALLOW, EntryError, Matcher, RuntimeRules, make_entry

# A Postfix queue id is hexadecimal (short ids) or letters and digits (long ids,
# enable_long_queue_ids), at most 64 characters here; anything else is not recorded (the
# message is still counted).
# Stages at which Postfix knows the final recipient_count.  END-OF-MESSAGE is the one
# to use (smtpd_end_of_data_restrictions); DATA works too (smtpd_data_restrictions).
COUNTING_STAGES = frozenset({"END-OF-MESSAGE", "DATA"})


class RequestValueError(ValueError):
    """An attribute Postfix always sends well-formed is not (so the client is not Postfix)."""


class Outcome(enum.StrEnum):
    """What happened to a message; stored in the events table's `action` column."""

    DUNNO = "DUNNO"
    HOLD = "HOLD"
    REJECT = "REJECT"


# Not frozen, like Verdict: a frozen dataclass pays object.__setattr__ for every field,
# and these are made for every request.
@dataclass(slots=True)
class Message:
    """The attributes of a request that the quota looks at."""

    sasl_username: str
    sender: str
    client_address: str
    recipient_count: int
    protocol_state: str
    queue_id: str = ""

    @classmethod
    def from_request(cls, request: PolicyRequest, strip_domain: bool = False) -> Message:
        raw_count = request.get("recipient_count", "0") or "0"
        if not raw_count.isascii() or not raw_count.isdigit() or len(raw_count) > 9:
            raise RequestValueError(f"recipient_count is not a number: {raw_count[:40]!r}")
        # SASL back-ends compare names case-insensitively; counting "Bob" and "bob"
        # apart would let a phished account dodge its quota by changing case.
        username = request.get("sasl_username").lower()
        if strip_domain and "@" in username:
            username = strip_login_domain(username)
        return cls(
            sasl_username=username,
            sender=request.get("sender"),
            client_address=request.get("client_address"),
            recipient_count=int(raw_count),
            protocol_state=request.get("protocol_state").upper(),
            queue_id=queue_id
            if (queue_id := request.get("queue_id")).isalnum() and queue_id.isascii() and len(queue_id) <= 64
            else "",
        )


def strip_login_domain(username: str) -> str:
    """go-policyd's cut: "jdoe@univ.fr" counted as "jdoe" (at the first "@").  A name
    that is nothing but "@domain" is kept whole: cut, it would read as unauthenticated."""
    local = username.split("@", 1)[0]
    return local or username


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `hold` recipients per `window` before HOLD, and REJECT from `reject`."""

    hold: int
    reject: int
    window: timedelta
    # How the limit is named in log lines and replies; "" for the primary limit
    # (defaultquota / rejectquota / window), whose lines stay go-policyd's.
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"{self.hold}/{_duration_text(self.window)}"


def _duration_text(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0 and seconds >= size and not (unit == "d" and seconds < 2 * 86400):
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(slots=True)
class Verdict:
    """The answer to Postfix, whether (and how) the message is recorded, and why.

    For a counted message, `totals` holds the user's recipients in each limit's window
    (this message included, in the order of QuotaRules.limits) and `limit` the limit
    that decided a HOLD or REJECT (None when within every limit).
    """

    action: str
    outcome: Outcome
    record: bool
    reason: str
    totals: tuple[int, ...] = ()
    limit: Limit | None = None
    # The total in the deciding limit's window (the first limit's when within all).
    total: int = 0
    # The list entry of the database that decided (policyd allow / block), if one did.
    entry: str = ""


_DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HOURS_RE = re.compile(
    r"^\s*([a-z]{3})(?:\s*-\s*([a-z]{3}))?\s+(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$"
)


@dataclass(frozen=True, slots=True)
class HoursRange:
    days: frozenset[int]  # 0 = Monday, as datetime.weekday()
    start: time
    end: time  # exclusive

    def contains(self, moment: datetime) -> bool:
        now = moment.time()
        # time.max stands for 24:00, the end of the day: no time of day is after it.
        in_hours = self.start <= now and (now < self.end or self.end == time.max)
        return moment.weekday() in self.days and in_hours


@dataclass(frozen=True, slots=True)
class OfficeHours:
    """When whitelisted senders are not counted (local time of the relay)."""

    ranges: tuple[HoursRange, ...]
    spec: str

    def contains(self, moment: datetime) -> bool:
        return any(hours.contains(moment) for hours in self.ranges)

    @classmethod
    def parse(cls, spec: str) -> OfficeHours:
        """Parse ``Mon-Fri 07:00-20:00`` (several ranges separated by ``;``), ``always`` or ``never``."""
        text = spec.strip().lower()
        if text == "always":
            return cls((HoursRange(frozenset(range(7)), time(0, 0), time.max),), spec)
        if text == "never":
            return cls((), spec)
        ranges = []
        for part in text.split(";"):
            match = _HOURS_RE.match(part)
            if not match:
                raise ValueError(f"{part.strip()!r} is not like 'Mon-Fri 07:00-20:00'")
            first_day, last_day, start_h, start_m, end_h, end_m = match.groups()
            for day in (first_day, last_day):
                if day is not None and day not in _DAY_NAMES:
                    raise ValueError(f"unknown day {day!r} (use Mon Tue Wed Thu Fri Sat Sun)")
            first = _DAY_NAMES.index(first_day)
            last = _DAY_NAMES.index(last_day) if last_day else first
            days = range(first, last + 1) if first <= last else [*range(first, 7), *range(0, last + 1)]
            try:
                start = time(int(start_h), int(start_m))
                end = time.max if (end_h, end_m) in {("24", "00")} else time(int(end_h), int(end_m))
            except ValueError as error:
                raise ValueError(f"bad time in {part.strip()!r}: {error}") from None
            if end <= start:
                raise ValueError(f"in {part.strip()!r} the end is not after the start")
            ranges.append(HoursRange(frozenset(days), start, end))
        return cls(tuple(ranges), spec)


DEFAULT_OFFICE_HOURS = "Mon-Fri 07:00-20:00"


@dataclass(frozen=True, slots=True)
class QuotaRules:
    """Everything the decision depends on apart from the message, the totals and the time."""

    quota: int = 1500
    reject_quota: int = 3000
    window: timedelta = timedelta(hours=24)
    count_rejected: bool = False
    unauthenticated_action: str = "DUNNO"
    whitelist: frozenset[str] = field(default_factory=frozenset)  # lower-cased
    blacklist: frozenset[str] = field(default_factory=frozenset)  # lower-cased
    whitelist_hours: OfficeHours = field(default_factory=lambda: OfficeHours.parse(DEFAULT_OFFICE_HOURS))
    # Limits beyond the primary one (quota / reject_quota / window), e.g. 300 per hour.
    extra_limits: tuple[Limit, ...] = ()
    # The primary limit first, then the others: the order of Verdict.totals.
    limits: tuple[Limit, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        primary = Limit(self.quota, self.reject_quota, self.window)
        object.__setattr__(self, "limits", (primary, *self.extra_limits))

    def listed(self, names: frozenset[str], message: Message) -> bool:
        """Whether a configuration file entry (whitelist or blacklist) matches: users,
        senders, @domains, client addresses and networks, compared as such (rules.py)."""
        return bool(names) and (
            _config_matcher(names).match(message.sasl_username, message.sender, message.client_address)
            is not None
        )


@functools.lru_cache(maxsize=8)
def _config_matcher(names: frozenset[str]) -> Matcher:
    # The kind (allow) only decides how senders are matched: as go-policyd did, for both
    # lists.  An entry that can never match (config.py refuses it in a file) is left out.
    entries = []
    for name in sorted(names):
        try:
            entries.append(make_entry(ALLOW, name, source="config"))
        except EntryError:
            continue
    return Matcher(entries)


def precheck(
    rules: QuotaRules,
    message: Message,
    local_now: datetime,
    runtime: RuntimeRules | None = None,
    now_ms: int = 0,
) -> Verdict | None:
    """The verdict for a message that needs no total, or None if it must be counted.

    ``local_now`` is the relay's local time (office hours are local); it is read only
    when a whitelist entry matches.  ``runtime``: the database's allow and block entries
    (at ``now_ms``): a block wins over any allow, the file's blacklist over everything.
    """
    if message.protocol_state not in COUNTING_STAGES:
        return Verdict("DUNNO", Outcome.DUNNO, record=False, reason="not a counting stage")
    if not message.sasl_username:
        outcome = outcome_of_action(rules.unauthenticated_action)
        return Verdict(rules.unauthenticated_action, outcome, record=False, reason="unauthenticated")
    if rules.listed(rules.blacklist, message):
        return Verdict("HOLD blacklisted", Outcome.HOLD, record=False, reason="blacklisted")
    lists = runtime is not None and runtime.has_lists
    if lists:
        assert runtime is not None
        block = runtime.blocked(message.sasl_username, message.sender, message.client_address, now_ms)
        if block is not None:
            outcome = Outcome.REJECT if block.action == "REJECT" else Outcome.HOLD
            action = "REJECT blocked" if outcome is Outcome.REJECT else "HOLD blocked"
            return Verdict(action, outcome, record=False, reason="blocked", entry=block.describe())
    if rules.listed(rules.whitelist, message) and rules.whitelist_hours.contains(local_now):
        return Verdict("DUNNO", Outcome.DUNNO, record=False, reason="whitelisted")
    if lists:
        assert runtime is not None
        allow = runtime.allowed(message.sasl_username, message.sender, message.client_address, now_ms)
        if allow is not None:
            return Verdict("DUNNO", Outcome.DUNNO, record=False, reason="allowed", entry=allow.describe())
    return None


_HOLD_ACTION = "HOLD quota exceeded"
_REJECT_ACTION = "REJECT max quota exceeded"


def decide(rules: QuotaRules, totals: Sequence[int]) -> Verdict:
    """The verdict for a counted message, given the user's total in each limit's window
    *including* this message (in the order of ``rules.limits``).

    The strictest outcome over all limits wins; between limits with the same outcome,
    the first (the primary limit comes first).
    """
    limits = rules.limits
    if len(totals) != len(limits):
        raise ValueError(f"{len(totals)} totals for {len(limits)} limits")
    worst = -1
    worst_rank = 0
    for index, (limit, total) in enumerate(zip(limits, totals, strict=True)):
        rank = 2 if total >= limit.reject else 1 if total >= limit.hold else 0
        if rank > worst_rank:
            worst, worst_rank = index, rank
    totals = tuple(totals)
    if worst < 0:
        return Verdict(
            "DUNNO", Outcome.DUNNO, record=True, reason="within quota", totals=totals, total=totals[0]
        )
    limit = limits[worst]
    named = f" ({limit.label})" if limit.name or worst > 0 else ""
    if worst_rank == 2:
        action, outcome, reason = _REJECT_ACTION + named, Outcome.REJECT, "over reject quota"
    else:
        action, outcome, reason = _HOLD_ACTION + named, Outcome.HOLD, "over quota"
    return Verdict(
        action, outcome, record=True, reason=reason, totals=totals, limit=limit, total=totals[worst]
    )


def decide_quota(rules: QuotaRules, recipients_last_24h: int) -> Verdict:
    """The verdict for a counted message under the primary limit alone (its total
    including this message)."""
    return decide(replace(rules, extra_limits=()), (recipients_last_24h,))


def counted_outcomes(rules: QuotaRules) -> tuple[Outcome, ...]:
    """Outcomes whose recipients count toward the total (held mail may be released)."""
    if rules.count_rejected:
        return (Outcome.DUNNO, Outcome.HOLD, Outcome.REJECT)
    return (Outcome.DUNNO, Outcome.HOLD)


def outcome_of_action(action: str) -> Outcome:
    """How a configured action (db_error_action, ...) is recorded: was the message sent?"""
    word = action.split(None, 1)[0].upper() if action.strip() else "DUNNO"
    if word in {"HOLD"}:
        return Outcome.HOLD
    if word in {"REJECT", "DEFER", "DEFER_IF_PERMIT"} or word[:1] in {"4", "5"}:
        return Outcome.REJECT
    return Outcome.DUNNO
