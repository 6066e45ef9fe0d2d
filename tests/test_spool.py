"""The spool: framed records, segments, the database's position, what a crash or a full
or damaged disk can leave behind, and the lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policyd.quota import Outcome
from policyd.spool import Spool, SpoolFull, SpoolLocked, decode_event, encode_event, pending_on_disk
from policyd.storage import Event
from tests.conftest import fill_disk, mounted_tmpfs

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
MB = 1 << 20


def events(count: int, user: str = "alice") -> list[Event]:
    return [
        Event(NOW + timedelta(milliseconds=i), user, f"{user}@example.org", "192.0.2.1", i + 1, Outcome.DUNNO)
        for i in range(count)
    ]


def opened(path: Path, max_bytes: int = MB) -> Spool:
    spool = Spool(str(path), max_bytes)
    spool.open()
    return spool


def die(spool: Spool) -> None:
    """What a kill -9 does to the spool's files: closed where they are, nothing flushed."""
    for descriptor in (spool._append_fd, spool._lock_file):
        if descriptor is not None:
            os.close(descriptor)
    spool._append_fd = spool._lock_file = None


def reopen(path: Path, max_bytes: int = MB) -> tuple[list[Event], list[str]]:
    spool = Spool(str(path), max_bytes)
    result = spool.open()
    spool.close()
    return result.events, result.problems


def segment(path: Path, number: int = 1) -> Path:
    return path.with_name(f"{path.name}.{number:06d}")


text = st.text(st.characters(blacklist_categories=["Cs"]), max_size=60)


