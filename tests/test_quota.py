"""The quota decision as pure functions: thresholds, stages, lists, office hours, the 24h window."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.protocol import PolicyRequest, RequestParser
from policyd.quota import (
    COUNTING_STAGES,
    DEFAULT_OFFICE_HOURS,
    Limit,
    Message,
    OfficeHours,
    Outcome,
    QuotaRules,
    RequestValueError,
    Verdict,
    counted_outcomes,
    decide,
    decide_quota,
    precheck,
)

GOLDEN_DIR = Path(__file__).parent / "golden"

# A week of June 2024, local time (naive: office hours are wall-clock times of the relay).
MONDAY = datetime(2024, 6, 3)
WEDNESDAY = datetime(2024, 6, 5)
FRIDAY = datetime(2024, 6, 7)
SATURDAY = datetime(2024, 6, 8)
SUNDAY = datetime(2024, 6, 9)

DUNNO = "DUNNO"
HOLD = "HOLD quota exceeded"
REJECT = "REJECT max quota exceeded"


def at(day: datetime, hour: int, minute: int = 0, second: int = 0, microsecond: int = 0) -> datetime:
    return day.replace(hour=hour, minute=minute, second=second, microsecond=microsecond)


def request(**overrides: str) -> PolicyRequest:
    """An END-OF-MESSAGE request of an authenticated user, with attributes overridden."""
    attributes = {
        "request": "smtpd_access_policy",
        "protocol_state": "END-OF-MESSAGE",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.45",
        "sender": "alice@example.org",
        "recipient_count": "1",
        "sasl_method": "PLAIN",
        "sasl_username": "alice@example.org",
    }
    attributes.update(overrides)
    return PolicyRequest(attributes)


def message(**overrides: str) -> Message:
    return Message.from_request(request(**overrides))


def golden(name: str) -> PolicyRequest:
    [parsed] = RequestParser().feed((GOLDEN_DIR / f"{name}.txt").read_bytes())
    return parsed


def test_calendar_of_the_tests() -> None:
    assert [day.strftime("%a") for day in (MONDAY, WEDNESDAY, FRIDAY, SATURDAY, SUNDAY)] == [
        "Mon",
        "Wed",
        "Fri",
        "Sat",
        "Sun",
    ]


# ---------------------------------------------------------------------------
# thresholds
# ---------------------------------------------------------------------------


def test_defaults() -> None:
    rules = QuotaRules()
    assert (rules.quota, rules.reject_quota) == (1500, 3000)
    assert rules.window == timedelta(hours=24)
    assert rules.count_rejected is False
    assert rules.unauthenticated_action == "DUNNO"
    assert rules.whitelist_hours.spec == DEFAULT_OFFICE_HOURS == "Mon-Fri 07:00-20:00"
    assert sorted(COUNTING_STAGES) == ["DATA", "END-OF-MESSAGE"]


@pytest.mark.parametrize(
    ("total", "action", "outcome"),
    [
        (0, DUNNO, Outcome.DUNNO),
        (1, DUNNO, Outcome.DUNNO),
        (1499, DUNNO, Outcome.DUNNO),
        (1500, HOLD, Outcome.HOLD),
        (1501, HOLD, Outcome.HOLD),
        (2999, HOLD, Outcome.HOLD),
        (3000, REJECT, Outcome.REJECT),
        (3001, REJECT, Outcome.REJECT),
        (10**9, REJECT, Outcome.REJECT),
    ],
)
def test_default_thresholds(total: int, action: str, outcome: Outcome) -> None:
    verdict = decide_quota(QuotaRules(), total)
    assert (verdict.action, verdict.outcome) == (action, outcome)
    assert verdict.record is True  # every counted message is recorded, rejected ones too


@pytest.mark.parametrize(
    ("quota", "reject_quota", "total", "action"),
    [
        (10, 25, 9, DUNNO),
        (10, 25, 10, HOLD),
        (10, 25, 24, HOLD),
        (10, 25, 25, REJECT),
        (1, 2, 0, DUNNO),
        (1, 2, 1, HOLD),
        (1, 2, 2, REJECT),
        # reject_quota == quota: nothing is ever held, over the quota is rejected
        (10, 10, 9, DUNNO),
        (10, 10, 10, REJECT),
        (10, 10, 11, REJECT),
        (5000, 5000, 4999, DUNNO),
        (5000, 5000, 5000, REJECT),
    ],
)
def test_custom_thresholds(quota: int, reject_quota: int, total: int, action: str) -> None:
    assert decide_quota(QuotaRules(quota=quota, reject_quota=reject_quota), total).action == action


def test_verdict_reasons() -> None:
    rules = QuotaRules()
    [primary] = rules.limits
    assert primary == Limit(1500, 3000, timedelta(hours=24))
    assert decide_quota(rules, 1) == Verdict(
        DUNNO, Outcome.DUNNO, record=True, reason="within quota", totals=(1,), total=1
    )
    assert decide_quota(rules, 1500) == Verdict(
        HOLD, Outcome.HOLD, record=True, reason="over quota", totals=(1500,), limit=primary, total=1500
    )
    assert decide_quota(rules, 3000) == Verdict(
        REJECT,
        Outcome.REJECT,
        record=True,
        reason="over reject quota",
        totals=(3000,),
        limit=primary,
        total=3000,
    )


HOUR_LIMIT = Limit(300, 600, timedelta(hours=1), name="hourly")


def test_the_strictest_limit_decides_and_is_named() -> None:
    rules = QuotaRules(extra_limits=(HOUR_LIMIT,))
    assert [limit.window for limit in rules.limits] == [timedelta(hours=24), timedelta(hours=1)]
    within = decide(rules, (1000, 299))
    assert (within.action, within.limit, within.totals) == (DUNNO, None, (1000, 299))
    hourly = decide(rules, (1000, 300))
    assert (hourly.action, hourly.limit, hourly.total) == ("HOLD quota exceeded (hourly)", HOUR_LIMIT, 300)
    # The primary limit keeps go-policyd's words; a REJECT anywhere beats a HOLD anywhere.
    assert decide(rules, (1500, 300)).action == HOLD
    assert decide(rules, (1500, 600)).action == "REJECT max quota exceeded (hourly)"
    assert decide(rules, (3000, 600)).action == REJECT
    unnamed = decide(QuotaRules(extra_limits=(Limit(10, 20, timedelta(minutes=5)),)), (1, 10))
    assert unnamed.action == "HOLD quota exceeded (10/5m)"
    with pytest.raises(ValueError, match="2 limits"):
        decide(rules, (1,))


@settings(max_examples=300, deadline=None)
@given(totals=st.lists(st.integers(0, 5000), min_size=3, max_size=3))
def test_several_limits_are_the_strictest_of_each_alone(totals: list[int]) -> None:
    limits = (Limit(1000, 2000, timedelta(hours=1)), Limit(400, 800, timedelta(minutes=10)))
    rules = QuotaRules(quota=1500, reject_quota=3000, extra_limits=limits)
    alone = [
        decide(QuotaRules(quota=limit.hold, reject_quota=limit.reject, window=limit.window), (total,)).outcome
        for limit, total in zip(rules.limits, totals, strict=True)
    ]
    assert decide(rules, totals).outcome == max(alone, key=_RANK.__getitem__)


_RANK = {Outcome.DUNNO: 0, Outcome.HOLD: 1, Outcome.REJECT: 2}


@settings(max_examples=100, deadline=None)
@given(
    quota=st.integers(1, 10_000),
    extra=st.integers(0, 10_000),
    totals=st.lists(st.integers(0, 30_000), min_size=2, max_size=10),
)
def test_decision_never_gets_milder_as_the_total_grows(quota: int, extra: int, totals: list[int]) -> None:
    rules = QuotaRules(quota=quota, reject_quota=quota + extra)
    ranks = [_RANK[decide_quota(rules, total).outcome] for total in sorted(totals)]
    assert ranks == sorted(ranks)
    assert decide_quota(rules, quota - 1).outcome is Outcome.DUNNO
    assert decide_quota(rules, quota + extra).outcome is Outcome.REJECT


def test_counted_outcomes() -> None:
    assert set(counted_outcomes(QuotaRules())) == {Outcome.DUNNO, Outcome.HOLD}
    assert Outcome.REJECT not in counted_outcomes(QuotaRules())
    assert set(counted_outcomes(QuotaRules(count_rejected=True))) == {
        Outcome.DUNNO,
        Outcome.HOLD,
        Outcome.REJECT,
    }


def test_outcomes_are_the_stored_strings() -> None:
    assert [outcome.value for outcome in Outcome] == ["DUNNO", "HOLD", "REJECT"]
    assert Outcome.HOLD == "HOLD"


# ---------------------------------------------------------------------------
# Message.from_request
# ---------------------------------------------------------------------------


def test_message_from_request() -> None:
    assert message() == Message(
        sasl_username="alice@example.org",
        sender="alice@example.org",
        client_address="192.0.2.45",
        recipient_count=1,
        protocol_state="END-OF-MESSAGE",
    )


def test_usernames_are_lower_cased_so_case_variants_share_a_quota() -> None:
    variants = ["Bob", "bob", "BOB", "bOb"]
    assert {message(sasl_username=name).sasl_username for name in variants} == {"bob"}
    assert message(sasl_username="Zoë@Exämple.ORG").sasl_username == "zoë@exämple.org"


def test_protocol_state_is_upper_cased() -> None:
    assert message(protocol_state="end-of-message").protocol_state == "END-OF-MESSAGE"
    assert message(protocol_state="Data").protocol_state == "DATA"


def test_huge_usernames_are_accepted() -> None:
    name = "U" * 100_000 + "@Example.org"
    assert message(sasl_username=name).sasl_username == name.lower()


@pytest.mark.parametrize(
    ("raw", "count"), [("0", 0), ("1", 1), ("3000", 3000), ("007", 7), ("999999999", 999_999_999)]
)
def test_recipient_count(raw: str, count: int) -> None:
    assert message(recipient_count=raw).recipient_count == count


@pytest.mark.parametrize(
    "raw",
    [
        "abc",
        "-1",
        "+5",
        "1.5",
        "1e3",
        "0x10",
        " 12",
        "12 ",
        "1 000",
        "１２",
        "٣",
        "²",
        "1234567890",
        "9" * 1000,
    ],
)
def test_invalid_recipient_count_is_refused(raw: str) -> None:
    with pytest.raises(RequestValueError, match="recipient_count is not a number"):
        message(recipient_count=raw)


def test_invalid_recipient_count_is_shown_shortened() -> None:
    with pytest.raises(RequestValueError) as caught:
        message(recipient_count="x" * 10_000)
    assert len(str(caught.value)) < 100


def test_missing_or_empty_recipient_count_is_zero() -> None:
    # Current behaviour (quota.py defaults a missing or empty value to 0); Postfix always sends it.
    attributes = dict(request().attributes)
    del attributes["recipient_count"]
    assert Message.from_request(PolicyRequest(attributes)).recipient_count == 0
    assert message(recipient_count="").recipient_count == 0


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("4ABCDEF", "4ABCDEF"),
        ("4Sg9Zx1Y4Nz9vBt", "4Sg9Zx1Y4Nz9vBt"),
        ("", ""),
        ("x" * 65, ""),
        ("4AB;DROP", ""),
    ],
)
def test_queue_id_is_kept_only_when_it_looks_like_postfixs(sent: str, kept: str) -> None:
    assert message(queue_id=sent).queue_id == kept


def test_request_value_error_is_a_value_error() -> None:
    assert issubclass(RequestValueError, ValueError)


def test_golden_requests_become_messages() -> None:
    eom = Message.from_request(golden("end-of-message"))
    assert eom == Message(
        "alice@example.org",
        "alice@example.org",
        "192.0.2.45",
        3,
        "END-OF-MESSAGE",
        queue_id="4Sg9Zx1Y4Nz9vBt",
    )
    data = Message.from_request(golden("data"))
    assert (data.sasl_username, data.sender, data.recipient_count) == (
        "bob.smith@example.com",
        "Bob.Smith@Example.COM",
        1,
    )
    assert Message.from_request(golden("rcpt")).recipient_count == 0
    assert Message.from_request(golden("unauthenticated")).sasl_username == ""
    assert Message.from_request(golden("smtputf8")).sasl_username == "jürgen@bücher.example"


@pytest.mark.parametrize(
    ("name", "counted"),
    [
        ("end-of-message", True),
        ("data", True),
        ("smtputf8", True),
        ("rcpt", False),
        ("unauthenticated", False),
    ],
)
def test_golden_requests_prechecked(name: str, counted: bool) -> None:
    verdict = precheck(QuotaRules(), Message.from_request(golden(name)), at(WEDNESDAY, 12))
    if counted:
        assert verdict is None
    else:
        assert verdict is not None
        assert (verdict.action, verdict.record) == (DUNNO, False)


# ---------------------------------------------------------------------------
# stages and unauthenticated mail
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["END-OF-MESSAGE", "DATA", "end-of-message", "data", "End-Of-Message"])
def test_counting_stages_are_counted(stage: str) -> None:
    assert (
        precheck(QuotaRules(), message(protocol_state=stage, recipient_count="50"), at(SATURDAY, 12)) is None
    )


@pytest.mark.parametrize(
    "stage", ["RCPT", "rcpt", "MAIL", "CONNECT", "EHLO", "HELO", "VRFY", "ETRN", "BDAT", ""]
)
def test_other_stages_are_dunno_and_not_recorded(stage: str) -> None:
    verdict = precheck(QuotaRules(), message(protocol_state=stage, recipient_count="5000"), at(SATURDAY, 12))
    assert verdict == Verdict(DUNNO, Outcome.DUNNO, record=False, reason="not a counting stage")


def test_missing_stage_is_not_counted() -> None:
    attributes = dict(request().attributes)
    del attributes["protocol_state"]
    verdict = precheck(QuotaRules(), Message.from_request(PolicyRequest(attributes)), at(SATURDAY, 12))
    assert verdict is not None
    assert verdict.record is False


@pytest.mark.parametrize("stage", ["END-OF-MESSAGE", "DATA"])
def test_unauthenticated_is_dunno_and_not_recorded_by_default(stage: str) -> None:
    verdict = precheck(QuotaRules(), message(sasl_username="", protocol_state=stage), at(SATURDAY, 12))
    assert verdict == Verdict(DUNNO, Outcome.DUNNO, record=False, reason="unauthenticated")
    attributes = dict(request().attributes)
    del attributes["sasl_username"]
    assert (
        precheck(QuotaRules(), Message.from_request(PolicyRequest(attributes)), at(SATURDAY, 12)) == verdict
    )


@pytest.mark.parametrize(
    ("action", "outcome"),
    [
        ("REJECT authentication required", Outcome.REJECT),
        ("reject", Outcome.REJECT),
        ("HOLD", Outcome.HOLD),
        ("hold unauthenticated", Outcome.HOLD),
        ("DEFER try later", Outcome.REJECT),
        ("DEFER_IF_PERMIT try later", Outcome.REJECT),
        ("554 5.7.1 authenticate first", Outcome.REJECT),
        ("450 4.7.1 later", Outcome.REJECT),
        ("OK", Outcome.DUNNO),
        ("DUNNO", Outcome.DUNNO),
        ("PREPEND X-Unauthenticated: yes", Outcome.DUNNO),
        ("", Outcome.DUNNO),
    ],
)
def test_custom_unauthenticated_action(action: str, outcome: Outcome) -> None:
    rules = QuotaRules(unauthenticated_action=action)
    verdict = precheck(rules, message(sasl_username=""), at(WEDNESDAY, 12))
    assert verdict == Verdict(action, outcome, record=False, reason="unauthenticated")


def test_unauthenticated_action_does_not_apply_outside_counting_stages() -> None:
    rules = QuotaRules(unauthenticated_action="REJECT authentication required")
    verdict = precheck(rules, message(sasl_username="", protocol_state="RCPT"), at(WEDNESDAY, 12))
    assert verdict is not None
    assert verdict.action == DUNNO


# ---------------------------------------------------------------------------
# blacklist and whitelist
# ---------------------------------------------------------------------------

BLACKLISTED = Verdict("HOLD blacklisted", Outcome.HOLD, record=False, reason="blacklisted")
WHITELISTED = Verdict(DUNNO, Outcome.DUNNO, record=False, reason="whitelisted")


def test_unlisted_messages_are_counted() -> None:
    rules = QuotaRules(
        whitelist=frozenset({"carol@example.org"}), blacklist=frozenset({"mallory@example.org"})
    )
    assert precheck(rules, message(), at(WEDNESDAY, 12)) is None


@pytest.mark.parametrize(
    ("listed", "overrides"),
    [
        ("alice@example.org", {"sasl_username": "Alice@Example.ORG"}),
        ("alice@example.org", {"sasl_username": "alice@example.org"}),
        ("spam@example.com", {"sender": "Spam@EXAMPLE.com"}),
        ("spam@example.com", {"sender": "spam@example.com"}),
        ("192.0.2.99", {"client_address": "192.0.2.99"}),
        ("2001:db8::1", {"client_address": "2001:DB8::1"}),
    ],
)
@pytest.mark.parametrize("moment", [at(WEDNESDAY, 12), at(WEDNESDAY, 23), at(SATURDAY, 12)])
def test_blacklist_matches_username_sender_or_ip_case_insensitively(
    listed: str, overrides: dict[str, str], moment: datetime
) -> None:
    rules = QuotaRules(blacklist=frozenset({listed}))
    assert precheck(rules, message(**overrides), moment) == BLACKLISTED


@pytest.mark.parametrize(
    ("listed", "overrides"),
    [
        ("alice@example.org", {"sasl_username": "ALICE@example.org"}),
        ("newsletter@example.org", {"sender": "Newsletter@Example.org"}),
        ("192.0.2.99", {"client_address": "192.0.2.99"}),
        ("2001:db8::1", {"client_address": "2001:DB8::1"}),
    ],
)
def test_whitelist_matches_username_sender_or_ip_case_insensitively(
    listed: str, overrides: dict[str, str]
) -> None:
    rules = QuotaRules(whitelist=frozenset({listed}))
    assert precheck(rules, message(**overrides), at(WEDNESDAY, 12)) == WHITELISTED
    assert precheck(rules, message(**overrides), at(WEDNESDAY, 21)) is None  # counted outside office hours


def test_near_misses_do_not_match() -> None:
    rules = QuotaRules(blacklist=frozenset({"alice@example.org", "192.0.2.4"}))
    assert (
        precheck(rules, message(sasl_username="alice@example.org.evil", sender="x@y"), at(WEDNESDAY, 12))
        is None
    )
    assert (
        precheck(rules, message(sasl_username="bob", sender="alice@example.org "), at(WEDNESDAY, 12)) is None
    )
    assert (
        precheck(
            rules, message(sasl_username="bob", sender="x@y", client_address="192.0.2.45"), at(WEDNESDAY, 12)
        )
        is None
    )


def test_empty_sender_does_not_match_an_empty_entry() -> None:
    # A bounce has the null sender; an empty list entry must not whitelist every bounce.
    rules = QuotaRules(whitelist=frozenset({""}), blacklist=frozenset({""}))
    assert precheck(rules, message(sender=""), at(WEDNESDAY, 12)) is None


@pytest.mark.parametrize(
    "moment", [at(WEDNESDAY, 12), at(WEDNESDAY, 3), at(SATURDAY, 12), at(FRIDAY, 19, 59)]
)
def test_blacklist_beats_whitelist(moment: datetime) -> None:
    rules = QuotaRules(whitelist=frozenset({"alice@example.org"}), blacklist=frozenset({"192.0.2.45"}))
    assert precheck(rules, message(), moment) == BLACKLISTED
    rules = QuotaRules(whitelist=frozenset({"alice@example.org"}), blacklist=frozenset({"alice@example.org"}))
    assert precheck(rules, message(), moment) == BLACKLISTED


@pytest.mark.parametrize(
    ("moment", "exempt"),
    [
        (at(FRIDAY, 19, 59), True),
        (at(FRIDAY, 19, 59, 59, 999_999), True),
        (at(FRIDAY, 20, 0), False),
        (at(FRIDAY, 23, 59), False),
        (at(MONDAY, 6, 59), False),
        (at(MONDAY, 6, 59, 59, 999_999), False),
        (at(MONDAY, 7, 0), True),
        (at(WEDNESDAY, 12), True),
        (at(WEDNESDAY, 0), False),
        (at(SATURDAY, 12), False),  # Saturday is not office hours
        (at(SATURDAY, 7), False),
        (at(SUNDAY, 12), False),
    ],
)
def test_whitelist_applies_only_during_default_office_hours(moment: datetime, exempt: bool) -> None:
    rules = QuotaRules(whitelist=frozenset({"alice@example.org"}))
    verdict = precheck(rules, message(recipient_count="5000"), moment)
    if exempt:
        assert verdict == WHITELISTED
    else:
        assert verdict is None  # counted like anyone else


def test_office_hours_are_read_on_the_local_wall_clock() -> None:
    rules = QuotaRules(whitelist=frozenset({"alice@example.org"}))
    plus_two = timezone(timedelta(hours=2))
    # 19:59 in UTC+2 is 17:59 UTC, 20:30 in UTC+2 is 18:30 UTC: the local reading decides.
    assert precheck(rules, message(), datetime(2024, 6, 7, 19, 59, tzinfo=plus_two)) == WHITELISTED
    assert precheck(rules, message(), datetime(2024, 6, 7, 20, 30, tzinfo=plus_two)) is None


def test_custom_whitelist_hours() -> None:
    always = QuotaRules(
        whitelist=frozenset({"alice@example.org"}), whitelist_hours=OfficeHours.parse("always")
    )
    never = QuotaRules(whitelist=frozenset({"alice@example.org"}), whitelist_hours=OfficeHours.parse("never"))
    weekend = QuotaRules(
        whitelist=frozenset({"alice@example.org"}), whitelist_hours=OfficeHours.parse("Sat-Sun 00:00-24:00")
    )
    for moment in (at(SATURDAY, 3), at(WEDNESDAY, 12), at(SUNDAY, 23, 59, 59, 999_999)):
        assert precheck(always, message(), moment) == WHITELISTED
        assert precheck(never, message(), moment) is None
    assert precheck(weekend, message(), at(SATURDAY, 3)) == WHITELISTED
    assert precheck(weekend, message(), at(WEDNESDAY, 12)) is None


# ---------------------------------------------------------------------------
# OfficeHours.parse
# ---------------------------------------------------------------------------


def hours_of(spec: str, *moments: datetime) -> list[bool]:
    hours = OfficeHours.parse(spec)
    return [hours.contains(moment) for moment in moments]


def test_default_office_hours() -> None:
    hours = OfficeHours.parse(DEFAULT_OFFICE_HOURS)
    assert hours.spec == DEFAULT_OFFICE_HOURS
    for day in (MONDAY, WEDNESDAY, FRIDAY):
        assert hours.contains(at(day, 7))
        assert hours.contains(at(day, 19, 59, 59, 999_999))
        assert not hours.contains(at(day, 6, 59, 59, 999_999))
        assert not hours.contains(at(day, 20))
    for day in (SATURDAY, SUNDAY):
        assert not any(hours.contains(at(day, hour)) for hour in range(24))


def test_several_ranges() -> None:
    spec = "Sat 10:00-12:00; Sun 10:00-12:00"
    assert hours_of(spec, at(SATURDAY, 10), at(SATURDAY, 11, 59), at(SUNDAY, 10, 30)) == [True, True, True]
    assert (
        hours_of(spec, at(SATURDAY, 9, 59), at(SATURDAY, 12), at(SUNDAY, 12), at(MONDAY, 11)) == [False] * 4
    )


def test_day_range_wraps_around_the_week() -> None:
    spec = "Fri-Mon 09:00-17:00"
    inside = [at(day, 12) for day in (FRIDAY, SATURDAY, SUNDAY, MONDAY)]
    outside = [at(MONDAY + timedelta(days=offset), 12) for offset in (1, 2, 3)]  # Tue, Wed, Thu
    assert hours_of(spec, *inside) == [True] * 4
    assert hours_of(spec, *outside) == [False] * 3
    assert hours_of(spec, at(SATURDAY, 8, 59), at(SATURDAY, 17)) == [False, False]


def test_single_day_and_same_day_range() -> None:
    assert hours_of("Wed 08:00-09:00", at(WEDNESDAY, 8, 30), at(MONDAY, 8, 30)) == [True, False]
    assert hours_of("Wed-Wed 08:00-09:00", at(WEDNESDAY, 8, 30), at(MONDAY, 8, 30)) == [True, False]


def test_until_midnight() -> None:
    spec = "Mon 00:00-24:00"
    assert hours_of(spec, at(MONDAY, 0), at(MONDAY, 23, 59, 59, 999_999)) == [True, True]
    assert hours_of(spec, at(MONDAY + timedelta(days=1), 0), at(SUNDAY, 23, 59, 59, 999_999)) == [
        False,
        False,
    ]


@pytest.mark.parametrize("spec", ["always", "ALWAYS", " Always ", "Mon-Sun 00:00-24:00"])
def test_always(spec: str) -> None:
    hours = OfficeHours.parse(spec)
    assert hours.spec == spec
    for day in (MONDAY, SATURDAY, SUNDAY):
        assert all(hours.contains(at(day, hour)) for hour in range(24))
        assert hours.contains(at(day, 23, 59, 59, 999_999))


@pytest.mark.parametrize("spec", ["never", "NEVER", " never "])
def test_never(spec: str) -> None:
    hours = OfficeHours.parse(spec)
    assert hours.ranges == ()
    assert not any(hours.contains(at(day, hour)) for day in (MONDAY, SATURDAY) for hour in range(24))


def test_spelling_is_lenient() -> None:
    assert OfficeHours.parse("mon-fri 7:00-20:00").ranges == OfficeHours.parse("Mon-Fri 07:00-20:00").ranges
    assert (
        OfficeHours.parse("  MON - FRI   07:00 - 20:00  ").ranges
        == OfficeHours.parse("Mon-Fri 07:00-20:00").ranges
    )
    assert OfficeHours.parse("Fri-Mon 09:00-17:00").ranges[0].days == frozenset({4, 5, 6, 0})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("Mon-Fry 07:00-20:00", "unknown day 'fry'"),
        ("Mun 07:00-20:00", "unknown day 'mun'"),
        ("Monday-Friday 07:00-20:00", "is not like 'Mon-Fri 07:00-20:00'"),
        ("Mon-Fri", "is not like"),
        ("07:00-20:00", "is not like"),
        ("Mon-Fri 7-20", "is not like"),
        ("Mon-Fri 07:00", "is not like"),
        ("", "is not like"),
        ("sometimes", "is not like"),
        ("Mon-Fri 07:00-20:00;", "is not like"),
        ("Mon-Fri 07:00-20:00, Sat 10:00-12:00", "is not like"),
        ("Mon-Fri 25:00-26:00", "bad time"),
        ("Mon-Fri 07:60-20:00", "bad time"),
        ("Mon-Fri 07:00-24:30", "bad time"),
        ("Mon-Fri 24:00-24:00", "bad time"),
        ("Mon-Fri 20:00-07:00", "the end is not after the start"),
        ("Mon-Fri 07:00-07:00", "the end is not after the start"),
        ("Sat 10:00-12:00; Sun 12:00-10:00", "'sun 12:00-10:00'"),
    ],
)
def test_bad_office_hours_are_refused_clearly(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        OfficeHours.parse(spec)
    assert "\n" not in str(caught.value)


moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1))


@settings(max_examples=200, deadline=None)
@given(moment=moments)
def test_always_and_never_hold_at_every_moment(moment: datetime) -> None:
    assert OfficeHours.parse("always").contains(moment)
    assert OfficeHours.parse("Mon-Sun 00:00-24:00").contains(moment)
    assert not OfficeHours.parse("never").contains(moment)


@settings(max_examples=200, deadline=None)
@given(moment=moments)
def test_wrapping_range_is_the_union_of_its_days(moment: datetime) -> None:
    wrapped = OfficeHours.parse("Fri-Mon 09:00-17:30")
    spelled_out = OfficeHours.parse("Fri 09:00-17:30; Sat 09:00-17:30; Sun 09:00-17:30; Mon 09:00-17:30")
    assert wrapped.contains(moment) == spelled_out.contains(moment)
    expected = moment.weekday() in {4, 5, 6, 0} and time(9) <= moment.time() < time(17, 30)
    assert wrapped.contains(moment) == expected


# ---------------------------------------------------------------------------
# the sliding 24h window, simulated at the pure level (time injected, never slept)
# ---------------------------------------------------------------------------

T0 = datetime(2024, 6, 5, 9, 0, tzinfo=UTC)  # storage times are UTC


@dataclass(frozen=True)
class Event:
    at: datetime
    recipients: int
    outcome: Outcome


class User:
    """One user's recorded events and the decision for the next message, as accounting.py does it."""

    def __init__(self, rules: QuotaRules) -> None:
        self.rules = rules
        self.events: list[Event] = []

    def total_since(self, now: datetime) -> int:
        # as Storage.recipients_since(user, now - window, counted_outcomes(rules)): at or after
        since = now - self.rules.window
        counted = counted_outcomes(self.rules)
        return sum(
            event.recipients for event in self.events if event.at >= since and event.outcome in counted
        )

    def send(self, now: datetime, recipients: int) -> str:
        verdict = decide_quota(self.rules, self.total_since(now) + recipients)
        if verdict.record:
            self.events.append(Event(now, recipients, verdict.outcome))
        return verdict.action


