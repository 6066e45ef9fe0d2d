"""One contract, every backend: what the daemon and the CLI rely on from storage.

Runs against real SQLite, and real MariaDB and PostgreSQL servers started by the test
session (tests/dbservers.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from policyd.quota import Outcome
from policyd.storage import Event, Storage, StorageError, create_storage

NOW = datetime(2026, 11, 24, 12, 0, 0, tzinfo=UTC)
COUNTED = (Outcome.DUNNO, Outcome.HOLD)
ALL = (Outcome.DUNNO, Outcome.HOLD, Outcome.REJECT)


def event(
    user: str, recipients: int, age: timedelta = timedelta(0), outcome: Outcome = Outcome.DUNNO
) -> Event:
    return Event(
        ts=NOW - age,
        sasl_username=user,
        sender=f"{user}@example.org",
        client_address="192.0.2.1",
        recipient_count=recipients,
        outcome=outcome,
    )


async def test_empty_table_sums_to_zero(storage: Storage) -> None:
    assert await storage.recipients_since("nobody", NOW - timedelta(hours=24), COUNTED) == 0
    assert await storage.count_events() == 0
    assert await storage.top_senders(NOW - timedelta(hours=24), 10) == []


async def test_sum_is_per_user_and_per_window(storage: Storage) -> None:
    await storage.add_events(
        [
            event("alice", 10),
            event("alice", 5, timedelta(hours=23, minutes=59)),
            event("alice", 100, timedelta(hours=24, seconds=1)),  # just outside the window
            event("bob", 7),
        ]
    )
    since = NOW - timedelta(hours=24)
    assert await storage.recipients_since("alice", since, COUNTED) == 15
    assert await storage.recipients_since("bob", since, COUNTED) == 7
    assert await storage.recipients_since("carol", since, COUNTED) == 0


async def test_window_boundary_is_inclusive_to_the_millisecond(storage: Storage) -> None:
    await storage.add_events([event("alice", 3, timedelta(hours=24))])
    assert await storage.recipients_since("alice", NOW - timedelta(hours=24), COUNTED) == 3
    later = NOW - timedelta(hours=24) + timedelta(milliseconds=1)
    assert await storage.recipients_since("alice", later, COUNTED) == 0


async def test_sum_counts_only_the_given_outcomes(storage: Storage) -> None:
    await storage.add_events(
        [
            event("alice", 1, outcome=Outcome.DUNNO),
            event("alice", 20, outcome=Outcome.HOLD),
            event("alice", 300, outcome=Outcome.REJECT),
        ]
    )
    since = NOW - timedelta(hours=1)
    assert await storage.recipients_since("alice", since, COUNTED) == 21
    assert await storage.recipients_since("alice", since, ALL) == 321
    assert await storage.recipients_since("alice", since, (Outcome.REJECT,)) == 300


async def test_replayed_event_is_stored_once(storage: Storage) -> None:
    first = event("alice", 4)
    await storage.add_events([first])
    await storage.add_events([first, event("alice", 1)])
    assert await storage.count_events() == 2
    assert await storage.recipients_since("alice", NOW - timedelta(hours=1), COUNTED) == 5


async def test_same_user_same_millisecond_are_two_events(storage: Storage) -> None:
    # go-policyd's primary key (ts, user, sender, ip) refused the second one.
    await storage.add_events([event("alice", 1), event("alice", 1)])
    assert await storage.recipients_since("alice", NOW - timedelta(hours=1), COUNTED) == 2


async def test_batch_of_many_events(storage: Storage) -> None:
    await storage.add_events([event(f"user{i % 50}", 1, timedelta(seconds=i)) for i in range(2000)])
    assert await storage.count_events() == 2000
    assert await storage.recipients_since("user7", NOW - timedelta(hours=1), COUNTED) == 40


@pytest.mark.parametrize(
    "name",
    [
        "o'brien",
        'quote"double',
        "back\\slash",
        "semi;colon--",
        "x' OR '1'='1",
        "unicode-éß-名前",
        "\\xff\\xfe escaped bytes",
        "u" * 10_000,
    ],
)
async def test_hostile_names_are_stored_verbatim(storage: Storage, name: str) -> None:
    hostile = Event(
        ts=NOW,
        sasl_username=name,
        sender=name + "@example.org",
        client_address="2001:db8::1",
        recipient_count=2,
        outcome=Outcome.DUNNO,
    )
    await storage.add_events([hostile])
    assert await storage.recipients_since(name, NOW - timedelta(hours=1), COUNTED) == 2
    [top] = await storage.top_senders(NOW - timedelta(hours=1), 5)
    assert top.sasl_username == name


async def test_top_senders(storage: Storage) -> None:
    await storage.add_events(
        [
            event("alice", 10),
            event("alice", 1500, outcome=Outcome.HOLD),
            event("alice", 3000, outcome=Outcome.REJECT),
            event("bob", 50, timedelta(minutes=5)),
            event("carol", 2, timedelta(hours=30)),  # outside the 24h window
        ]
    )
    top = await storage.top_senders(NOW - timedelta(hours=24), 10)
    assert [(s.sasl_username, s.recipients, s.messages, s.held, s.rejected) for s in top] == [
        ("alice", 4510, 3, 1, 1),
        ("bob", 50, 1, 0, 0),
    ]
    assert top[0].last_seen == NOW
    assert top[1].last_seen == NOW - timedelta(minutes=5)
    assert len(await storage.top_senders(NOW - timedelta(hours=24), 1)) == 1
    assert {s.sasl_username for s in await storage.top_senders(NOW - timedelta(days=2), 10)} == {
        "alice",
        "bob",
        "carol",
    }


async def test_user_events_newest_first_with_their_details(storage: Storage) -> None:
    await storage.add_events(
        [
            Event(
                NOW - timedelta(minutes=3),
                "alice",
                "a@example.org",
                "192.0.2.1",
                5,
                Outcome.DUNNO,
                queue_id="Q1",
            ),
            Event(NOW - timedelta(minutes=1), "alice", "b@example.org", "2001:db8::1", 7, Outcome.HOLD),
            Event(NOW, "alice", "a@example.org", "192.0.2.1", 9, Outcome.REJECT),
            event("bob", 50),  # another user
            event("alice", 2, timedelta(hours=30)),  # before `since`
        ]
    )
    since = NOW - timedelta(hours=24)
    events = await storage.user_events("alice", since, 10)
    assert [(e.ts, e.sender, e.client_address, e.recipient_count, e.outcome) for e in events] == [
        (NOW, "a@example.org", "192.0.2.1", 9, Outcome.REJECT),
        (NOW - timedelta(minutes=1), "b@example.org", "2001:db8::1", 7, Outcome.HOLD),
        (NOW - timedelta(minutes=3), "a@example.org", "192.0.2.1", 5, Outcome.DUNNO),
    ]
    assert all(e.sasl_username == "alice" for e in events)
    assert events[2].queue_id == "Q1"
    assert [e.recipient_count for e in await storage.user_events("alice", since, 2)] == [9, 7]
    assert await storage.user_events("nobody", since, 10) == []
    assert len(await storage.user_events("alice", NOW - timedelta(days=2), 10)) == 4


@pytest.mark.parametrize("name", ["<script>alert(1)</script>", "o'brien\"; DROP TABLE x; --", "ünï €"])
async def test_user_events_of_a_hostile_name(storage: Storage, name: str) -> None:
    await storage.add_events([event(name, 3), event(name + "x", 4)])
    [found] = await storage.user_events(name, NOW - timedelta(hours=1), 10)
    assert (found.sasl_username, found.recipient_count) == (name, 3)


async def test_purge_deletes_only_old_events_in_batches(storage: Storage) -> None:
    await storage.add_events([event("old", 1, timedelta(days=8, seconds=i)) for i in range(120)])
    await storage.add_events([event("new", 1, timedelta(days=6, seconds=i)) for i in range(30)])
    deleted = await storage.purge(NOW - timedelta(days=7), batch_rows=25)
    assert deleted == 120
    assert await storage.count_events() == 30
    assert await storage.purge(NOW - timedelta(days=7), batch_rows=25) == 0


async def test_timestamps_round_trip_in_utc(storage: Storage) -> None:
    local = datetime(2026, 3, 29, 2, 30, tzinfo=UTC).astimezone(
        __import__("zoneinfo").ZoneInfo("Europe/Paris")
    )  # the night clocks go forward: stored as UTC, no ambiguity
    await storage.add_events([Event(local, "dst", "s", "192.0.2.1", 1, Outcome.DUNNO)])
    [top] = await storage.top_senders(local - timedelta(minutes=1), 1)
    assert top.last_seen == local.astimezone(UTC)


async def test_migrate_is_idempotent_and_keeps_rows(database: tuple[str, str]) -> None:
    url, table = database
    store = create_storage(url, table)
    await store.open()
    try:
        assert await store.pending_migrations() != []
        first = await store.migrate()
        assert first
        assert await store.pending_migrations() == []
        await store.add_events([event("alice", 3)])
        assert await store.migrate() == []
        assert await store.count_events() == 1
    finally:
        await store.close()


async def test_nul_bytes_are_stored_verbatim_or_refused_cleanly(storage: Storage) -> None:
    # The protocol parser already refuses NUL bytes; storage on its own must still either
    # keep the name exactly or refuse it with StorageError (PostgreSQL text cannot hold NUL).
    name = "nul\0name"
    try:
        await storage.add_events([event(name, 2)])
    except StorageError as error:
        assert "nul" in str(error).lower() or "0x00" in str(error).lower(), error
        assert await storage.count_events() == 0
    else:
        assert await storage.recipients_since(name, NOW - timedelta(hours=1), COUNTED) == 2
        assert await storage.recipients_since("nul", NOW - timedelta(hours=1), COUNTED) == 0


# ---------------------------------------------------------------------------
# what the in-memory window reads: the bulk load at start, the tail of other relays
# ---------------------------------------------------------------------------

MS = timedelta(milliseconds=1)


def ms(moment: datetime) -> int:
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // MS


async def test_load_window_groups_each_users_events(storage: Storage) -> None:
    await storage.add_events(
        [
            event("alice", 3, timedelta(minutes=5)),
            event("alice", 300, timedelta(minutes=3), Outcome.REJECT),
            event("alice", 4, timedelta(minutes=9), Outcome.HOLD),
            event("alice", 100, timedelta(hours=25)),  # outside the window
            event("bob", 7, timedelta(seconds=1)),
        ],
        origin="relay-a",
    )
    top = await storage.max_event_id()
    histories = await storage.load_window(NOW - timedelta(hours=24), top, exclude_origin="relay-b")
    by_user = {history.sasl_username: history for history in histories}
    assert set(by_user) == {"alice", "bob"}
    alice = by_user["alice"]
    # Each event's time, recipients and outcome together (in any order: Window.load sorts).
    assert sorted(zip(alice.times, alice.counts, alice.codes, strict=True)) == [
        (ms(NOW - timedelta(minutes=9)), 4, 1),
        (ms(NOW - timedelta(minutes=5)), 3, 0),
        (ms(NOW - timedelta(minutes=3)), 300, 2),
    ]
    assert by_user["bob"].times == [ms(NOW - timedelta(seconds=1))]


async def test_load_window_leaves_out_one_origin_and_later_rows(storage: Storage) -> None:
    await storage.add_events([event("alice", 1)], origin="relay-a")
    await storage.add_events([event("alice", 2)], origin="relay-b")
    await storage.add_events([event("alice", 4)], origin=None)  # go-policyd, or an older policyd
    fence = await storage.max_event_id()
    await storage.add_events([event("alice", 8)], origin="relay-a")
    since = NOW - timedelta(hours=1)
    [history] = await storage.load_window(since, fence, exclude_origin="relay-b")
    assert sorted(history.counts) == [1, 4]
    assert await storage.load_window(since, 0, exclude_origin="relay-b") == []


async def test_load_window_of_every_origin(storage: Storage) -> None:
    # None: the start's query (nothing of this run written yet), the fast one.
    long_name = "l" * 300 + "@example.org"  # past the verbatim part of an index key
    await storage.add_events([event("alice", 1), event(long_name, 16)], origin="relay-a")
    await storage.add_events([event("alice", 2, outcome=Outcome.HOLD)], origin="relay-b")
    await storage.add_events([event("alice", 4), event("l" * 300 + "@example.net", 32)], origin=None)
    fence = await storage.max_event_id()
    await storage.add_events([event("alice", 8)], origin="relay-a")
    histories = await storage.load_window(NOW - timedelta(hours=1), fence, exclude_origin=None)
    by_user = {history.sasl_username: history for history in histories}
    assert sorted(by_user["alice"].counts) == [1, 2, 4]
    assert sorted(by_user["alice"].codes) == [0, 0, 1]
    assert by_user[long_name].counts == [16]
    assert by_user["l" * 300 + "@example.net"].counts == [32]
    assert len(histories) == 3


async def test_timestamps_load_to_the_millisecond(storage: Storage) -> None:
    moment = datetime(2026, 11, 24, 11, 59, 59, 999_999, tzinfo=UTC)  # truncated, never rounded up
    await storage.add_events([Event(moment, "alice", "s", "192.0.2.1", 1, Outcome.DUNNO)])
    [history] = await storage.load_window(NOW - timedelta(hours=1), await storage.max_event_id(), "x")
    assert history.times == [ms(moment.replace(microsecond=999_000))]
    tail = await storage.tail(0, "x", 10)
    assert [row.at for row in tail.rows] == history.times


async def test_tail_reads_other_origins_in_id_order(storage: Storage) -> None:
    assert await storage.max_event_id() == 0
    assert (await storage.tail(0, "me", 100)).max_id == 0
    await storage.add_events([event("alice", 1), event("bob", 2, outcome=Outcome.HOLD)], origin="other")
    await storage.add_events([event("alice", 4)], origin="me")
    await storage.add_events([event("carol", 8, outcome=Outcome.REJECT)], origin=None)
    tail = await storage.tail(0, "me", 100)
    assert [(row.sasl_username, row.recipient_count, row.code) for row in tail.rows] == [
        ("alice", 1, 0),
        ("bob", 2, 1),
        ("carol", 8, 2),
    ]
    assert tail.max_id == await storage.max_event_id() >= tail.rows[-1].row_id
    ids = [row.row_id for row in tail.rows]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [row.row_id for row in (await storage.tail(ids[0], "me", 1)).rows] == [ids[1]]
    assert (await storage.tail(tail.max_id, "me", 100)).rows == []


async def test_existing_event_ids(storage: Storage) -> None:
    stored = [event("alice", 1) for _ in range(3)]
    await storage.add_events(stored, origin="other")
    mine = event("alice", 1)
    await storage.add_events([mine], origin="me")
    asked = [stored[0].event_id, "0" * 32, stored[2].event_id, mine.event_id] + [
        f"{n:032x}" for n in range(1200)
    ]
    assert await storage.existing_event_ids(asked, "me") == {stored[0].event_id, stored[2].event_id}
    assert await storage.existing_event_ids([], "me") == set()


async def test_load_window_before_a_time_takes_every_origin(storage: Storage) -> None:
    await storage.add_events([event("alice", 1, timedelta(hours=30))], origin="me")
    await storage.add_events([event("alice", 2, timedelta(hours=26))], origin="other")
    await storage.add_events([event("alice", 4, timedelta(hours=20))], origin="me")
    top = await storage.max_event_id()
    [history] = await storage.load_window(
        NOW - timedelta(hours=48), top, None, before=NOW - timedelta(hours=24)
    )
    assert sorted(history.counts) == [1, 2]


async def test_queue_id_and_origin_are_stored(storage: Storage) -> None:
    await storage.add_events(
        [Event(NOW, "alice", "s", "192.0.2.1", 1, Outcome.DUNNO, queue_id="4ABCDEF")], origin="relay-a"
    )
    await storage.add_events([event("alice", 1)], origin="relay-a")
    assert await storage.count_events() == 2


async def test_load_window_keeps_each_events_values_together(storage: Storage) -> None:
    # Events of one millisecond: the lists must not be ordered each on its own.
    same = [
        event("alice", count, outcome=outcome)
        for count, outcome in ((3, Outcome.DUNNO), (5, Outcome.HOLD), (7, Outcome.REJECT))
    ]
    await storage.add_events(same * 1, origin="relay-a")
    await storage.add_events([event("alice", 11, outcome=Outcome.HOLD), event("alice", 13)], origin="relay-a")
    [history] = await storage.load_window(NOW - timedelta(hours=1), await storage.max_event_id(), "x")
    assert sorted(zip(history.counts, history.codes, strict=True)) == [
        (3, 0),
        (5, 1),
        (7, 2),
        (11, 1),
        (13, 0),
    ]
    assert set(history.times) == {ms(NOW)}


async def test_queue_ids_of_one_user(storage: Storage) -> None:
    def held(user: str, queue_id: str, age: timedelta = timedelta(0)) -> Event:
        return Event(NOW - age, user, f"{user}@example.org", "192.0.2.1", 1, Outcome.HOLD, queue_id=queue_id)

    await storage.add_events(
        [
            held("alice", "4AB12"),
            held("alice", "4AB13"),
            held("alice", "4AB13"),  # one message, two events (a retry): one id
            held("alice", ""),  # none sent (a request before END-OF-MESSAGE)
            held("alice", "OLD1", timedelta(days=3)),
            held("bob", "B0B01"),
        ]
    )
    assert await storage.queue_ids("alice", NOW - timedelta(days=1)) == {"4AB12", "4AB13"}
    assert await storage.queue_ids("alice", NOW - timedelta(days=7)) == {"4AB12", "4AB13", "OLD1"}
    assert await storage.queue_ids("carol", NOW - timedelta(days=7)) == set()


# ---------------------------------------------------------------------------
# the rules tables (storage/schema.py): overrides, allow / block entries, resets
# ---------------------------------------------------------------------------


async def test_rules_tables_round_trip_and_their_signature_moves(storage: Storage) -> None:
    from policyd.rules import Override, Reset, make_entry

    empty = await storage.rules_signature()
    assert empty == (0,) * 6
    rules = await storage.load_rules(0)
    assert (rules.overrides, rules.entries, rules.resets) == ([], [], [])

    now_ms = 1_790_000_000_000
    teacher = Override("teacher", 86_400_000, 2000, 4000, now_ms + 1000, "class of 2,000", now_ms)
    await storage.set_override(teacher)
    await storage.set_override(Override("teacher", 3_600_000, 500, 900, None, "", now_ms))
    # Set again: replaces that window's override.
    replaced = Override("teacher", 86_400_000, 2500, 5000, None, "o'brien; DROP TABLE x --", now_ms)
    await storage.set_override(replaced)
    block = make_entry("block", "2001:db8::/32", action="REJECT", reason="botnet", created_ms=now_ms)
    allow = make_entry("allow", "news@example.org", user="newsletter", until_ms=now_ms + 5, created_ms=now_ms)
    await storage.add_list_entry(block)
    await storage.add_list_entry(allow)
    await storage.add_reset(Reset(0, "phished", now_ms, "password changed", now_ms))
    await storage.add_reset(Reset(0, "old", now_ms - 10**9, "long ago", now_ms))

    signature = await storage.rules_signature()
    assert signature != empty
    rules = await storage.load_rules(now_ms - 1000)
    assert sorted((o.window_ms, o.hold, o.reject, o.until_ms, o.reason) for o in rules.overrides) == [
        (3_600_000, 500, 900, None, ""),
        (86_400_000, 2500, 5000, None, "o'brien; DROP TABLE x --"),
    ]
    assert [(e.kind, e.target, e.user, e.action, e.until_ms, e.reason) for e in rules.entries] == [
        ("block", "2001:db8::/32", "", "REJECT", None, "botnet"),
        ("allow", "news@example.org", "newsletter", "HOLD", now_ms + 5, ""),
    ]
    assert all(entry.entry_id > 0 for entry in rules.entries)
    [reset] = rules.resets  # the old one is before the window asked for
    assert (reset.sasl_username, reset.before_ms, reset.reason) == ("phished", now_ms, "password changed")
    assert reset.reset_id > 0

    assert await storage.remove_overrides("teacher", 3_600_000) == 1
    assert await storage.rules_signature() != signature
    assert await storage.remove_overrides("teacher") == 1
    assert await storage.remove_overrides("teacher") == 0
    assert await storage.remove_list_entries("news@example.org", "someone-else") == 0
    assert await storage.remove_list_entries("news@example.org") == 1
    rules = await storage.load_rules(0)
    assert rules.overrides == [] and [e.target for e in rules.entries] == ["2001:db8::/32"]
    assert len(rules.resets) == 2


async def test_rules_tables_keep_hostile_text_verbatim(storage: Storage) -> None:
    from policyd.rules import make_entry

    for name in ("o'brien", "back\\slash", "unicode-éß-名前", "per%cent", "x'OR'1'='1"):
        await storage.add_list_entry(make_entry("block", name, reason=name + " ?? $1 %s"))
    rules = await storage.load_rules(0)
    assert [(e.target, e.reason) for e in rules.entries] == [
        (name.lower(), name + " ?? $1 %s")
        for name in ("o'brien", "back\\slash", "unicode-éß-名前", "per%cent", "x'OR'1'='1")
    ]


async def test_user_events_and_top_for_one_user(storage: Storage) -> None:
    await storage.add_events(
        [
            event("alice", 10, timedelta(minutes=3)),
            Event(NOW - timedelta(minutes=2), "alice", "other@example.org", "2001:db8::1", 5, Outcome.HOLD),
            event("alice", 300, timedelta(minutes=1), Outcome.REJECT),
            event("alice", 7, timedelta(hours=30)),
            event("bob", 1),
        ]
    )
    events = (await storage.user_events("alice", NOW - timedelta(hours=24), 100))[::-1]
    assert [(e.recipient_count, e.outcome, e.sender, e.client_address) for e in events] == [
        (10, Outcome.DUNNO, "alice@example.org", "192.0.2.1"),
        (5, Outcome.HOLD, "other@example.org", "2001:db8::1"),
        (300, Outcome.REJECT, "alice@example.org", "192.0.2.1"),
    ]
    assert events[0].ts == NOW - timedelta(minutes=3)
    assert all(len(e.event_id) == 32 for e in events)
    [top] = await storage.top_senders(NOW - timedelta(hours=24), 10, "alice")
    assert (top.sasl_username, top.counted, top.recipients, top.client_addresses) == ("alice", 15, 315, 2)
    [top] = await storage.top_senders(NOW - timedelta(hours=24), 10, "alice", ALL)
    assert top.counted == 315
    everyone = await storage.top_senders(NOW - timedelta(hours=24), 10)
    assert [(s.sasl_username, s.counted) for s in everyone] == [("alice", 15), ("bob", 1)]


async def test_migrate_creates_the_rules_and_alerts_tables_once(database: tuple[str, str]) -> None:
    url, table = database
    store = create_storage(url, table)
    await store.open()
    try:
        steps = await store.migrate()
        assert [step for step in steps if step.startswith("create table") and step.endswith(")")] == [
            f"create table {table.lower() if url.startswith('postgres') else table}_{suffix} ({what})"
            for suffix, what in (
                ("overrides", "per-user limit overrides"),
                ("lists", "allow and block entries"),
                ("resets", "resets of users' counted recipients"),
                ("alerts", "alerts told, one per incident"),
            )
        ]
        assert await store.pending_migrations() == []
        assert await store.migrate() == []
    finally:
        await store.close()


async def test_an_alert_is_claimed_once_per_incident(storage: Storage) -> None:
    hour = 3_600_000
    at = ms(NOW)
    claim = storage.claim_alert
    assert await claim("alice", "1500/24h", 1, at_ms=at, window_ms=24 * hour, origin="relay-a")
    # The same incident, seen by another relay a moment later: told already.
    assert not await claim("alice", "1500/24h", 1, at_ms=at + 50, window_ms=24 * hour, origin="relay-b")
    # Raised to REJECT: told once more, then not again; HOLD again within it: no.
    assert await claim("alice", "1500/24h", 2, at_ms=at + 60, window_ms=24 * hour, origin="relay-b")
    assert not await claim("alice", "1500/24h", 2, at_ms=at + 70, window_ms=24 * hour, origin="relay-a")
    assert not await claim("alice", "1500/24h", 1, at_ms=at + 80, window_ms=24 * hour, origin="relay-a")
    # Another limit, another user: their own incidents.
    assert await claim("alice", "300/1h", 1, at_ms=at + 90, window_ms=hour, origin="relay-a")
    assert await claim("bob", "1500/24h", 1, at_ms=at + 90, window_ms=24 * hour, origin="relay-a")
    # A window later: a new incident.
    assert await claim("alice", "1500/24h", 1, at_ms=at + 25 * hour, window_ms=24 * hour, origin="relay-a")


async def test_tail_summary_counts_and_sums_the_ids_of_other_origins(storage: Storage) -> None:
    assert await storage.tail_summary(0, 0, "me") == (0, 0)
    await storage.add_events([event("alice", 1), event("bob", 2)], origin="other")
    await storage.add_events([event("alice", 4)], origin="me")
    await storage.add_events([event("carol", 8)], origin=None)
    ids = [row.row_id for row in (await storage.tail(0, "me", 100)).rows]
    top = await storage.max_event_id()
    assert await storage.tail_summary(0, top, "me") == (3, sum(ids))
    assert await storage.tail_summary(ids[0], top, "me") == (2, ids[1] + ids[2])
    assert await storage.tail_summary(0, ids[1], "me") == (2, ids[0] + ids[1])
    assert await storage.tail_summary(top, top, "me") == (0, 0)
    assert (await storage.tail_summary(0, top, "nobody"))[0] == 4


@pytest.mark.parametrize("batch", [1, 3, 255, 256, 257, 1000])
async def test_a_batch_of_any_size_is_stored_whole(storage: Storage, batch: int) -> None:
    events = [event(f"user{n % 7}", 1 + n % 5) for n in range(batch)]
    await storage.add_events(events, origin="other")
    rows = (await storage.tail(0, "me", 10 * batch)).rows
    assert len(rows) == batch
    assert sum(row.recipient_count for row in rows) == sum(e.recipient_count for e in events)


def test_sqlite_inserts_come_in_few_sizes() -> None:
    from policyd.storage.sqlite import _ROWS_PER_INSERT, _statement_sizes

    seen: set[int] = set()
    for rows in range(3000):
        sizes = _statement_sizes(rows)
        assert sum(sizes) == rows and all(0 < size <= _ROWS_PER_INSERT for size in sizes)
        seen.update(sizes)
    assert len(seen) <= _ROWS_PER_INSERT.bit_length()  # sqlite3 caches 128 statements


async def test_sqlite_writer_checkpoints_only_a_big_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past WAL_CHECKPOINT_BYTES of log the writer checkpoints; once the log is reused (and
    cut back to WAL_SIZE_LIMIT_BYTES), a small commit stays in the log until sync_to_disk.
    The sizes scaled down by 64, as they are in proportion."""
    from policyd.storage import sqlite

    assert sqlite.WAL_SIZE_LIMIT_BYTES < sqlite.WAL_CHECKPOINT_BYTES
    monkeypatch.setattr(sqlite, "WAL_SIZE_LIMIT_BYTES", sqlite.WAL_SIZE_LIMIT_BYTES // 64)
    monkeypatch.setattr(sqlite, "WAL_CHECKPOINT_BYTES", sqlite.WAL_CHECKPOINT_BYTES // 64)
    path = tmp_path / "policyd.sqlite"
    store = create_storage(f"sqlite://{path}", "events")
    await store.open()
    await store.migrate()

    def rows_in_the_database_file() -> int:
        # immutable: the file alone, without what the write-ahead log holds.
        with contextlib.closing(sqlite3.connect(f"file:{path}?immutable=1", uri=True)) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM events").fetchone()[0])

    try:
        big = [event(f"user{n}", 1) for n in range(3000)]
        await store.add_events(big)
        assert Path(f"{path}-wal").stat().st_size > sqlite.WAL_CHECKPOINT_BYTES
        assert rows_in_the_database_file() == len(big)  # checkpointed by the writer
        await store.sync_to_disk()
        for _ in range(3):  # the log reused from its start: small commits stay in it
            await store.add_events([event("alice", 1)])
            assert rows_in_the_database_file() == len(big)
        await store.sync_to_disk()
        assert rows_in_the_database_file() == len(big) + 3
    finally:
        await store.close()


@pytest.mark.parametrize("backend", ["sqlite"])
async def test_sqlite_read_of_a_user_stops_when_its_caller_gives_up(storage: Storage) -> None:
    """A user's rows are scanned for (no index by user): a page's read that timed out must
    not keep the reader's thread from the next read."""
    endless = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT COUNT(*) FROM n"
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await storage._read(  # type: ignore[attr-defined]
                    lambda c: c.execute(endless).fetchone(), "scanning", cancellable=True
                )
        # Reached only if the endless statement was stopped: one thread, one call at a time.
        async with asyncio.timeout(30):
            await storage.add_events([event("alice", 2)])
            assert await storage.recipients_since("alice", NOW - timedelta(hours=1), COUNTED) == 2
            assert await storage.recipients_since("bob", NOW - timedelta(hours=1), COUNTED) == 0
    finally:
        # Should the statement still run (the test failing), stop it, or close would wait.
        getattr(storage, "_reader")._connection.interrupt()  # noqa: B009
