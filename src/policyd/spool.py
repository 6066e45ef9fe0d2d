"""The spool: every counted event on local disk, in the order answered, until the database has it.

Each event is appended here before its answer goes out, and the database is written
behind it, in order, from here (writer.py).  So a crash of policyd (kill -9) loses no
answered event: what the database had not got yet is replayed at the next start, and
exactly once, since every event has a unique ``event_id`` the database skips when it
has it.  The spool is fsync'd every second (``sync``): a power cut loses at most that.
While the database is down it just grows, up to ``spool_max_size``.

Files, beside the ``spool`` setting (the base name)::

    <spool>.000001, .000002, ...   segments of records; the last one is appended to
    <spool>.done                   how far the database has got: "<segment> <offset>"
    <spool>.lock                   held (flock) by the daemon using the spool, with its pid

A record is ``MARKER (2 bytes) | payload length (u32) | CRC-32 of the payload (u32) |
payload`` (struct ``_EVENT`` and the strings it counts).  Reading tells a torn record
from a damaged one: a record cut short at the end of the last segment (the process
died writing it) is cut off; a damaged record anywhere else is skipped, the reader
finding the next one by its marker and checksum, and counted and reported, and the
records after it are read as usual.  An append that the disk cuts short (ENOSPC after
some bytes) is taken back (truncated) and fails whole: no partial record is left.

Every method does blocking file I/O; the writer calls them from threads of its own, but
for append_quick(), one write to the page cache, which it makes from the event loop.  A
lock makes appends (one at a time) and reads and commits (another thread) safe together.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import struct
import threading
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from policyd.quota import Outcome
from policyd.storage.base import Event

_MARKER = b"\xa7\x5e"
_HEADER = struct.Struct("<2sII")  # marker, payload length, crc32
# ts (ms), recipients, outcome code, then the byte lengths of event_id, user, sender,
# client address, queue id; the five strings (UTF-8) follow in that order.
_EVENT = struct.Struct("<qIBBHHHH")
_OUTCOMES = (Outcome.DUNNO, Outcome.HOLD, Outcome.REJECT)
_CODES = {outcome: code for code, outcome in enumerate(_OUTCOMES)}
# A record longer than this is not one (the protocol caps every string far below).
_MAX_PAYLOAD = 256 * 1024
# A segment is started afresh past this size (or an eighth of the spool's bound, if that
# is smaller): segments the database has caught up with are deleted whole.
SEGMENT_BYTES = 4 * 1024 * 1024

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)

Position = tuple[int, int]  # (segment number, byte offset in it)


class SpoolFull(Exception):
    """Appending would pass the configured size limit."""


class SpoolLocked(Exception):
    """Another process uses this spool."""


def encode_event(event: Event) -> bytes:
    """One record: header and payload."""
    strings = [
        text.encode("utf-8", "surrogatepass")
        for text in (event.event_id, event.sasl_username, event.sender, event.client_address, event.queue_id)
    ]
    payload = _EVENT.pack(
        (event.ts - EPOCH) // MILLISECOND,
        event.recipient_count,
        _CODES[event.outcome],
        *map(len, strings),
    ) + b"".join(strings)
    return _HEADER.pack(_MARKER, len(payload), zlib.crc32(payload)) + payload


def decode_event(payload: bytes) -> Event:
    """The event of a record's payload (its checksum already verified); ValueError if it is
    not one."""
    try:
        ms, recipients, code, *lengths = _EVENT.unpack_from(payload)
        position = _EVENT.size
        strings = []
        for length in lengths:
            strings.append(payload[position : position + length].decode("utf-8", "surrogatepass"))
            position += length
        if position != len(payload):
            raise ValueError("lengths do not add up")
        event_id, user, sender, address, queue_id = strings
        return Event(
            EPOCH + timedelta(milliseconds=ms),
            user,
            sender,
            address,
            recipients,
            _OUTCOMES[code],
            event_id=event_id,
            queue_id=queue_id,
        )
    except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as error:
        raise ValueError(f"not an event record: {error}") from None


@dataclass
class Opened:
    """What a previous run left in the spool."""

    events: list[Event] = field(default_factory=list)  # not in the database yet, in order
    problems: list[str] = field(default_factory=list)  # each worth a line in the log
    damaged: int = 0  # damaged stretches skipped
    damaged_bytes: int = 0


@dataclass(frozen=True, slots=True)
class Batch:
    events: list[Event]
    end: Position  # where reading goes on once these are in the database


class Spool:
    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.segment_bytes = max(4096, min(SEGMENT_BYTES, max_bytes // 8))
        self.done_path = Path(f"{path}.done")
        self.lock_path = Path(f"{path}.lock")
        self._lock = threading.Lock()
        self._lock_file: int | None = None
        self._segments: dict[int, int] = {}  # segment number -> bytes in it
        self._append_fd: int | None = None
        self._active = 1  # the segment appended to
        self._done: Position = (1, 0)  # everything before this is in the database
        self._done_saved: Position = (1, 0)
        self._unsynced = False

    # -- state ------------------------------------------------------------------

    @property
    def end(self) -> Position:
        """Where the next record goes (everything before it is in the spool)."""
        return (self._active, self._segments.get(self._active, 0))

    @property
    def done(self) -> Position:
        return self._done

    @property
    def total_bytes(self) -> int:
        return sum(list(self._segments.values()))  # a copy: another thread may change it

    @property
    def pending_bytes(self) -> int:
        """Bytes of events the database does not have yet."""
        segment, offset = self._done
        return sum(size for number, size in list(self._segments.items()) if number >= segment) - offset

    def segment_path(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number:06d}")

    # -- opening -------------------------------------------------------------------

    def open(self) -> Opened:
        """Take the lock, and load what a previous run left (raises SpoolLocked, OSError)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._take_lock()
        opened = Opened()
        self._done = self._done_saved = self._read_done(opened)
        for path in sorted(self.path.parent.glob(f"{self.path.name}.[0-9][0-9][0-9][0-9][0-9][0-9]")):
            self._segments[int(path.suffix[1:])] = path.stat().st_size
        if self._segments:
            self._active = max(self._segments)
            first = min(self._segments)
            if self._done[0] < first:
                self._done = (first, 0)
        else:
            self._active = max(1, self._done[0])
            self._done = (self._active, 0)
        for number in sorted(self._segments):
            if number < self._done[0]:
                self.segment_path(number).unlink(missing_ok=True)  # the database had it all
                del self._segments[number]
        self._load_pending(opened)
        legacy = self._convert_legacy_spool(opened)
        self._append_fd = os.open(
            self.segment_path(self._active), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640
        )
        self._segments.setdefault(self._active, 0)
        if legacy:
            _, taken = self.append(legacy)
            opened.events.extend(legacy[:taken])
            if taken < len(legacy):
                opened.problems.append(f"{len(legacy) - taken} events of the previous spool do not fit; lost")
            Path(self.path).unlink(missing_ok=True)
            Path(f"{self.path}.offset").unlink(missing_ok=True)
        return opened

    def _take_lock(self) -> None:
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with contextlib.suppress(OSError):
                holder = os.pread(descriptor, 32, 0).decode("ascii", "replace").strip()
            os.close(descriptor)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise SpoolLocked(
                f"the spool {self.path} is in use by another policyd{pid}; each daemon needs a spool of "
                "its own (the spool setting)"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
        self._lock_file = descriptor

    def _read_done(self, opened: Opened) -> Position:
        try:
            text = self.done_path.read_text().strip()
        except FileNotFoundError:
            return (1, 0)
        parts = text.split()
        if len(parts) != 2 or not all(part.isdigit() for part in parts):
            opened.problems.append(f"{self.done_path}: unreadable ({text[:30]!r}); replaying the whole spool")
            return (0, 0)
        return (int(parts[0]), int(parts[1]))

    def _load_pending(self, opened: Opened) -> None:
        segment, offset = self._done
        if offset > self._segments.get(segment, 0):
            opened.problems.append(
                f"{self.done_path}: points past the end of {self.segment_path(segment)}; replaying it whole"
            )
            self._done = (segment, 0)
        for number in sorted(self._segments):
            if number < self._done[0]:
                continue
            start = self._done[1] if number == self._done[0] else 0
            last = number == self._active
            events, _, good_end = self._read_segment(number, start, opened=opened, last=last)
            opened.events.extend(events)
            if last and good_end < self._segments[number]:
                os.truncate(self.segment_path(number), good_end)
                self._segments[number] = good_end

    def _convert_legacy_spool(self, opened: Opened) -> list[Event]:
        """The previous version's spool (JSON lines in <spool>, an offset in <spool>.offset):
        its events not yet in the database, to be appended here."""
        legacy = self.path
        if not legacy.is_file() or legacy.stat().st_size == 0:
            return []
        try:
            offset = int(Path(f"{legacy}.offset").read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            offset = 0
        events: list[Event] = []
        with legacy.open("rb") as legacy_file:
            legacy_file.seek(offset)
            for number, line in enumerate(legacy_file, start=1):
                if not line.endswith(b"\n"):
                    opened.problems.append(f"{legacy}: cut off an unfinished last line ({len(line)} bytes)")
                    break
                try:
                    record = json.loads(line)
                    events.append(
                        Event(
                            datetime.fromisoformat(record["ts"]),
                            record["user"],
                            record["sender"],
                            record["ip"],
                            int(record["rcpt"]),
                            Outcome(record["action"]),
                            event_id=record["id"],
                        )
                    )
                except (ValueError, KeyError, TypeError):
                    opened.damaged += 1
                    opened.damaged_bytes += len(line)
                    opened.problems.append(f"{legacy}: line {number} is damaged; skipped")
        if events:
            opened.problems.append(
                f"{legacy}: {len(events)} events of the previous version's spool moved here"
            )
        return events

    # -- reading -------------------------------------------------------------------

    def _read_segment(
        self,
        number: int,
        start: int,
        *,
        stop: int | None = None,
        limit: int | None = None,
        opened: Opened | None = None,
        last: bool = False,
    ) -> tuple[list[Event], int, int]:
        """Records of one segment from `start` up to byte `stop` (None: its end), at most
        `limit` of them: (events, where reading stopped, the end of the last good record).

        In the last segment (`last`), a record that runs past the end with nothing good
        after it is a torn write: reading stops before it.  Any other bad stretch is
        skipped (reported into `opened`).
        """
        path = self.segment_path(number)
        with path.open("rb") as segment:
            segment.seek(start)
            data = segment.read() if stop is None else segment.read(max(0, stop - start))
        events: list[Event] = []
        position = good_end = 0
        damaged_from: int | None = None
        while position < len(data) and (limit is None or len(events) < limit):
            event, length = self._record_at(data, position)
            if event is not None:
                if damaged_from is not None:
                    self._report_damage(opened, path, start + damaged_from, position - damaged_from)
                    damaged_from = None
                events.append(event)
                position += length
                good_end = position
                continue
            if last and length < 0 and not self._good_record_after(data, position):
                if damaged_from is not None:
                    self._report_damage(opened, path, start + damaged_from, position - damaged_from)
                    damaged_from = None
                if opened is not None:
                    opened.problems.append(
                        f"{path}: cut off an unfinished last record ({len(data) - position} bytes)"
                    )
                break
            if damaged_from is None:
                damaged_from = position
            found = data.find(_MARKER, position + 1)
            position = len(data) if found < 0 else found
        if damaged_from is not None:
            self._report_damage(opened, path, start + damaged_from, position - damaged_from)
            if last:
                good_end = position  # damaged, not torn: what is past it is gone anyway
        return events, start + position, start + good_end

    def _good_record_after(self, data: bytes, position: int) -> bool:
        found = data.find(_MARKER, position + 1)
        while found >= 0:
            if self._record_at(data, found)[0] is not None:
                return True
            found = data.find(_MARKER, found + 1)
        return False

    @staticmethod
    def _report_damage(opened: Opened | None, path: Path, offset: int, length: int) -> None:
        if opened is None or length <= 0:
            return
        opened.damaged += 1
        opened.damaged_bytes += length
        opened.problems.append(
            f"{path}: {length} damaged bytes at offset {offset} skipped; the records after them are replayed"
        )

    @staticmethod
    def _record_at(data: bytes, position: int) -> tuple[Event | None, int]:
        """(event, record length) of a good record at `position`; (None, -1) for one that
        runs past the end of `data`, (None, 0) for anything else."""
        if len(data) - position < _HEADER.size:
            return None, -1
        marker, length, checksum = _HEADER.unpack_from(data, position)
        if marker != _MARKER or length > _MAX_PAYLOAD:
            return None, 0
        start = position + _HEADER.size
        if start + length > len(data):
            return None, -1
        payload = data[start : start + length]
        if zlib.crc32(payload) != checksum:
            return None, 0
        try:
            return decode_event(payload), _HEADER.size + length
        except ValueError:
            return None, 0

    def read(self, start: Position, max_events: int, stop: Position) -> Batch:
        """Up to `max_events` events from `start`, not past `stop` (what has been appended)."""
        events: list[Event] = []
        segment, offset = start
        while (segment, offset) < stop and len(events) < max_events:
            with self._lock:
                size = self._segments.get(segment)
            if size is None or (segment < stop[0] and offset >= size):
                segment, offset = segment + 1, 0  # finished (or gone): the next segment
                continue
            bound = stop[1] if segment == stop[0] else size
            if offset >= bound:
                break
            more, offset, _ = self._read_segment(segment, offset, stop=bound, limit=max_events - len(events))
            events.extend(more)
            if offset >= bound and segment < stop[0]:
                segment, offset = segment + 1, 0
        return Batch(events, (segment, offset))

    # -- writing -------------------------------------------------------------------

    def append(self, events: list[Event]) -> tuple[Position, int]:
        """Append events (written, not yet fsync'd): as many as fit, in order.  Returns the
        end of the spool after them and how many were appended.

        Raises SpoolFull (not even the first fits within the size limit) or OSError (a
        full disk, say: then none is, nothing of them is left in the spool).
        """
        return self.append_records([encode_event(event) for event in events])

    def append_records(self, records: list[bytes]) -> tuple[Position, int]:
        """append() of records already encoded (encode_event)."""
        appended = self._append(records, quick=False)
        assert appended is not None
        return appended

    def append_quick(self, records: list[bytes]) -> tuple[Position, int] | None:
        """append_records(), if it is one write to the open segment; None (nothing done) if
        it needs more (a new segment, which fsyncs the last one, or reclaiming room): the
        writer calls this from the event loop, and the rest from its thread."""
        return self._append(records, quick=True)

    def _append(self, records: list[bytes], quick: bool) -> tuple[Position, int] | None:
        # One thread appends at a time (the writer sees to it); the lock covers only the
        # bookkeeping, never a write, so that commit() never waits for a disk.
        needed = sum(map(len, records))
        with self._lock:
            room = self.max_bytes - self.total_bytes
            reclaim = needed > room and self._done == self.end and self._segments.get(self._active, 0) > 0
            rotate = self._segments.get(self._active, 0) >= self.segment_bytes
        if quick and (reclaim or rotate):
            return None
        if reclaim:
            self._reclaim()
            with self._lock:
                room = self.max_bytes - self.total_bytes
        taken = 0
        for record in records:
            if len(record) > room:
                break
            room -= len(record)
            taken += 1
        if not taken:
            raise SpoolFull(f"{self.path} would exceed its limit of {self.max_bytes} bytes")
        if rotate:
            self._start_segment()
        descriptor = self._append_fd
        if descriptor is None:
            raise OSError(f"{self.path}: spool not open")
        data = b"".join(records[:taken])
        before = self._segments[self._active]
        written = 0
        try:
            while written < len(data):
                # os.write may write less than asked (a disk filling up): go on with
                # the rest, and if that fails, take back what got written.
                written += os.write(descriptor, data[written:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, before)
            raise
        with self._lock:
            self._segments[self._active] = before + len(data)
            self._unsynced = True
            return self.end, taken

    def _start_segment(self) -> None:
        """The next segment for appends (the one before is fsync'd first)."""
        descriptor = os.open(
            self.segment_path(self._active + 1), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640
        )
        previous = self._append_fd
        with self._lock:
            self._active += 1
            self._append_fd = descriptor
            self._segments[self._active] = 0
        if previous is not None:
            os.fsync(previous)
            os.close(previous)

    def _reclaim(self) -> None:
        """Make room: the appended-to segment, of which the database has all, starts over."""
        if self._append_fd is None:
            return
        os.ftruncate(self._append_fd, 0)
        with self._lock:
            self._segments[self._active] = 0
            self._done = (self._active, 0)
        self._save_done()

    def commit(self, position: Position) -> bool:
        """Everything before `position` is in the database (no file I/O: the position is
        saved by sync()).  True if segments can now be deleted (delete_finished)."""
        with self._lock:
            self._done = max(self._done, position)
            return any(number < self._done[0] for number in self._segments)

    def delete_finished(self) -> None:
        """Delete the segments the database has all of."""
        with self._lock:
            finished = [number for number in self._segments if number < self._done[0]]
            for number in finished:
                del self._segments[number]
        for number in finished:
            self.segment_path(number).unlink(missing_ok=True)

    def _save_done(self) -> None:
        done = self._done
        if done == self._done_saved:
            return
        temporary = self.done_path.with_name(self.done_path.name + ".tmp")
        temporary.write_text(f"{done[0]} {done[1]}\n")
        os.replace(temporary, self.done_path)
        self._done_saved = done

    def sync(self) -> None:
        """fsync what was appended, and save how far the database has got (so a crash
        replays at most a second of events again, which the database skips).  Called by
        the thread that appends."""
        with self._lock:
            descriptor, unsynced = self._append_fd, self._unsynced
            self._unsynced = False
        if descriptor is not None and unsynced:
            os.fsync(descriptor)
        self._save_done()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sync()
        with self._lock:
            if self._append_fd is not None:
                os.close(self._append_fd)
                self._append_fd = None
            if self._lock_file is not None:
                os.close(self._lock_file)  # releases the flock
                self._lock_file = None


def pending_on_disk(path: str) -> int:
    """Bytes of events a spool holds that the database does not have (as far as its .done
    file says), read from the files alone: for status and tests."""
    spool = Path(path)
    try:
        segment, offset = (int(part) for part in Path(f"{path}.done").read_text().split())
    except (FileNotFoundError, ValueError):
        segment, offset = 0, 0
    total = 0
    for candidate in spool.parent.glob(f"{spool.name}.[0-9][0-9][0-9][0-9][0-9][0-9]"):
        number = int(candidate.suffix[1:])
        if number >= segment:
            total += candidate.stat().st_size - (offset if number == segment else 0)
    return max(total, 0)