def test_sliding_window() -> None:
    user = User(QuotaRules())
    hour = timedelta(hours=1)
    assert user.send(T0, 1000) == DUNNO  # 1000
    assert user.send(T0 + 1 * hour, 499) == DUNNO  # 1499
    assert user.send(T0 + 2 * hour, 1) == HOLD  # 1500: held, and counted
    assert user.send(T0 + 3 * hour, 1499) == HOLD  # 2999
    assert user.send(T0 + 4 * hour, 1) == REJECT  # 3000: rejected, recorded, not counted
    assert user.send(T0 + 5 * hour, 1000) == REJECT  # 3999: not counted either
    assert user.total_since(T0 + 5 * hour) == 2999
    assert [event.outcome for event in user.events] == [
        Outcome.DUNNO,
        Outcome.DUNNO,
        Outcome.HOLD,
        Outcome.HOLD,
        Outcome.REJECT,
        Outcome.REJECT,
    ]
    # The first 1000 are still in the window exactly 24h later, and out of it just after.
    assert user.total_since(T0 + 24 * hour) == 2999
    assert user.total_since(T0 + 24 * hour + timedelta(microseconds=1)) == 1999
    assert user.send(T0 + 24 * hour + timedelta(seconds=1), 1) == HOLD  # 2000
    # Once the held ones have left too, the user is back under the quota.
    assert user.send(T0 + 27 * hour + timedelta(seconds=1), 1) == DUNNO  # the one of T0+24h + this one
    assert user.total_since(T0 + 27 * hour + timedelta(seconds=1)) == 2
    # A day later everything has expired.
    assert user.total_since(T0 + 60 * hour) == 0
    assert user.send(T0 + 60 * hour, 1499) == DUNNO


