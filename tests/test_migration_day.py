"""Replacing go-policyd, as an admin does it on migration day (docs/migrating-from-go-policyd.md).

go-policyd's log lines word for word (against its source strings), its @domain cut
(strip_domain), its octal defaultquota, a retention or purge that would eat the window,
and a first start that must not change a production table unasked (auto_migrate), with
`migrate --dry-run` telling the rows and how to back them up.  On every backend where
the table is involved.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from policyd.cli import main
from policyd.config import ConfigError, settings_from_text
from policyd.quota import OfficeHours, Outcome
from policyd.storage import Event, create_storage
from tests.conftest import (
    add_events,
    count_rows,
    execute_admin_sql,
    free_port,
    make_settings,
    run_daemon,
    serve_command,
    wait_for_port,
)

FORMATS_FILE = Path(__file__).resolve().parent / "fixtures" / "go-policyd-log-formats.txt"


def go_formats() -> dict[str, str]:
    lines = [line for line in FORMATS_FILE.read_text().splitlines() if line and not line.startswith("#")]
    return dict(line.split("\t", 1) for line in lines)


def go_sprintf(format_string: str, *arguments: object) -> str:
    """fmt.Sprintf for the verbs go-policyd's lines use: %s of a string, %v of an int64."""
    values = iter(arguments)
    text = "".join(
        str(next(values)) if part in {"%s", "%v"} else part for part in re.split(r"(%[sv])", format_string)
    )
    assert next(values, None) is None, "more arguments than verbs"
    return text


def cli(config: Path, *arguments: str) -> Result:
    return CliRunner().invoke(main, [*arguments, "-c", str(config)], env={"POLICYD_CONFIG": None})


def write_config(tmp_path: Path, url: str, table: str, extra: str = "") -> Path:
    config = tmp_path / "policyd.cfg"
    config.write_text(f"database = {url}\npolicy_table = {table}\n{extra}")
    config.chmod(0o600)
    return config


def event(user: str, age: timedelta, recipients: int = 1) -> Event:
    return Event(datetime.now(UTC) - age, user, f"{user}@example.org", "192.0.2.1", recipients, Outcome.DUNNO)


# ---------------------------------------------------------------------------
# go-policyd's log lines, word for word
# ---------------------------------------------------------------------------


def test_the_fixture_holds_go_policyds_five_lines() -> None:
    assert sorted(go_formats()) == ["blacklisted", "deferring", "rejecting", "updating", "whitelisted"]


async def test_log_lines_are_go_policyds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    formats = go_formats()
    settings = make_settings(
        f"sqlite://{tmp_path}/policyd.sqlite",
        quota=10,
        reject_quota=20,
        blacklist=frozenset({"192.0.2.66"}),
        whitelist=frozenset({"newsletter"}),
        whitelist_hours=OfficeHours.parse("always"),
    )
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        assert await client.ask(recipient_count=4, client_address="192.0.2.10") == "DUNNO"
        assert await client.ask(recipient_count=8, client_address="192.0.2.10") == "HOLD quota exceeded"
        assert await client.ask(recipient_count=9, client_address="192.0.2.10") == "REJECT max quota exceeded"
        assert await client.ask(recipient_count=2, client_address="192.0.2.66") == "HOLD blacklisted"
        assert (
            await client.ask(sasl_username="newsletter", sender="news@example.org", recipient_count=800)
            == "DUNNO"
        )
        await client.close()
    lines = [record.getMessage() for record in caplog.records]
    sender, ip = "alice@example.org", "192.0.2.10"
    expected = [
        go_sprintf(formats["updating"], "alice", sender, ip, "4", 4),
        go_sprintf(formats["updating"], "alice", sender, ip, "8", 12),
        go_sprintf(formats["deferring"], 12, 10, "alice", sender, ip),
        go_sprintf(formats["updating"], "alice", sender, ip, "9", 21),
        go_sprintf(formats["rejecting"], 21, 10, "alice", sender, ip),
        go_sprintf(formats["blacklisted"], "alice", sender, "192.0.2.66", "2"),
        go_sprintf(formats["whitelisted"], "newsletter", "news@example.org", ip, "800"),
    ]
    assert [line for line in lines if line in expected] == expected
    assert "REJECTING overquota (21>2x10) for user alice" in expected[4]  # the fixture is what is meant