any_event = st.builds(
    Event,
    ts=st.integers(0, 10**13).map(lambda ms: datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)),
    sasl_username=text,
    sender=text,
    client_address=text,
    recipient_count=st.integers(0, 10**9),
    outcome=st.sampled_from(list(Outcome)),
    queue_id=st.text("0123456789ABCDEFabcdef", max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(original=any_event)
def test_a_record_keeps_everything(original: Event) -> None:
    record = encode_event(original)
    assert decode_event(record[10:]) == original


def test_append_read_commit(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = opened(path)
    first, second = events(5), events(3, "bob")
    _, taken = spool.append(first)
    end, _ = spool.append(second)
    assert taken == 5
    batch = spool.read(spool.done, 4, end)
    assert [event.recipient_count for event in batch.events] == [1, 2, 3, 4]
    assert spool.commit(batch.end) is False  # nothing to delete: one segment
    rest = spool.read(batch.end, 100, end)
    assert [event.sasl_username for event in rest.events] == ["alice", "bob", "bob", "bob"]
    spool.commit(rest.end)
    assert spool.pending_bytes == 0
    spool.close()
    assert pending_on_disk(str(path)) == 0
    assert reopen(path) == ([], [])


def test_a_restart_replays_what_the_database_does_not_have(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = opened(path)
    written = events(6)
    end, _ = spool.append(written)
    spool.commit(spool.read(spool.done, 2, end).end)
    spool.sync()  # saves the position; then the process dies
    die(spool)
    pending, problems = reopen(path)
    assert problems == []
    assert pending == written[2:]


def test_segments_the_database_has_are_deleted(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = Spool(str(path), 64 * 1024)  # segments of 8K
    spool.open()
    for _ in range(40):
        end, _ = spool.append(events(10))
    assert len(list(tmp_path.glob("spool.0*"))) > 3
    position = spool.done
    while position < end:
        batch = spool.read(position, 50, end)
        if spool.commit(batch.end):
            spool.delete_finished()
        position = batch.end
    assert sorted(tmp_path.glob("spool.0*")) == [segment(path, end[0])]
    assert spool.pending_bytes == 0
    spool.close()


def test_a_torn_last_record_is_cut_off_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = opened(path)
    spool.append(events(2))
    spool.close()
    with segment(path).open("ab") as segment_file:
        segment_file.write(encode_event(events(1)[0])[:30])  # the write a crash interrupted
    pending, problems = reopen(path)
    assert len(pending) == 2
    assert any("cut off an unfinished last record (30 bytes)" in problem for problem in problems)
    assert segment(path).stat().st_size == 2 * len(encode_event(events(1)[0]))


def test_a_damaged_record_in_the_middle_is_skipped_and_the_rest_replayed(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = opened(path)
    written = events(5)
    spool.append(written)
    spool.close()
    data = bytearray(segment(path).read_bytes())
    size = len(encode_event(written[0]))
    data[2 * size + 15] ^= 0xFF  # one byte of the third record's payload
    segment(path).write_bytes(bytes(data))
    reader = Spool(str(path), MB)
    result = reader.open()
    reader.close()
    assert [event.recipient_count for event in result.events] == [1, 2, 4, 5]
    assert result.damaged == 1
    assert any("damaged bytes at offset" in problem and "replayed" in problem for problem in result.problems)


def test_garbage_between_records_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = opened(path)
    spool.append(events(2))
    spool.close()
    with segment(path).open("ab") as segment_file:
        segment_file.write(b"\xa7\x5e garbage that looks like a marker" + encode_event(events(3, "bob")[2]))
    pending, problems = reopen(path)
    assert [event.sasl_username for event in pending] == ["alice", "alice", "bob"]
    assert any("damaged bytes" in problem for problem in problems)


def test_an_unreadable_position_file_replays_everything(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    spool = opened(path)
    spool.append(events(3))
    spool.close()
    (tmp_path / "spool.done").write_text("not a position\n")
    pending, problems = reopen(path)
    assert len(pending) == 3
    assert "unreadable" in problems[0]


def test_the_size_limit_takes_what_fits_then_refuses(tmp_path: Path) -> None:
    limit = 4096
    spool = Spool(str(tmp_path / "spool"), limit)
    spool.open()
    record = len(encode_event(events(1)[0]))
    _, taken = spool.append(events(1000))
    assert taken == limit // record
    with pytest.raises(SpoolFull, match="would exceed its limit of 4096 bytes"):
        spool.append(events(1))
    assert spool.total_bytes <= limit
    spool.close()


def test_a_second_daemon_on_the_same_spool_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    first = opened(path)
    with pytest.raises(SpoolLocked, match=rf"in use by another policyd \(pid {os.getpid()}\)"):
        Spool(str(path), MB).open()
    first.close()
    opened(path).close()  # free again once the first has closed it


def test_the_lock_is_released_when_the_holder_dies(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from policyd.spool import Spool; s = Spool({str(path)!r}, 1 << 20); s.open(); input()",
        ],
        stdin=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")},
    )
    try:
        for _ in range(100):
            if (tmp_path / "spool.lock").exists() and (tmp_path / "spool.lock").read_text().strip():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        with pytest.raises(SpoolLocked, match=rf"pid {holder.pid}"):
            Spool(str(path), MB).open()
    finally:
        holder.kill()
        holder.wait()
    opened(path).close()


def test_the_previous_versions_spool_is_moved_into_the_new_one(tmp_path: Path) -> None:
    path = tmp_path / "spool"
    old = events(3)
    lines = [
        json.dumps(
            {
                "id": event.event_id,
                "ts": event.ts.isoformat(),
                "user": event.sasl_username,
                "sender": event.sender,
                "ip": event.client_address,
                "rcpt": event.recipient_count,
                "action": event.outcome.value,
            }
        ).encode()
        + b"\n"
        for event in old
    ]
    path.write_bytes(b"".join(lines))
    (tmp_path / "spool.offset").write_text(f"{len(lines[0])}\n")  # the first one was replayed
    pending, problems = reopen(path)
    assert pending == old[1:]
    assert any("previous version" in problem for problem in problems)
    assert not path.exists() and not (tmp_path / "spool.offset").exists()
    assert reopen(path)[0] == old[1:]  # now in the new spool, still waiting


# ---------------------------------------------------------------------------
# a real full disk: a small tmpfs (needs root to mount; CI runs as root)
# ---------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "disk", "256k") as mount:
        yield mount


def test_a_short_write_on_a_full_disk_is_taken_back(small_disk: Path) -> None:
    path = small_disk / "spool"
    spool = opened(path)
    first = events(5)
    spool.append(first)
    filler = fill_disk(small_disk)
    with pytest.raises(OSError):
        spool.append(events(400, "bob"))  # far more than the space left: cut short, then ENOSPC
    size = segment(path).stat().st_size
    assert size == sum(len(encode_event(event)) for event in first)  # nothing half written stays
    filler.unlink()  # space again: appends go on, and nothing before is lost
    later = events(3, "carol")
    spool.append(later)
    spool.close()
    pending, problems = reopen(path)
    assert problems == []
    assert pending == first + later
