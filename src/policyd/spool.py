"""The spool: events the database could not take yet, kept on local disk until it can.

An append-only file, one JSON event per line, fsync'd before Postfix gets its answer.
Replay progress is a byte offset kept in a second file (``<spool>.offset``), replaced
atomically after each batch is committed to the database.  A crash between the commit
and the offset update replays that batch again, which is harmless: every event has a
unique ``event_id`` and the database skips ids it already has.  So each event lands
exactly once, in the order it was spooled, whatever happens to the process.

All methods here are blocking file I/O; the daemon calls them from a worker thread.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from policyd.quota import Outcome
from policyd.storage.base import Event


class SpoolFull(Exception):
    """Appending would pass the configured size limit."""


class SpoolCorrupt(Exception):
    pass


def encode_event(event: Event) -> bytes:
    record = {
        "id": event.event_id,
        "ts": event.ts.isoformat(),
        "user": event.sasl_username,
        "sender": event.sender,
        "ip": event.client_address,
        "rcpt": event.recipient_count,
        "action": event.outcome.value,
    }
    return json.dumps(record, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def decode_event(line: bytes) -> Event:
    try:
        record = json.loads(line)
        return Event(
            ts=datetime.fromisoformat(record["ts"]),
            sasl_username=record["user"],
            sender=record["sender"],
            client_address=record["ip"],
            recipient_count=int(record["rcpt"]),
            outcome=Outcome(record["action"]),
            event_id=record["id"],
        )
    except (ValueError, KeyError, TypeError) as error:
        raise SpoolCorrupt(f"bad spool line {line[:80]!r}: {error}") from None


@dataclass(frozen=True, slots=True)
class Batch:
    events: list[Event]
    end_offset: int  # where replay continues once these are in the database


class Spool:
    def __init__(self, path: str, max_bytes: int) -> None:
        self.path = Path(path)
        self.offset_path = Path(f"{path}.offset")
        self.max_bytes = max_bytes
        self.size = 0  # bytes in the spool file
        self.offset = 0  # bytes of it already in the database

    @property
    def pending_bytes(self) -> int:
        return self.size - self.offset

    def open(self) -> tuple[list[Event], list[str]]:
        """Load what a previous run left: (events not yet replayed, problems found).

        A torn last line (the process died in the middle of a write) is cut off, and so
        is anything after a corrupt line; both are reported.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        problems: list[str] = []
        self.offset = self._read_offset(problems)
        events: list[Event] = []
        good_end = self.offset
        if self.path.exists():
            with self.path.open("rb") as spool_file:
                spool_file.seek(self.offset)
                position = self.offset
                for line in spool_file:
                    if not line.endswith(b"\n"):
                        problems.append(f"{self.path}: cut off an unfinished last line ({len(line)} bytes)")
                        break
                    try:
                        events.append(decode_event(line))
                    except SpoolCorrupt as error:
                        problems.append(f"{self.path}: {error}; ignoring the rest of the file")
                        break
                    position += len(line)
                good_end = position
            if good_end < self.path.stat().st_size:
                os.truncate(self.path, good_end)
        self.size = good_end
        if not events:
            self.reset()
        return events, problems

    def _read_offset(self, problems: list[str]) -> int:
        try:
            text = self.offset_path.read_text().strip()
        except FileNotFoundError:
            return 0
        size = self.path.stat().st_size if self.path.exists() else 0
        if not text.isdigit() or int(text) > size:
            problems.append(f"{self.offset_path}: bad offset {text[:20]!r}; replaying the whole spool")
            return 0
        return int(text)

    def append(self, events: list[Event]) -> None:
        """Append events durably (written and fsync'd) or raise SpoolFull / OSError."""
        data = b"".join(encode_event(event) for event in events)
        if self.size + len(data) > self.max_bytes:
            raise SpoolFull(f"{self.path} would exceed its limit of {self.max_bytes} bytes")
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(descriptor, data)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        self.size += len(data)

    def read_batch(self, max_events: int) -> Batch:
        """The next events to replay, from the replay offset."""
        events: list[Event] = []
        position = self.offset
        with self.path.open("rb") as spool_file:
            spool_file.seek(self.offset)
            while len(events) < max_events and position < self.size:
                line = spool_file.readline()
                if not line.endswith(b"\n"):
                    break
                events.append(decode_event(line))
                position += len(line)
        return Batch(events, position)

    def commit(self, offset: int) -> None:
        """Record that everything before `offset` is in the database."""
        temporary = self.offset_path.with_name(self.offset_path.name + ".tmp")
        with temporary.open("w") as offset_file:
            offset_file.write(f"{offset}\n")
            offset_file.flush()
            os.fsync(offset_file.fileno())
        os.replace(temporary, self.offset_path)
        self.offset = offset
        if self.offset >= self.size:
            self.reset()

    def reset(self) -> None:
        """Empty the spool (everything in it is in the database)."""
        if self.path.exists():
            os.truncate(self.path, 0)
        self.offset_path.unlink(missing_ok=True)
        self.size = self.offset = 0