async def test_a_reject_threshold_of_policyds_own_is_shown_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(
        make_settings(f"sqlite://{tmp_path}/p.sqlite", quota=10, reject_quota=25)
    ) as daemon:
        client = await daemon.client()
        assert await client.ask(recipient_count=26) == "REJECT max quota exceeded"
        await client.close()
    assert "REJECTING overquota (26>25) for user alice using alice@example.org from ip [192.0.2.10]" in [
        record.getMessage() for record in caplog.records
    ]


# ---------------------------------------------------------------------------
# strip_domain
# ---------------------------------------------------------------------------


async def test_strip_domain_counts_user_at_domain_as_go_policyd_did(database: tuple[str, str]) -> None:
    url, table = database
    await add_events(url, table, [event("jdoe", timedelta(hours=1), 8)])  # written by go-policyd
    settings = replace(make_settings(url, table, quota=10), strip_domain=True)
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        assert await client.ask(sasl_username="JDoe@Univ.FR", recipient_count=1) == "DUNNO"  # 9
        assert (
            await client.ask(sasl_username="jdoe@other.example", recipient_count=1) == "HOLD quota exceeded"
        )
        # A name that is nothing but @domain is not cut to nothing (that would be unauthenticated).
        assert await client.ask(sasl_username="@univ.fr", recipient_count=10) == "HOLD quota exceeded"
        await client.close()
    storage = create_storage(url, table)
    await storage.open()
    try:
        top = await storage.top_senders(datetime.now(UTC) - timedelta(days=1), 10)
    finally:
        await storage.close()
    assert sorted((entry.sasl_username, entry.recipients) for entry in top) == [
        ("@univ.fr", 10),
        ("jdoe", 10),
    ]


async def test_without_strip_domain_the_whole_name_is_the_user(tmp_path: Path) -> None:
    async with run_daemon(make_settings(f"sqlite://{tmp_path}/p.sqlite", quota=10)) as daemon:
        client = await daemon.client()
        assert await client.ask(sasl_username="jdoe", recipient_count=9) == "DUNNO"
        assert await client.ask(sasl_username="jdoe@univ.fr", recipient_count=9) == "DUNNO"
        await client.close()


async def test_the_daemon_says_once_when_user_at_domain_meets_its_short_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite://{tmp_path}/p.sqlite"
    await add_events(url, "events", [event("jdoe", timedelta(hours=1)), event("bob", timedelta(hours=1))])
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(make_settings(url)) as daemon:
        client = await daemon.client()
        for user in ("carol@univ.fr", "jdoe@univ.fr", "bob@univ.fr", "jdoe@univ.fr"):
            assert await client.ask(sasl_username=user) == "DUNNO"
        await client.close()
    said = [
        record.getMessage() for record in caplog.records if "is counted apart from" in record.getMessage()
    ]
    assert said == [
        "jdoe@univ.fr is counted apart from jdoe, whose recipients are in the window (go-policyd cut "
        "@domain off logins): set strip_domain = yes to count them as one, or strip_domain = no to keep "
        "whole names and silence this"
    ]
    caplog.clear()
    async with run_daemon(replace(make_settings(url), strip_domain=False)) as daemon:
        client = await daemon.client()
        assert await client.ask(sasl_username="bob@other.example") == "DUNNO"
        await client.close()
    assert not [record for record in caplog.records if "is counted apart from" in record.getMessage()]


def test_strip_domain_and_auto_migrate_keys() -> None:
    assert settings_from_text("", "f").strip_domain is None  # not set: no, and the table is looked at
    assert settings_from_text("", "f").auto_migrate is True
    settings = settings_from_text("strip_domain = yes\nauto_migrate = no\n", "f")
    assert (settings.strip_domain, settings.auto_migrate) == (True, False)
    assert ("strip_domain", "yes") in settings.describe() and ("auto_migrate", "no") in settings.describe()
    with pytest.raises(ConfigError) as caught:
        settings_from_text("\nstrip_domain = maybe\n", "f")
    assert caught.value.problems == ["f:2: strip_domain: 'maybe' is not yes or no"]


