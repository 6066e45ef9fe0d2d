"""The `policyd` command, in-process with click's CliRunner (and once as a real process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from policyd import __version__
from policyd.cli import main
from policyd.config import KEYS, load_settings
from policyd.quota import Outcome
from policyd.storage import create_storage
from policyd.storage.base import Event
from policyd.storage.sqlite import SQLiteStorage
from tests.conftest import free_port

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PASSWORD = "WhateverYouWantAsPassword"


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={"POLICYD_CONFIG": None, **(env or {})})


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "x.sqlite"


@pytest.fixture
def config(tmp_path: Path, db_path: Path) -> Path:
    path = tmp_path / "policyd.cfg"
    path.write_text(f"# test\ndatabase = sqlite://{db_path}\n")
    return path


def tables(db_path: Path) -> set[str]:
    with sqlite3.connect(db_path) as connection:
        rows = connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    return {name for (name,) in rows}


def add_events(db_path: Path, *events: Event) -> None:
    async def insert() -> None:
        storage = SQLiteStorage(str(db_path))
        await storage.open()
        try:
            await storage.migrate()
            await storage.add_events(events)
        finally:
            await storage.close()

    asyncio.run(insert())


def count_events(db_path: Path) -> int:
    async def count() -> int:
        storage = SQLiteStorage(str(db_path))
        await storage.open()
        try:
            return await storage.count_events()
        finally:
            await storage.close()

    return asyncio.run(count())


def event(user: str, recipients: int, age: timedelta, outcome: Outcome = Outcome.DUNNO) -> Event:
    return Event(
        ts=datetime.now(UTC) - age,
        sasl_username=user,
        sender=f"{user}@example.org",
        client_address="192.0.2.10",
        recipient_count=recipients,
        outcome=outcome,
    )


def top_rows(output: str) -> list[tuple[str, int, int, int, int]]:
    """(user, recipients, messages, held, rejected) of each line under the header."""
    lines = output.splitlines()
    assert lines[0].split() == [
        "user",
        "counted",
        "recipients",
        "messages",
        "held",
        "rejected",
        "ips",
        "last",
        "seen",
        "(UTC)",
    ]
    rows = []
    for line in lines[1:]:
        user, _counted, recipients, messages, held, rejected, _ips, _date, _time = line.split()
        rows.append((user, int(recipients), int(messages), int(held), int(rejected)))
    return rows


# ---------------------------------------------------------------------------
# --version, --help
# ---------------------------------------------------------------------------


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.output == f"policyd, version {__version__}\n"


def test_help_lists_every_subcommand() -> None:
    result = run("--help")
    assert result.exit_code == 0
    assert "Postfix asks it about every message" in result.output
    for command in (
        "serve",
        "check-config",
        "top",
        "purge",
        "migrate",
        "config-keys",
        "user",
        "reset",
        "quota",
        "allow",
        "block",
        "unlist",
        "lists",
    ):
        assert f"  {command} " in result.output


def test_installed_command_runs_as_a_real_process() -> None:
    executable = shutil.which("policyd", path=str(Path(sys.executable).parent))
    assert executable, "policyd is not installed next to this Python"
    env = {key: value for key, value in os.environ.items() if key != "POLICYD_CONFIG"}
    version = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert (version.returncode, version.stdout, version.stderr) == (
        0,
        f"policyd, version {__version__}\n",
        "",
    )
    helped = subprocess.run(
        [executable, "--help"], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert helped.returncode == 0
    assert helped.stdout.startswith("Usage: policyd [OPTIONS] COMMAND [ARGS]...")
    assert "check-config" in helped.stdout
    assert "migrate" in helped.stdout


# ---------------------------------------------------------------------------
# check-config
# ---------------------------------------------------------------------------


def test_check_config_prints_the_effective_settings(config: Path, db_path: Path) -> None:
    result = run("check-config", "-c", str(config))
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    settings = dict(line.split(None, 1) for line in lines[1:-1])
    assert lines[0].split(None, 2) == ["config", "file", str(config)]
    assert settings["database"] == f"sqlite://{db_path}"
    assert settings["port"] == "9093"
    assert settings["defaultquota"] == "1500"
    assert settings["rejectquota"] == "3000"
    assert settings["window"] == "24h"
    assert lines[-1] == "configuration OK"
    assert result.stderr == ""
    assert not db_path.exists()  # checking does not touch the database


def test_check_config_reads_policyd_config_from_the_environment(config: Path) -> None:
    result = run("check-config", env={"POLICYD_CONFIG": str(config)})
    assert result.exit_code == 0, result.output
    assert str(config) in result.stdout.splitlines()[0]


def test_check_config_masks_the_password_of_a_go_policyd_file(tmp_path: Path) -> None:
    path = tmp_path / "policyd.cfg"
    shutil.copyfile(FIXTURES / "go-policyd.cfg", path)
    path.chmod(0o644)
    result = run("check-config", "-c", str(path))
    assert PASSWORD not in result.output
    assert PASSWORD not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "database                mysql://policyd_daemon:***@smtps.uvsq.fr:3306/policyd" in lines
    assert "whitelist               thisloginiswhitelisted" in lines
    assert (
        f"policyd: warning: {path}: holds a database password but is readable by everyone (chmod o-r {path})"
        in result.stderr
    )
    assert_mysql_verdict(result, load_settings(path).database)


def test_check_config_masks_an_escaped_password(tmp_path: Path) -> None:
    path = tmp_path / "policyd.cfg"
    path.write_text("dbuser=u\ndbpass=s3cr#t@p/ss\ndbhost=db\n")
    path.chmod(0o600)
    result = run("check-config", "-c", str(path))
    assert "database                mysql://u:***@db:3306/policyd" in result.stdout.splitlines()
    assert "s3cr" not in result.output
    assert "warning" not in result.stderr
    assert_mysql_verdict(result, load_settings(path).database)


@pytest.mark.parametrize(
    "url",
    [
        "mysql://policyd:s3cr3t-pw@db1:3306,,db3:3306/policyd",
        "mysql://policyd:s3cr3t-pw@db1:3306,db2:33o6/policyd",
        "mysql:policyd:s3cr3t-pw@db1:3306,db2:3306/policyd",
    ],
)
def test_a_bad_host_list_is_one_clear_line_without_the_password(tmp_path: Path, url: str) -> None:
    path = tmp_path / "policyd.cfg"
    path.write_text(f"database = {url}\n")
    path.chmod(0o600)
    result = run("check-config", "-c", str(path))
    assert result.exit_code == 2, result.output
    assert "s3cr3t" not in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    [line] = [line for line in result.stderr.splitlines() if line.startswith("policyd: ")]
    assert "URL" in line, line


def assert_mysql_verdict(result: Result, url: str) -> None:
    """check-config's verdict on a mysql:// file: OK if its backend can be made, else refused."""
    try:
        create_storage(url)
    except ValueError as error:  # no mysql backend or driver installed here
        assert result.exit_code == 2
        assert result.stderr.splitlines()[-1] == f"policyd: {error}"
        assert "configuration OK" not in result.stdout
    else:
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[-1] == "configuration OK"


