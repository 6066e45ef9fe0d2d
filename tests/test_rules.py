"""Allow / block entries, overrides and the user view: pure, against brute-force models."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.clock import to_ms
from policyd.quota import Limit, Message, Outcome, QuotaRules, decide, precheck
from policyd.rules import (
    ALLOW,
    BLOCK,
    EntryError,
    ListEntry,
    Matcher,
    Override,
    Reset,
    RuntimeRules,
    apply_overrides,
    client_ip,
    make_entry,
    parse_target,
)
from policyd.storage import Event
from policyd.userview import user_view

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
NOW_MS = to_ms(NOW)


# ---------------------------------------------------------------------------
# the forms an entry may take, and the ones refused
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "kind", "normal"),
    [
        ("jdoe", "user", "jdoe"),
        ("JDoe", "user", "jdoe"),
        ("user#1", "user", "user#1"),
        ("jdoe@Univ.FR", "address", "jdoe@univ.fr"),
        ("@univ.fr", "domain", "@univ.fr"),
        ("@Univ.FR", "domain", "@univ.fr"),
        ("192.0.2.7", "network", "192.0.2.7"),
        ("192.0.2.0/24", "network", "192.0.2.0/24"),
        ("192.0.2.9/24", "network", "192.0.2.0/24"),
        ("2001:DB8:0::1", "network", "2001:db8::1"),
        ("2001:db8::/32", "network", "2001:db8::/32"),
        ("::ffff:192.0.2.7", "network", "192.0.2.7"),
        ("::ffff:192.0.2.0/120", "network", "192.0.2.0/24"),
    ],
)
def test_entry_forms_are_normalised(text: str, kind: str, normal: str) -> None:
    target = parse_target(text)
    assert (target.kind, target.text) == (kind, normal)


@pytest.mark.parametrize(
    "text",
    [
        "*spam*",
        "spam*",
        "a b",
        "192.0.2.0/33",
        "192.0.2.300",
        "2001:db8::/129",
        "@",
        "@.org",
        "x@",
        "",
        "[x]",
    ],
)
def test_entries_that_could_never_match_are_refused(text: str) -> None:
    with pytest.raises(EntryError):
        parse_target(text)


def test_an_allow_for_a_sender_domain_needs_the_user() -> None:
    with pytest.raises(EntryError, match="dodge the quota"):
        make_entry(ALLOW, "@example.org")
    entry = make_entry(ALLOW, "@example.org", user="News")
    assert entry.user == "news"
    make_entry(BLOCK, "@example.org")  # a block cannot be abused


def test_an_allow_for_an_address_without_user_names_the_user_only() -> None:
    entry = make_entry(ALLOW, "boss@example.org")
    matcher = Matcher([entry])
    assert matcher.match("boss@example.org", "x@example.net", "192.0.2.1") is entry
    # A phished account picking that envelope sender is not exempt.
    assert matcher.match("phished", "boss@example.org", "192.0.2.1") is None
    # With --user, the sender is matched for that user only.
    scoped = make_entry(ALLOW, "boss@example.org", user="assistant")
    matcher = Matcher([scoped])
    assert matcher.match("assistant", "boss@example.org", "192.0.2.1") is scoped
    assert matcher.match("phished", "boss@example.org", "192.0.2.1") is None


def test_config_whitelist_keeps_go_policyd_meaning() -> None:
    rules = QuotaRules(whitelist=frozenset({"boss@example.org", "192.0.2.0/24", "@univ.fr"}))
    listed = [
        Message("anyone", "boss@example.org", "198.51.100.1", 1, "END-OF-MESSAGE"),
        Message("anyone", "x@example.org", "192.0.2.77", 1, "END-OF-MESSAGE"),
        Message("anyone", "x@UNIV.fr", "198.51.100.1", 1, "END-OF-MESSAGE"),
    ]
    assert all(rules.listed(rules.whitelist, message) for message in listed)
    assert not rules.listed(rules.whitelist, Message("anyone", "x@sub.univ.fr", "198.51.100.1", 1, "DATA"))


def test_ipv6_is_compared_as_an_address() -> None:
    rules = QuotaRules(blacklist=frozenset({parse_target("2001:DB8:0::1").text}))
    message = Message("u", "u@example.org", "2001:db8::1", 1, "END-OF-MESSAGE")
    verdict = precheck(rules, message, NOW)
    assert verdict is not None and verdict.reason == "blacklisted"
    expanded = Message("u", "u@example.org", "2001:0db8:0000:0000:0000:0000:0000:0001", 1, "END-OF-MESSAGE")
    assert precheck(rules, expanded, NOW) is not None


# ---------------------------------------------------------------------------
# matching, against a brute-force model
# ---------------------------------------------------------------------------

_V4 = [f"192.0.2.{n}" for n in (0, 1, 7, 128, 255)] + ["198.51.100.9", "10.0.0.1"]
_V6 = ["2001:db8::1", "2001:db8::ff", "2001:db8:1::1", "fe80::1", "::1"]
_USERS = ["alice", "bob", "jdoe@univ.fr"]
_SENDERS = ["alice@example.org", "bob@univ.fr", "jdoe@univ.fr", "x@sub.univ.fr", ""]


def _spelling(address: str) -> st.SearchStrategy[str]:
    """Ways Postfix or an admin may write the same address."""
    parsed = ipaddress.ip_address(address)
    forms = [address, str(parsed).upper()]
    if isinstance(parsed, ipaddress.IPv6Address):
        forms.append(parsed.exploded)
    else:
        forms.append(f"::ffff:{address}")
    return st.sampled_from(forms)


addresses = st.sampled_from(_V4 + _V6).flatmap(_spelling)


@st.composite
def networks(draw: st.DrawFn) -> str:
    base = draw(st.sampled_from(_V4 + _V6))
    top = 32 if ":" not in base else 128
    prefix = draw(st.sampled_from([top, top - 1, top - 8, top - 24, top // 2]))
    network = ipaddress.ip_network(f"{base}/{prefix}", strict=False)
    text = str(network) if prefix != top else draw(_spelling(base))
    return text.upper() if draw(st.booleans()) else text


targets = st.one_of(
    st.sampled_from(_USERS),
    st.sampled_from([s for s in _SENDERS if s]),
    st.sampled_from(["@univ.fr", "@example.org", "@sub.univ.fr"]),
    addresses,
    networks(),
)


@st.composite
def entries(draw: st.DrawFn) -> ListEntry:
    kind = draw(st.sampled_from([ALLOW, BLOCK]))
    target = draw(targets)
    user = draw(st.sampled_from(["", "", *_USERS]))
    source = draw(st.sampled_from(["database", "config"]))
    if kind == ALLOW and source == "database" and target.startswith("@") and not user:
        user = "alice"
    if source == "config":
        user = ""
    return make_entry(kind, target, user=user, source=source)


def model_match(entries: list[ListEntry], user: str, sender: str, client: str) -> ListEntry | None:
    """Every entry in turn, in the most literal terms."""
    ip = client_ip(client)
    for entry in entries:
        if entry.user and entry.user != user:
            continue
        target = entry.target
        if target.startswith("@"):
            hit = entry.matches_sender and "@" in sender and sender.lower().rsplit("@", 1)[1] == target[1:]
        elif "@" in target:
            hit = user == target or (entry.matches_sender and sender.lower() == target)
        else:
            try:
                network = ipaddress.ip_network(target)
            except ValueError:
                hit = user == target
            else:
                hit = ip is not None and ip.version == network.version and ip in network
        if hit:
            return entry
    return None


@settings(max_examples=400, deadline=None)
@given(
    st.lists(entries(), max_size=8),
    st.sampled_from(_USERS),
    st.sampled_from(_SENDERS),
    st.one_of(addresses, st.sampled_from(["unknown", ""])),
)
def test_matching_agrees_with_the_model(listed: list[ListEntry], user: str, sender: str, client: str) -> None:
    assert Matcher(listed).match(user, sender, client) == model_match(listed, user, sender, client)


@settings(max_examples=200, deadline=None)
@given(addresses, networks())
def test_an_address_is_in_a_network_whatever_the_spelling(address: str, network: str) -> None:
    expected = model_match([make_entry(BLOCK, network)], "u", "", address) is not None
    assert (Matcher([make_entry(BLOCK, network)]).match("u", "", address) is not None) == expected


def test_expired_entries_stop_matching() -> None:
    runtime = RuntimeRules.build([], [make_entry(BLOCK, "bob", until_ms=NOW_MS + 1000)], [])
    assert runtime.blocked("bob", "", "", NOW_MS) is not None
    assert runtime.blocked("bob", "", "", NOW_MS + 999) is not None
    assert runtime.blocked("bob", "", "", NOW_MS + 1000) is None


def test_a_block_wins_over_an_allow_and_says_its_action() -> None:
    runtime = RuntimeRules.build(
        [], [make_entry(ALLOW, "bob"), make_entry(BLOCK, "192.0.2.0/24", action="REJECT")], []
    )
    message = Message("bob", "bob@example.org", "192.0.2.5", 3, "END-OF-MESSAGE")
    verdict = precheck(QuotaRules(), message, NOW, runtime, NOW_MS)
    assert verdict is not None
    assert (verdict.action, verdict.outcome, verdict.record) == ("REJECT blocked", Outcome.REJECT, False)
    assert "192.0.2.0/24" in verdict.entry
    elsewhere = Message("bob", "bob@example.org", "198.51.100.5", 3, "END-OF-MESSAGE")
    verdict = precheck(QuotaRules(), elsewhere, NOW, runtime, NOW_MS)
    assert verdict is not None and (verdict.reason, verdict.record) == ("allowed", False)


# ---------------------------------------------------------------------------
# overrides
# ---------------------------------------------------------------------------

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def test_an_override_replaces_the_thresholds_of_its_window_only() -> None:
    rules = QuotaRules(quota=100, reject_quota=200, extra_limits=(Limit(10, 20, timedelta(hours=1)),))
    teacher = apply_overrides(rules, [Override("t", DAY_MS, 2000, 4000)], NOW_MS)
    assert [(limit.hold, limit.reject) for limit in teacher.limits] == [(2000, 4000), (10, 20)]
    assert decide(teacher, [1999, 5]).outcome is Outcome.DUNNO
    assert decide(rules, [1999, 5]).outcome is Outcome.REJECT
    # An override for a window no limit has changes nothing.
    assert apply_overrides(rules, [Override("t", 7 * DAY_MS, 1, 2)], NOW_MS).limits == rules.limits


def test_an_override_ends_at_its_expiry() -> None:
    rules = QuotaRules(quota=100, reject_quota=200)
    runtime = RuntimeRules.build([Override("t", DAY_MS, 2000, 4000, until_ms=NOW_MS + 10)], [], [])
    assert runtime.rules_for("t", rules, NOW_MS).quota == 2000
    assert runtime.rules_for("t", rules, NOW_MS + 9).quota == 2000
    assert runtime.rules_for("t", rules, NOW_MS + 10).quota == 100
    assert runtime.rules_for("other", rules, NOW_MS) is rules


# ---------------------------------------------------------------------------
# policyd user, computed
# ---------------------------------------------------------------------------


def _event(
    minutes_ago: float, recipients: int, outcome: Outcome = Outcome.DUNNO, ip: str = "192.0.2.1"
) -> Event:
    return Event(NOW - timedelta(minutes=minutes_ago), "u", "u@example.org", ip, recipients, outcome)


def test_user_view_totals_state_and_back_under() -> None:
    rules = QuotaRules(quota=100, reject_quota=200, extra_limits=(Limit(30, 60, timedelta(hours=1)),))
    events = [
        _event(300, 60),
        _event(50, 20, ip="2001:db8::1"),
        _event(10, 15),
        _event(5, 500, Outcome.REJECT),
    ]
    view = user_view("u", events, rules=rules, overrides=[], entries=[], resets=[], now=NOW)
    daily, hourly = view.limits
    assert (daily.total, daily.state) == (95, "ok")
    assert daily.back_under is None
    assert (hourly.total, hourly.state) == (35, "held")
    # Back under 30 per hour once the 20 of 50 minutes ago leave the hour.
    assert hourly.back_under == NOW + timedelta(minutes=10, milliseconds=1)
    assert view.state == "held"
    assert view.client_addresses == [("192.0.2.1", 575), ("2001:db8::1", 20)]
    assert [counted for _, counted in view.events] == [False, True, True, True]


def test_user_view_after_a_reset() -> None:
    rules = QuotaRules(quota=100, reject_quota=200)
    events = [_event(60, 150), _event(1, 5)]
    reset = Reset(1, "u", to_ms(NOW - timedelta(minutes=30)), "password changed")
    view = user_view("u", events, rules=rules, overrides=[], entries=[], resets=[reset], now=NOW)
    assert (view.limits[0].total, view.state) == (5, "ok")
    assert view.reset == reset
    assert [counted for _, counted in view.events] == [True, False]
