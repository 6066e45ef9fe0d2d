"""The journal's path to disk: appends from the event loop, and off it when the disk is slow."""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from policyd import writer as writer_module
from policyd.spool import Position, pending_on_disk
from tests.conftest import make_settings, run_daemon


class CountedAppends:
    """Wraps a spool's two ways in: how many appends took which, and a slow disk on demand
    (the next `slow` quick appends take SLOW_APPEND_SECONDS more, as a struggling disk's)."""

    def __init__(self, spool: Any) -> None:
        self.quick = 0
        self.threaded = 0
        self.slow = 0
        quick, records = spool.append_quick, spool.append_records

        def append_quick(batch: list[bytes]) -> tuple[Position, int] | None:
            self.quick += 1
            if self.slow:
                self.slow -= 1
                time.sleep(writer_module.SLOW_APPEND_SECONDS * 2)
            result: tuple[Position, int] | None = quick(batch)
            return result

        def append_records(batch: list[bytes]) -> tuple[Position, int]:
            self.threaded += 1
            result: tuple[Position, int] = records(batch)
            return result

        spool.append_quick, spool.append_records = append_quick, append_records


async def test_appends_come_from_the_loop_until_one_is_slow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "policyd")
    settings = make_settings(f"sqlite://{tmp_path}/events.sqlite")
    async with run_daemon(settings) as running:
        appends = CountedAppends(running.daemon.writer.spool)
        client = await running.client()
        for _ in range(5):
            assert await client.ask(recipient_count=1) == "DUNNO"
        assert appends.quick >= 5 and appends.threaded == 0

        appends.slow = 1
        assert await client.ask(recipient_count=1) == "DUNNO"
        quick_before = appends.quick
        for _ in range(5):
            assert await client.ask(recipient_count=1) == "DUNNO"
        # After the slow one, every append goes through the thread, for a while.
        assert appends.quick == quick_before and appends.threaded >= 5
        await client.close()
    slow_lines = [record.getMessage() for record in caplog.records if " took " in record.getMessage()]
    assert len(slow_lines) == 1, slow_lines
    assert re.fullmatch(
        rf"spool: appending to {re.escape(settings.spool)} took \d+ ms; appending from a thread "
        rf"for the next {writer_module.SLOW_APPEND_PAUSE_SECONDS} s",
        slow_lines[0],
    ), slow_lines
    # Every event answered is in the database, whichever way it went to the spool.
    assert pending_on_disk(settings.spool) == 0


async def test_appends_wait_behind_the_fsync_in_order(tmp_path: Path) -> None:
    """While the journal's thread syncs, appends queue behind it there, and reach the
    database in the order they were answered."""
    settings = make_settings(f"sqlite://{tmp_path}/events.sqlite")
    async with run_daemon(settings) as running:
        writer = running.daemon.writer
        appends = CountedAppends(writer.spool)
        original_sync = writer.spool.sync

        def slow_sync() -> None:
            time.sleep(0.3)
            original_sync()

        writer.spool.sync = slow_sync
        client = await running.client()
        sync_task = asyncio.create_task(writer._in_journal_thread(writer.spool.sync))
        await asyncio.sleep(0.05)  # the sync is under way in the thread
        started = time.monotonic()
        assert await client.ask(recipient_count=1, sender="first@example.org") == "DUNNO"
        assert time.monotonic() - started > 0.1, "answered before the sync ended"
        assert appends.threaded == 1 and appends.quick == 0
        await sync_task
        assert await client.ask(recipient_count=1, sender="second@example.org") == "DUNNO"
        assert appends.quick == 1
        await client.close()
        await asyncio.wait_for(writer.caught_up.wait(), 5)
    with sqlite3.connect(tmp_path / "events.sqlite") as connection:
        senders = [row[0] for row in connection.execute("SELECT sender FROM events ORDER BY rowid")]
    assert senders == ["first@example.org", "second@example.org"]