def test_check_config_reports_errors_with_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "policyd.cfg"
    path.write_text("dbpass = Sup3rSecret\nprot = 9093\ndefaultquota = 0100\nwindow = 1 day\n")
    path.chmod(0o600)
    result = run("check-config", "-c", str(path))
    assert result.exit_code == 2
    assert result.stdout == ""  # no settings printed for a refused file
    assert result.stderr.splitlines() == [
        f"policyd: {path}:2: unknown key 'prot' (did you mean 'port'?)",
        f"policyd: {path}:4: window: '1 day' is not a duration (like 30s, 15m, 24h, 7d; plain numbers are seconds)",
    ]
    assert "Sup3rSecret" not in result.output


def test_check_config_prints_warnings_but_succeeds(config: Path) -> None:
    config.write_text(config.read_text() + "usesyslog = yes\n")
    result = run("check-config", "-c", str(config))
    assert result.exit_code == 0
    assert result.stderr == (
        f"policyd: warning: {config}:3: usesyslog is ignored (policyd logs to syslog and needs no pid file)\n"
    )


@pytest.mark.parametrize("command", ["check-config", "top", "purge", "migrate", "serve"])
def test_unreadable_config_path(tmp_path: Path, command: str) -> None:
    missing = tmp_path / "missing.cfg"
    result = run(command, "-c", str(missing))
    assert result.exit_code == 2
    assert result.stderr == f"policyd: {missing}: cannot read: No such file or directory\n"
    assert result.stdout == ""