def test_check_config_and_migrate_warn_about_a_table_of_short_names(
    database: tuple[str, str], tmp_path: Path
) -> None:
    url, table = database
    asyncio.run(
        add_events(url, table, [event("jdoe", timedelta(hours=1)), event("alice", timedelta(hours=2))])
    )
    config = write_config(tmp_path, url, table)
    result = cli(config, "check-config")
    assert result.exit_code == 0, result.output
    assert f"warning: table {table} holds only short user names in the last 24h" in result.stderr
    assert "set strip_domain = yes" in result.stderr
    assert result.stdout.endswith("configuration OK\n")
    dry = cli(config, "migrate", "--dry-run")
    assert dry.exit_code == 0 and "holds only short user names" in dry.stderr, dry.output
    # Said: no more warning, whichever way.
    for choice in ("yes", "no"):
        chosen = write_config(tmp_path, url, table, f"strip_domain = {choice}\n")
        assert "short user names" not in cli(chosen, "check-config").stderr
    # A name with a domain: users log in as user@domain and policyd already sees it.
    asyncio.run(add_events(url, table, [event("bob@univ.fr", timedelta(minutes=5))]))
    assert "short user names" not in cli(config, "check-config").stderr


def test_check_config_does_not_create_an_sqlite_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite://{tmp_path}/none.sqlite", "events")
    result = cli(config, "check-config")
    assert result.exit_code == 0 and result.stderr == "", result.output
    assert not (tmp_path / "none.sqlite").exists()


# ---------------------------------------------------------------------------
# defaultquota with a leading zero
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "warning"),
    [
        ("01500", "f:1: defaultquota: 01500 is read as 1500; go-policyd read it as octal (832)"),
        (
            "0900",
            "f:1: defaultquota: 0900 is read as 900; go-policyd could not read it (not octal) and used 0",
        ),
    ],
)
def test_octal_looking_defaultquota_is_warned_about(value: str, warning: str) -> None:
    settings = settings_from_text(f"defaultquota = {value}\n", "f")
    assert settings.rules.quota == int(value, 10)
    assert [text for text in settings.warnings if text.startswith(warning)], settings.warnings
    assert settings_from_text("defaultquota = 1500\n", "f").warnings == ()


def test_octal_defaultquota_is_warned_about_by_check_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite://{tmp_path}/p.sqlite", "events", "defaultquota = 01500\n")
    result = cli(config, "check-config")
    assert result.exit_code == 0
    assert (
        f"policyd: warning: {config}:3: defaultquota: 01500 is read as 1500; go-policyd read it as octal"
        in (result.stderr)
    )