def test_sliding_window_with_count_rejected() -> None:
    user = User(QuotaRules(count_rejected=True))
    assert user.send(T0, 2999) == HOLD
    assert user.send(T0 + timedelta(minutes=1), 1) == REJECT  # 3000, and now counted
    assert user.send(T0 + timedelta(minutes=2), 1) == REJECT  # 3001
    assert user.total_since(T0 + timedelta(minutes=2)) == 3001
    assert user.send(T0 + timedelta(hours=24, minutes=1, seconds=1), 1) == DUNNO  # only the last 1 + 1


def test_a_single_message_can_exceed_the_quota_on_its_own() -> None:
    user = User(QuotaRules())
    assert user.send(T0, 1500) == HOLD
    assert user.send(T0 + timedelta(days=2), 3000) == REJECT
    assert user.send(T0 + timedelta(days=2, seconds=1), 1499) == DUNNO  # the rejected 3000 did not count


def test_window_of_custom_length() -> None:
    user = User(QuotaRules(quota=10, reject_quota=20, window=timedelta(hours=1)))
    assert user.send(T0, 9) == DUNNO
    assert user.send(T0 + timedelta(minutes=59), 1) == HOLD
    assert user.send(T0 + timedelta(minutes=61), 1) == DUNNO  # the 9 have left the hour


@settings(max_examples=100, deadline=None)
@given(
    sends=st.lists(
        st.tuples(st.integers(0, 7 * 24 * 60), st.integers(0, 800)),  # (minute of the week, recipients)
        max_size=40,
    )
)
def test_counted_total_in_any_window_stays_below_the_reject_quota(sends: list[tuple[int, int]]) -> None:
    rules = QuotaRules(quota=1000, reject_quota=2000)
    user = User(rules)
    for minute, recipients in sorted(sends):
        now = T0 + timedelta(minutes=minute)
        total_before = user.total_since(now)
        action = user.send(now, recipients)
        assert action == (
            DUNNO
            if total_before + recipients < 1000
            else HOLD
            if total_before + recipients < 2000
            else REJECT
        )
        # What counts (DUNNO and HOLD) never reaches the reject quota in any window...
        assert user.total_since(now) < rules.reject_quota
    # ...and every message answered DUNNO found the window (itself included) under the quota.
    for index, event in enumerate(user.events):
        if event.outcome is Outcome.DUNNO:
            window_total = sum(
                earlier.recipients
                for earlier in user.events[:index]
                if earlier.at >= event.at - rules.window and earlier.outcome is not Outcome.REJECT
            )
            assert window_total + event.recipients < rules.quota