# ---------------------------------------------------------------------------
# config-keys
# ---------------------------------------------------------------------------


def test_config_keys_lists_every_key() -> None:
    result = run("config-keys")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(KEYS)
    for line, (key, (_, description)) in zip(lines, KEYS.items(), strict=True):
        assert line.split(None, 1) == [key, description]
    assert "dbpass" in [line.split()[0] for line in lines]


# ---------------------------------------------------------------------------
# migrate
# ---------------------------------------------------------------------------


MIGRATION_STEPS = [
    "create table events",
    "create index events_ts",
    "create index events_event_id",
    "create table events_overrides (per-user limit overrides)",
    "create table events_lists (allow and block entries)",
    "create table events_resets (resets of users' counted recipients)",
    "create table events_alerts (alerts told, one per incident)",
]


def test_migrate_creates_the_schema_then_is_up_to_date(config: Path, db_path: Path) -> None:
    first = run("migrate", "-c", str(config))
    assert first.exit_code == 0, first.output
    assert first.stdout.splitlines() == MIGRATION_STEPS
    assert "events" in tables(db_path)
    second = run("migrate", "-c", str(config))
    assert second.exit_code == 0, second.output
    assert second.stdout == "schema is up to date\n"
    dry = run("migrate", "--dry-run", "-c", str(config))
    assert dry.stdout == "schema is up to date\n"


def test_migrate_drops_the_per_user_index_of_earlier_versions(config: Path, db_path: Path) -> None:
    assert run("migrate", "-c", str(config)).exit_code == 0
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        # What policyd 0.1 made, summing each request from it.
        connection.execute(
            "CREATE INDEX events_user_ts ON events(sasl_username, ts, action, recipient_count)"
        )
        connection.execute(
            "INSERT INTO events (ts, sasl_username, recipient_count) VALUES ('2026-12-01', 'a', 3)"
        )
        connection.commit()
    dry = run("migrate", "--dry-run", "-c", str(config))
    assert "would drop index events_user_ts (no longer used)" in dry.stdout.splitlines()
    assert "table events: 1 rows, each kept" in dry.stdout
    result = run("migrate", "-c", str(config))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["drop index events_user_ts (no longer used)"]
    with contextlib.closing(sqlite3.connect(db_path)) as connection:
        names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "events_user_ts" not in names and {"events_ts", "events_event_id"} <= names
        assert connection.execute("SELECT SUM(recipient_count) FROM events").fetchone() == (3,)
    assert run("migrate", "-c", str(config)).stdout == "schema is up to date\n"


def test_migrate_dry_run_lists_steps_without_creating(config: Path, db_path: Path) -> None:
    result = run("migrate", "--dry-run", "-c", str(config))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"would {step}" for step in MIGRATION_STEPS]
    assert "events" not in tables(db_path)
    again = run("migrate", "--dry-run", "-c", str(config))
    assert again.stdout.splitlines() == [f"would {step}" for step in MIGRATION_STEPS]


