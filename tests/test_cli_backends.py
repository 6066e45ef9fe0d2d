"""`policyd migrate`, `top` and `purge` on every backend (real servers)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner

from policyd.cli import main
from policyd.quota import Outcome
from policyd.storage import Event, create_storage


def run(config: Path, *arguments: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [*arguments, "-c", str(config)], catch_exceptions=False)
    return result.exit_code, result.stdout


async def add_history(url: str, table: str) -> None:
    storage = create_storage(url, table)
    await storage.open()
    now = datetime.now(UTC)
    try:
        await storage.add_events(
            [
                Event(now - timedelta(minutes=i), "alice", "a@example.org", "192.0.2.1", 10, Outcome.DUNNO)
                for i in range(3)
            ]
            + [Event(now, "alice", "a@example.org", "192.0.2.1", 1500, Outcome.HOLD)]
            + [Event(now, "bob", "b@example.org", "192.0.2.2", 7, Outcome.REJECT)]
            + [
                Event(
                    now - timedelta(days=9, seconds=i), "old", "o@example.org", "192.0.2.3", 1, Outcome.DUNNO
                )
                for i in range(12)
            ]
        )
    finally:
        await storage.close()


def test_migrate_top_purge(database: tuple[str, str], tmp_path: Path) -> None:
    url, table = database
    config = tmp_path / "policyd.cfg"
    config.write_text(f"database = {url}\npolicy_table = {table}\n")
    config.chmod(0o600)

    code, output = run(config, "migrate", "--dry-run")
    assert code == 0 and output.startswith("would create table"), output
    code, output = run(config, "migrate")
    assert code == 0 and "create table" in output, output
    code, output = run(config, "migrate")
    assert (code, output) == (0, "schema is up to date\n")

    asyncio.run(add_history(url, table))
    code, output = run(config, "top")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].split()[:7] == ["user", "counted", "recipients", "messages", "held", "rejected", "ips"]
    assert lines[1].split()[:7] == ["alice", "1530", "1530", "4", "1", "0", "1"]
    assert lines[2].split()[:7] == ["bob", "0", "7", "1", "0", "1", "1"]
    assert len(lines) == 3  # "old" is outside the 24h window
    code, output = run(config, "top", "--window", "30d", "-n", "1")
    assert len(output.splitlines()) == 2

    code, output = run(config, "purge")
    assert (code, output) == (0, "deleted 12 events\n")
    code, output = run(config, "top", "--window", "30d")
    assert "old" not in output
