"""The on-disk spool: durable appends, replay offsets, what a crash can leave behind."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from policyd.quota import Outcome
from policyd.spool import Spool, SpoolFull, decode_event, encode_event
from policyd.storage import Event

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def events(count: int, user: str = "alice") -> list[Event]:
    return [
        Event(NOW + timedelta(milliseconds=i), user, f"{user}@example.org", "192.0.2.1", i + 1, Outcome.DUNNO)
        for i in range(count)
    ]


def test_event_round_trip_keeps_everything() -> None:
    original = Event(NOW, "o'brien \\ \u540d", 'a"b@example.org', "2001:db8::1", 7, Outcome.HOLD)
    line = encode_event(original)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_event(line) == original


def test_append_read_commit_and_reset(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), max_bytes=1 << 20)
    assert spool.open() == ([], [])
    spool.append(events(5))
    spool.append(events(3, "bob"))
    first = spool.read_batch(4)
    assert [event.recipient_count for event in first.events] == [1, 2, 3, 4]
    spool.commit(first.end_offset)
    rest = spool.read_batch(100)
    assert [event.sasl_username for event in rest.events] == ["alice", "bob", "bob", "bob"]
    spool.commit(rest.end_offset)
    assert spool.pending_bytes == 0
    assert (tmp_path / "spool").stat().st_size == 0  # emptied once all is replayed
    assert not (tmp_path / "spool.offset").exists()


def test_a_restart_replays_from_the_committed_offset(tmp_path: Path) -> None:
    path = str(tmp_path / "spool")
    spool = Spool(path, max_bytes=1 << 20)
    spool.open()
    written = events(6)
    spool.append(written)
    spool.commit(spool.read_batch(2).end_offset)
    # The process dies here; a new one opens the spool.
    reopened = Spool(path, max_bytes=1 << 20)
    pending, problems = reopened.open()
    assert problems == []
    assert pending == written[2:]
    assert [event.event_id for event in reopened.read_batch(10).events] == [e.event_id for e in written[2:]]


def test_torn_last_line_is_cut_off_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(str(path), max_bytes=1 << 20)
    spool.open()
    spool.append(events(2))
    with path.open("ab") as spool_file:
        spool_file.write(encode_event(events(1)[0])[:30])  # the write a crash interrupted
    pending, problems = Spool(str(path), max_bytes=1 << 20).open()
    assert len(pending) == 2
    assert "cut off an unfinished last line" in problems[0]
    assert path.read_bytes().endswith(b"\n")


def test_corrupt_line_stops_the_replay_there_and_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    path.write_bytes(encode_event(events(1)[0]) + b"{not json}\n" + encode_event(events(1)[0]))
    pending, problems = Spool(str(path), max_bytes=1 << 20).open()
    assert len(pending) == 1
    assert "bad spool line" in problems[0]


def test_bad_offset_file_replays_everything(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(str(path), max_bytes=1 << 20)
    spool.open()
    spool.append(events(3))
    (tmp_path / "spool.offset").write_text("999999\n")
    pending, problems = Spool(str(path), max_bytes=1 << 20).open()
    assert len(pending) == 3
    assert "bad offset" in problems[0]


def test_the_size_limit_is_enforced(tmp_path: Path) -> None:
    spool = Spool(str(tmp_path / "spool"), max_bytes=2000)
    spool.open()
    appended = 0
    with pytest.raises(SpoolFull):
        while True:
            spool.append(events(1))
            appended += 1
    assert 0 < appended < 20
    assert (tmp_path / "spool").stat().st_size <= 2000