def test_serve_logs_the_octal_warning_once_at_start(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(
        tmp_path, f"sqlite://{tmp_path}/p.sqlite", "events", f"port = {port}\ndefaultquota = 01500\n"
    )
    process = subprocess.Popen(
        serve_command(config),
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        wait_for_port(port, process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = process.stderr.read().decode() if process.stderr else ""
    warned = [line for line in log.splitlines() if "go-policyd read it as octal (832)" in line]
    assert len(warned) == 1 and f" WARNING: {config}:4: defaultquota: 01500 is read as 1500" in warned[0], log


# ---------------------------------------------------------------------------
# retention and purge inside the window
# ---------------------------------------------------------------------------


def test_retention_shorter_than_the_window_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_text("window = 36h\n\nretention = 1d\n", "f")
    assert caught.value.problems == [
        "f:3: retention (24h) is shorter than the window (36h): the daily purge would delete events "
        "the quota still counts; set retention = 36h or more"
    ]
    with pytest.raises(ConfigError) as caught:
        settings_from_text("window = 30d\n", "f")
    assert caught.value.problems[0].startswith(
        "f: retention (the default, 7d) is shorter than the window (30d)"
    )
    assert settings_from_text("window = 48h\nretention = 48h\n", "f").retention == timedelta(hours=48)


def test_purge_inside_the_window_needs_force_and_dry_run_counts(
    database: tuple[str, str], tmp_path: Path
) -> None:
    url, table = database
    ages = [timedelta(minutes=30), timedelta(hours=2), timedelta(hours=3), timedelta(days=9)]
    asyncio.run(add_events(url, table, [event("alice", age) for age in ages]))
    config = write_config(tmp_path, url, table)

    refused = cli(config, "purge", "--older-than", "1h")
    assert refused.exit_code == 2
    assert (
        "--older-than 1h is shorter than the window (24h)" in refused.stderr and "--force" in refused.stderr
    )
    assert asyncio.run(count_rows(url, table)) == 4

    dry = cli(config, "purge", "--older-than", "1h", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith("would delete 3 events older than ")
    assert "needs --force" in dry.stderr
    assert cli(config, "purge", "--dry-run").stdout.startswith("would delete 1 events older than ")
    assert asyncio.run(count_rows(url, table)) == 4

    forced = cli(config, "purge", "--older-than", "1h", "--force")
    assert (forced.exit_code, forced.stdout) == (0, "deleted 3 events\n")
    assert asyncio.run(count_rows(url, table)) == 1


# ---------------------------------------------------------------------------
# migrate --dry-run and auto_migrate
# ---------------------------------------------------------------------------

BACKUP_TOOLS = {
    "sqlite": "sqlite3 ",
    "mariadb": "mysqldump --single-transaction ",
    "galera": "mysqldump --single-transaction ",
    "postgresql": "pg_dump ",
}


def test_migrate_dry_run_tells_the_rows_and_how_to_back_up(
    request: pytest.FixtureRequest, backend: str, database: tuple[str, str], tmp_path: Path
) -> None:
    url, table = database
    asyncio.run(add_events(url, table, [event(f"user{i}", timedelta(minutes=i)) for i in range(5)]))
    execute_admin_sql(request, url, f"ALTER TABLE {table} DROP COLUMN queue_id")  # an older schema
    config = write_config(tmp_path, url, table, "strip_domain = no\n")

    dry = cli(config, "migrate", "--dry-run")
    assert dry.exit_code == 0, dry.output
    lines = dry.stdout.splitlines()
    assert lines[0] == f"table {table}: 5 rows, each kept (changed in place)"
    steps = [line for line in lines if line.startswith("would ")]
    assert steps and "queue_id" in steps[0], steps
    backup = next(line for line in lines if line.startswith("back up the table first: "))
    assert backup.removeprefix("back up the table first: ").startswith(BACKUP_TOOLS[backend]), backup
    assert "password" not in backup.lower() and "Whatever" not in backup

    done = cli(config, "migrate")
    assert done.exit_code == 0, done.output
    assert cli(config, "migrate", "--dry-run").stdout == "schema is up to date\n"
    assert asyncio.run(count_rows(url, table)) == 5


async def test_auto_migrate_no_says_what_and_runs_until_migrated(
    database: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url, table = database
    settings = replace(make_settings(url, table, db_retry=0.2), auto_migrate=False)
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        answers = [await client.ask(recipient_count=1) for _ in range(3)]
        assert answers == ["DUNNO"] * 3  # from memory, as while the database is down
        errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
        assert any(
            "the schema needs changes: create table" in line and "auto_migrate = no" in line
            for line in errors
        ), errors
        assert "needs the admin: auto_migrate = no" in daemon.daemon.status_line()
        await asyncio.sleep(0.5)
        storage = create_storage(url, table)
        await storage.open()
        try:
            assert await storage.pending_migrations() != []  # the daemon did not touch the schema
            await storage.migrate()  # the admin runs `policyd migrate`
        finally:
            await storage.close()
        for _ in range(100):
            if await count_rows(url, table) == 3:
                break
            await asyncio.sleep(0.1)
        assert await count_rows(url, table) == 3  # what it spooled meanwhile is written
        assert await client.ask(recipient_count=1) == "DUNNO"
        await client.close()
    assert await count_rows(url, table) == 4
