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
from tests.conftest import (
    PolicyClient,
    count_rows,
    execute_admin_sql,
    fill_disk,
    make_settings,
    mounted_tmpfs,
    run_daemon,
)


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


async def test_sqlite_and_spool_on_one_full_disk(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The disk under both fills up, under load, then has space again: every answered
    event is in the database or reported dropped, exactly; the log says why (SQLite's
    own words) and the outage starts and ends once, not at every successful read."""
    caplog.set_level(logging.INFO, "policyd")
    with mounted_tmpfs(tmp_path / "disk", "16m") as disk:
        url = f"sqlite://{disk}/policyd.sqlite"
        settings = make_settings(
            url,
            quota=10**6,
            reject_quota=2 * 10**6,
            db_timeout=0.2,
            db_retry=0.2,
            spool=f"{disk}/policyd.spool",
        )
        answered = 0
        phase = "before"
        async with run_daemon(settings) as daemon:

            async def load(client: PolicyClient, number: int) -> None:
                nonlocal answered
                sent = 0
                while phase != "done":
                    sent += 1
                    assert await client.ask(sender=f"s{number}-{sent}@example.org") == "DUNNO"
                    answered += 1

            clients = [await daemon.client() for _ in range(4)]
            tasks = [asyncio.create_task(load(client, number)) for number, client in enumerate(clients)]
            await asyncio.sleep(0.5)
            filler = fill_disk(disk)
            phase = "full"
            await asyncio.sleep(1.5)
            filler.unlink()
            phase = "space again"
            await asyncio.sleep(1.5)
            phase = "done"
            await asyncio.gather(*tasks)
            for client in clients:
                await client.close()
            outage, writer = daemon.daemon.outage, daemon.daemon.writer
            assert outage is not None and writer is not None
            deadline = time.monotonic() + 15
            while outage.active or not writer.caught_up_now():
                assert time.monotonic() < deadline, (
                    "not caught up",
                    outage.reason,
                    {path.name: path.stat().st_size for path in disk.iterdir()},
                )
                await asyncio.sleep(0.1)
            dropped = daemon.daemon.stats.events_dropped
        rows = await count_rows(url)
    assert answered == rows + dropped, (answered, rows, dropped)
    assert dropped > 0, "the disk was full: some events could go nowhere"
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any("database or disk is full" in line for line in errors), errors
    assert not any("no transaction is active" in line for line in errors), errors
    starts = caplog.text.count("database unavailable:")
    ends = caplog.text.count("database is back after")
    assert starts == ends == 1, (starts, ends)
    assert f"{dropped} events dropped" in caplog.text


async def test_another_sqlite_file_put_at_the_path_is_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    path = tmp_path / "policyd.sqlite"
    url = f"sqlite://{path}"
    async with run_daemon(make_settings(url, quota=30, reject_quota=60, db_retry=0.3)) as daemon:
        client = await daemon.client()
        for _ in range(5):
            assert await client.ask(recipient_count=2) == "DUNNO"
        await wait_for_rows(url, "events", 5)
        # A restore: the admin puts an older copy (here: an empty database) in its place.
        restored = tmp_path / "restored.sqlite"
        execute_admin_sql(None, f"sqlite://{restored}", "CREATE TABLE keep_me (x INTEGER)")
        os.replace(restored, path)
        for suffix in ("-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        answers = [await client.ask(recipient_count=2) for _ in range(5)]
        assert answers == ["DUNNO"] * 5  # 10 + 10: the window still counts what it held
        await wait_for_rows(url, "events", 5)  # the 5 since: in the file now at the path
        assert daemon.daemon.stats.events_dropped == 0
        await client.close()
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert sum("another file was put there" in line for line in errors) == 1, errors
    assert sum("using the file now there" in line for line in errors) == 1, errors
