"""Rules changed at run time by the CLI, applied by every daemon sharing the database
within the bound, on every backend (real servers): overrides, allow / block, reset."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from policyd.cli import main
from policyd.clock import to_ms, utc_now
from policyd.daemon import Daemon
from tests.conftest import RunningDaemon, make_settings, run_daemon

# The bound stated in docs/configuration.md (a tail interval, a query, with room).
APPLIED_WITHIN = 1.0
QUOTA = 10


async def cli(config: Path, *arguments: str) -> Result:
    runner = CliRunner()
    result = await asyncio.to_thread(runner.invoke, main, [*arguments, "-c", str(config)])
    assert result.exit_code == 0, (arguments, result.output, result.exception)
    return result


async def applied(daemons: list[RunningDaemon], check: Callable[[Daemon], bool]) -> float:
    """Seconds until `check` holds on every daemon (fails past 5 s)."""
    started = time.monotonic()
    while not all(check(running.daemon) for running in daemons):
        assert time.monotonic() - started < 5, "not applied in 5 s"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


def quota_of(daemon: Daemon, user: str) -> int:
    decider = daemon.decider
    assert decider is not None
    return decider.runtime.rules_for(user, decider.settings.rules, to_ms(utc_now())).quota


def blocked(daemon: Daemon, client: str) -> bool:
    assert daemon.decider is not None
    return daemon.decider.runtime.blocked("anyone", "", client, to_ms(utc_now())) is not None


def total(daemon: Daemon, user: str) -> int:
    decider = daemon.decider
    assert decider is not None
    return decider.totals(user, to_ms(utc_now()), decider.settings.rules)[0]


async def test_rules_set_by_the_cli_are_applied_by_every_daemon_within_the_bound(
    database: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url, table = database
    config = tmp_path / "policyd.cfg"
    config.write_text(f"database = {url}\npolicy_table = {table}\ndefaultquota = {QUOTA}\n")
    config.chmod(0o600)
    caplog.set_level(logging.INFO, logger="policyd")
    delays: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        daemons = [
            await stack.enter_async_context(
                run_daemon(
                    make_settings(url, table, quota=QUOTA, reject_quota=2 * QUOTA, spool=f"{tmp_path}/s{n}")
                )
            )
            for n in range(2)
        ]
        first, second = [await daemon.client() for daemon in daemons]

        # An override: the teacher may send to a class.
        await cli(config, "quota", "set", "Teacher", "100", "--reason", "class of 2,000", "--until", "7d")
        delays.append(await applied(daemons, lambda d: quota_of(d, "teacher") == 100))
        assert await second.ask(sasl_username="teacher", recipient_count=50) == "DUNNO"
        assert await first.ask(sasl_username="pupil", recipient_count=15) == "HOLD quota exceeded"
        assert "rules changed, applied: 1 overrides" in caplog.text

        # A block by network (REJECT), an allow by user.
        await cli(config, "block", "192.0.2.0/24", "--action", "REJECT", "--reason", "botnet")
        delays.append(await applied(daemons, lambda d: blocked(d, "192.0.2.77")))
        reply = await first.ask(sasl_username="carol", client_address="192.0.2.77", recipient_count=1)
        assert reply == "REJECT blocked"
        await cli(config, "allow", "bob")
        delays.append(
            await applied(
                daemons,
                lambda d: (
                    d.decider is not None
                    and d.decider.runtime.allowed("bob", "", "198.51.100.1", to_ms(utc_now())) is not None
                ),
            )
        )
        for _ in range(3):
            assert (
                await second.ask(sasl_username="bob", client_address="198.51.100.1", recipient_count=9)
                == "DUNNO"
            )
        assert total(daemons[1].daemon, "bob") == 0  # allowed: not counted
        await cli(config, "unlist", "192.0.2.0/24")
        delays.append(await applied(daemons, lambda d: not blocked(d, "192.0.2.77")))

        # A reset: every daemon forgets what the user sent before it.
        assert await first.ask(sasl_username="phished", recipient_count=15) == "HOLD quota exceeded"
        await applied(daemons, lambda d: total(d, "phished") == 15)
        await cli(config, "reset", "phished", "--reason", "password changed")
        delays.append(await applied(daemons, lambda d: total(d, "phished") == 0))
        assert "reset of user phished applied: 15 recipients forgotten (password changed)" in caplog.text
        assert await second.ask(sasl_username="phished", recipient_count=1) == "DUNNO"

        await cli(config, "quota", "unset", "teacher")
        delays.append(await applied(daemons, lambda d: quota_of(d, "teacher") == QUOTA))
        # Back to the configured quota: the 50 sent are past its REJECT threshold.
        assert await second.ask(sasl_username="teacher", recipient_count=1) == "REJECT max quota exceeded"
        for client in (first, second):
            await client.close()

    print(f"\nrules applied by both daemons after: max {max(delays) * 1000:.0f} ms")
    assert max(delays) <= APPLIED_WITHIN, delays

    # A daemon started now: the reset holds (the events are still in the table).
    async with run_daemon(make_settings(url, table, quota=QUOTA, spool=f"{tmp_path}/s9")) as late:
        assert total(late.daemon, "phished") == 1
        assert quota_of(late.daemon, "teacher") == QUOTA


async def test_missing_rules_tables_are_said_and_mail_flows(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> None:
    from tests.conftest import execute_admin_sql

    url = f"sqlite://{tmp_path}/policyd.sqlite"
    caplog.set_level(logging.INFO, logger="policyd")
    async with run_daemon(make_settings(url, quota=QUOTA, reject_quota=2 * QUOTA)) as daemon:
        execute_admin_sql(request, url, "DROP TABLE events_lists;")
        deadline = time.monotonic() + 5
        while "the rules tables cannot be read" not in caplog.text:
            assert time.monotonic() < deadline, "the missing table was not said"
            await asyncio.sleep(0.05)
        client = await daemon.client()
        assert await client.ask(sasl_username="alice", recipient_count=QUOTA) == "HOLD quota exceeded"
        await client.close()
        assert daemon.daemon.outage is not None and not daemon.daemon.outage.active
    assert caplog.text.count("the rules tables cannot be read") == 1