def test_migrate_uses_the_configured_table(config: Path, db_path: Path) -> None:
    config.write_text(config.read_text() + "policy_table = mail_events\n")
    result = run("migrate", "-c", str(config))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "create table mail_events"
    assert tables(db_path) == {
        "mail_events",
        "mail_events_overrides",
        "mail_events_lists",
        "mail_events_resets",
        "mail_events_alerts",
        "sqlite_sequence",
    }


# ---------------------------------------------------------------------------
# top
# ---------------------------------------------------------------------------


def test_top_on_an_empty_database(config: Path) -> None:
    assert run("migrate", "-c", str(config)).exit_code == 0
    result = run("top", "-c", str(config))
    assert result.exit_code == 0, result.output
    assert result.stdout == "no messages recorded in the last 24h\n"
    assert run("top", "-c", str(config), "--window", "7d").stdout == "no messages recorded in the last 7d\n"


def test_top_without_a_schema_fails_with_a_storage_error(config: Path) -> None:
    result = run("top", "-c", str(config))
    assert result.exit_code == 1
    assert result.stderr.startswith("policyd: sqlite: listing top senders: no such table: events")


@pytest.fixture
def recorded(db_path: Path) -> dict[str, datetime]:
    """Events of four users at various ages; returns each user's newest timestamp."""
    events = [
        event("alice", 100, timedelta(hours=2)),
        event("alice", 50, timedelta(hours=3), Outcome.HOLD),
        event("alice", 30, timedelta(hours=4), Outcome.REJECT),
        event("alice", 5000, timedelta(hours=30)),  # outside 24h, inside 48h
        event("bob", 200, timedelta(minutes=30)),
        event("bob", 10, timedelta(hours=5)),
        event("carol", 5, timedelta(minutes=10), Outcome.HOLD),
        event("dave", 7, timedelta(days=3), Outcome.REJECT),  # outside 48h
    ]
    add_events(db_path, *events)
    newest: dict[str, datetime] = {}
    for item in events:
        newest[item.sasl_username] = max(item.ts, newest.get(item.sasl_username, item.ts))
    return newest


def test_top_lists_users_by_recipients(config: Path, recorded: dict[str, datetime]) -> None:
    result = run("top", "-c", str(config))
    assert result.exit_code == 0, result.output
    assert top_rows(result.stdout) == [
        ("bob", 210, 2, 0, 0),
        ("alice", 180, 3, 1, 1),
        ("carol", 5, 1, 1, 0),
    ]
    bob_line = result.stdout.splitlines()[1]
    assert bob_line.endswith(f"{recorded['bob']:%Y-%m-%d %H:%M:%S}")


def test_top_honours_the_window(config: Path, recorded: dict[str, datetime]) -> None:
    two_days = run("top", "-c", str(config), "--window", "48h")
    assert top_rows(two_days.stdout) == [
        ("alice", 5180, 4, 1, 1),
        ("bob", 210, 2, 0, 0),
        ("carol", 5, 1, 1, 0),
    ]
    one_hour = run("top", "-c", str(config), "-w", "1h")
    assert top_rows(one_hour.stdout) == [("bob", 200, 1, 0, 0), ("carol", 5, 1, 1, 0)]
    week = run("top", "-c", str(config), "--window", "7d")
    # In the order of what the quota counts: dave's 7 were rejected, so counted 0.
    assert top_rows(week.stdout) == [
        ("alice", 5180, 4, 1, 1),
        ("bob", 210, 2, 0, 0),
        ("carol", 5, 1, 1, 0),
        ("dave", 7, 1, 0, 1),
    ]


def test_top_honours_the_limit(config: Path, recorded: dict[str, datetime]) -> None:
    result = run("top", "-c", str(config), "-n", "2")
    assert top_rows(result.stdout) == [("bob", 210, 2, 0, 0), ("alice", 180, 3, 1, 1)]
    one = run("top", "-c", str(config), "--limit", "1", "--window", "48h")
    assert top_rows(one.stdout) == [("alice", 5180, 4, 1, 1)]


