"""Damage done to the database under a running daemon: the table dropped, the SQLite
file deleted or replaced.  Mail goes on being answered; what the daemon holds (its
window, its spool) goes into the table made again; every answered event is counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from policyd.clock import utc_now
from policyd.quota import Outcome
from policyd.storage import StorageError, create_storage
from tests.conftest import count_rows, execute_admin_sql, make_settings, run_daemon


async def wait_for_rows(url: str, table: str, expected: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            rows = await count_rows(url, table)
        except Exception:  # the table is not there yet
            rows = -1
        if rows == expected:
            return
        assert time.monotonic() < deadline, f"{rows} rows, not {expected}"
        await asyncio.sleep(0.1)


async def recipients_in(url: str) -> int:
    """alice's recipients in the database, whatever their outcome (-1: no table yet)."""
    store = create_storage(url)
    await store.open()
    try:
        return await store.recipients_since("alice", utc_now() - timedelta(hours=1), list(Outcome))
    except StorageError:
        return -1
    finally:
        await store.close()


async def test_the_table_dropped_under_the_daemon_is_made_again(
    request: pytest.FixtureRequest, database: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    url, table = database
    settings = make_settings(url, table, quota=30, reject_quota=60, db_retry=0.3)
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        for _ in range(10):
            assert await client.ask(recipient_count=2) == "DUNNO"
        await wait_for_rows(url, table, 10)
        execute_admin_sql(request, url, f"DROP TABLE {table}")
        # Answered as before, from the window: the 20 recipients counted before still count.
        answers = [await client.ask(recipient_count=2) for _ in range(10)]
        assert answers == ["DUNNO"] * 4 + ["HOLD quota exceeded"] * 6
        # The new table gets every event answered since the drop.
        await wait_for_rows(url, table, 10)
        assert daemon.daemon.stats.events_dropped == 0
        await client.close()
    assert await count_rows(url, table) == 10
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any("creating the table again" in error for error in errors), errors
    assert "Traceback" not in caplog.text


async def test_the_sqlite_file_deleted_under_the_daemon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    path = tmp_path / "policyd.sqlite"
    url = f"sqlite://{path}"
    settings = make_settings(url, quota=30, reject_quota=60, db_retry=0.3)
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        for _ in range(10):
            assert await client.ask(recipient_count=2) == "DUNNO"
        await wait_for_rows(url, "events", 10)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        answers = [await client.ask(recipient_count=2) for _ in range(10)]
        assert answers == ["DUNNO"] * 4 + ["HOLD quota exceeded"] * 6
        # A new file at the path, with every event the daemon held: the 10 before (the
        # window's, one row per millisecond) and the 10 after.
        deadline = time.monotonic() + 15
        while await recipients_in(url) != 40:
            assert time.monotonic() < deadline, await recipients_in(url)
            await asyncio.sleep(0.1)
        assert daemon.daemon.stats.events_dropped == 0
        await client.close()
    assert await recipients_in(url) == 40
    assert await count_rows(url, "events") >= 11
    warnings = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert sum("no longer names the open database" in line for line in warnings) == 1, warnings
    assert os.stat(path).st_size > 0