def test_top_rejects_a_bad_window(config: Path) -> None:
    result = run("top", "-c", str(config), "--window", "fortnight")
    assert result.exit_code == 2
    assert "Invalid value" in result.stderr
    assert "'fortnight' is not a duration (like 30s, 15m, 24h, 7d" in result.stderr
    assert result.stdout == ""


def test_top_rejects_a_window_too_long_for_a_date(config: Path) -> None:
    result = run("top", "-c", str(config), "--window", "9999999d")
    assert result.exit_code == 2
    assert "too long" in result.stderr


def test_top_rejects_a_bad_limit(config: Path) -> None:
    result = run("top", "-c", str(config), "-n", "0")
    assert result.exit_code == 2
    assert "Invalid value for '-n' / '--limit'" in result.stderr


# ---------------------------------------------------------------------------
# purge
# ---------------------------------------------------------------------------


@pytest.fixture
def aged(db_path: Path) -> None:
    add_events(
        db_path,
        event("alice", 1, timedelta(hours=1)),
        event("alice", 1, timedelta(days=2)),
        event("bob", 1, timedelta(days=8)),
        event("bob", 1, timedelta(days=30)),
    )


def test_purge_deletes_events_older_than_retention(config: Path, db_path: Path, aged: None) -> None:
    result = run("purge", "-c", str(config))  # default retention 7d
    assert result.exit_code == 0, result.output
    assert result.stdout == "deleted 2 events\n"
    assert count_events(db_path) == 2
    assert run("purge", "-c", str(config)).stdout == "deleted 0 events\n"


def test_purge_uses_the_configured_retention(config: Path, db_path: Path, aged: None) -> None:
    config.write_text(config.read_text() + "retention = 36h\n")
    result = run("purge", "-c", str(config))
    assert result.stdout == "deleted 3 events\n"
    assert count_events(db_path) == 1


def test_purge_older_than_overrides_retention(config: Path, db_path: Path, aged: None) -> None:
    result = run("purge", "-c", str(config), "--older-than", "20d")
    assert result.stdout == "deleted 1 events\n"
    assert count_events(db_path) == 3
    result = run("purge", "-c", str(config), "--older-than", "30m", "--force")  # inside the window
    assert result.stdout == "deleted 3 events\n"
    assert count_events(db_path) == 0


def test_purge_rejects_a_bad_age(config: Path, db_path: Path, aged: None) -> None:
    result = run("purge", "-c", str(config), "--older-than", "old")
    assert result.exit_code == 2
    assert "'old' is not a duration" in result.stderr
    assert count_events(db_path) == 4


@pytest.mark.parametrize(
    "url",
    [
        "mysql://u:Top#Secret/Pw@127.0.0.1:3306/policyd",
        "mysql://u:TopSecretPw@127.0.0.1:99999/policyd",
        "mysql://u:Top?Secret@Pw@127.0.0.1:x/policyd",
        "postgresql://u:Top#Secret/Pw@127.0.0.1:5432/policyd",
        "postgresql://u:TopSecretPw@127.0.0.1:x/policyd",
    ],
)
@pytest.mark.parametrize("command", ["serve", "check-config", "top", "migrate", "purge"])
def test_a_bad_database_url_is_refused_without_its_password(tmp_path: Path, url: str, command: str) -> None:
    path = tmp_path / "policyd.cfg"
    path.write_text(f"database = {url}\nspool = {tmp_path}/spool\nport = {free_port()}\n")
    path.chmod(0o600)
    result = subprocess.run(
        [sys.executable, "-m", "policyd", command, "-c", str(path), *(["-f"] if command == "serve" else [])],
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    for piece in ("Top", "Secret", "Pw"):
        assert piece not in output.replace("policyd", ""), output
    assert result.stderr.startswith("policyd: "), output
