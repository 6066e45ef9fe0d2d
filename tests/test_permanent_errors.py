"""Errors that will not pass by themselves (a wrong password, a missing database, a file
the daemon's user may not write): mail is still answered, and the log, its reminders and
systemd's STATUS say what is wrong and what to do."""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import count_rows, make_settings, mounted_tmpfs, remount_read_only, run_daemon

SERVERS = [
    pytest.param("mariadb", marks=pytest.mark.mariadb),
    pytest.param("postgresql", marks=pytest.mark.postgresql),
]


def with_password(url: str, password: str) -> str:
    return re.sub(r"^(\w+://[^:@/]*:)[^@]*@", rf"\g<1>{password}@", url)


@pytest.mark.parametrize("backend", SERVERS)
async def test_a_wrong_password_says_so_and_what_to_do(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    server: Any = request.getfixturevalue(f"{backend}_server")
    url = with_password(server.url, "not-the-password")
    async with run_daemon(make_settings(url, db_retry=0.2, spool=str(tmp_path / "spool"))) as daemon:
        client = await daemon.client()
        assert await client.ask() == "DUNNO"  # answered all the same (db_error_action)
        await client.close()
        status = daemon.daemon.status_line()
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors, caplog.text
    assert "this will not pass by itself: the server refused user" in errors[0]
    assert "not-the-password" not in caplog.text
    assert "needs the admin: the server refused user" in status


@pytest.mark.parametrize("backend", SERVERS)
async def test_a_missing_database_says_how_to_create_it(
    request: pytest.FixtureRequest, backend: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    server: Any = request.getfixturevalue(f"{backend}_server")
    url = server.url_for("no_such_database")
    async with run_daemon(make_settings(url, db_retry=0.2, spool=str(tmp_path / "spool"))) as daemon:
        client = await daemon.client()
        assert await client.ask() == "DUNNO"
        await client.close()
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    expected = "CREATE DATABASE IF NOT EXISTS `no_such_database`" if backend == "mariadb" else "createdb -O"
    assert expected in errors[0], errors


@pytest.mark.mariadb
async def test_the_reminder_repeats_the_hint(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import policyd.daemon

    monkeypatch.setattr(policyd.daemon, "INCIDENT_REMINDER_SECONDS", 0.5)
    caplog.set_level(logging.INFO, "policyd")
    server: Any = request.getfixturevalue("mariadb_server")
    url = with_password(server.url, "not-the-password")
    async with run_daemon(make_settings(url, db_retry=0.1, spool=str(tmp_path / "spool"))):
        await asyncio.sleep(1.3)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    reminders = [line for line in errors if line.startswith("still cannot open the database after")]
    assert 1 <= len(reminders) <= 3, errors
    assert all("this will not pass by itself: the server refused user" in line for line in reminders)


def test_migrate_run_as_root_leaves_the_file_to_the_directory_owner(tmp_path: Path) -> None:
    """`policyd migrate` (or `top`) run as root before the first start must not leave a
    file the service's user cannot write."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    nobody = pwd.getpwnam("nobody")
    directory = tmp_path / "lib"
    directory.mkdir()
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    database = directory / "policyd.sqlite"
    config = tmp_path / "policyd.cfg"
    config.write_text(f"database = sqlite://{database}\n")
    for command in ("migrate", "top"):
        result = subprocess.run(
            [sys.executable, "-m", "policyd", command, "-c", str(config)], capture_output=True
        )
        assert result.returncode == 0, result.stderr
    made = [path for path in directory.iterdir()]
    assert database in made
    assert {path.name: path.stat().st_uid for path in made} == {path.name: nobody.pw_uid for path in made}


async def test_a_read_only_file_system_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "policyd")
    with mounted_tmpfs(tmp_path / "ro", "4m") as mount:
        url = f"sqlite://{mount}/policyd.sqlite"
        async with run_daemon(make_settings(url, spool=str(tmp_path / "spool"))):
            pass  # the file and its table made
        remount_read_only(mount)
        async with run_daemon(make_settings(url, db_retry=0.2, spool=str(tmp_path / "spool"))) as daemon:
            client = await daemon.client()
            for _ in range(5):
                assert await client.ask() == "DUNNO"
            status = daemon.daemon.status_line()
            await client.close()
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any(
        f"this will not pass by itself: the file system holding {mount}/policyd.sqlite is mounted read-only"
        in line
        for line in errors
    ), errors
    assert "needs the admin: the file system holding" in status


async def test_a_spool_on_a_read_only_file_system_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    url = f"sqlite://{tmp_path}/policyd.sqlite"
    with mounted_tmpfs(tmp_path / "ro", "1m") as mount:
        remount_read_only(mount)
        async with run_daemon(make_settings(url, spool=f"{mount}/policyd.spool")) as daemon:
            client = await daemon.client()
            for _ in range(5):
                assert await client.ask() == "DUNNO"  # answered once in the database
            await client.close()
            assert daemon.daemon.stats.events_dropped == 0
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert any(
        f"this will not pass by itself: the file system holding {mount}/policyd.spool is mounted read-only"
        in line
        for line in errors
    ), errors
    assert await count_rows(url) == 5


def check_config(config: Path, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "policyd", "check-config", "-c", str(config), *options],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_config_connect_tries_the_database_and_the_spool(tmp_path: Path) -> None:
    config = tmp_path / "policyd.cfg"
    config.write_text(
        f"database = sqlite://{tmp_path}/policyd.sqlite\nspool = {tmp_path}/spool/policyd.spool\n"
    )
    fresh = check_config(config, "--connect")
    assert fresh.returncode == 0, fresh.stderr
    assert "database: ok, but the schema needs `policyd migrate`" in fresh.stdout
    subprocess.run(
        [sys.executable, "-m", "policyd", "migrate", "-c", str(config)], check=True, capture_output=True
    )
    result = check_config(config, "--connect")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2].startswith("database: ok (sqlite:") and "a test row written and rolled back" in lines[-2]
    assert lines[-1] == f"spool: ok ({tmp_path}/spool/policyd.spool: {tmp_path} is writable)"
    assert sqlite3.connect(tmp_path / "policyd.sqlite").execute("SELECT COUNT(*) FROM events").fetchone() == (
        0,
    )


def test_check_config_connect_says_what_is_wrong(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "ro", "1m") as mount:
        config = tmp_path / "policyd.cfg"
        config.write_text(f"database = sqlite://{mount}/policyd.sqlite\nspool = {mount}/policyd.spool\n")
        subprocess.run(
            [sys.executable, "-m", "policyd", "migrate", "-c", str(config)], check=True, capture_output=True
        )
        remount_read_only(mount)
        result = check_config(config, "--connect")
    assert result.returncode == 1
    database, spool = result.stdout.splitlines()[-2:]
    assert database.startswith("database: FAILED: sqlite: ")
    assert database.endswith(f"the file system holding {mount}/policyd.sqlite is mounted read-only")
    assert spool == (
        f"spool: FAILED: cannot write in {mount}: Read-only file system; "
        f"the file system holding {mount}/policyd.spool is mounted read-only"
    )
    assert "Traceback" not in result.stderr


@pytest.mark.mariadb
def test_check_config_connect_with_a_wrong_password(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    server: Any = request.getfixturevalue("mariadb_server")
    config = tmp_path / "policyd.cfg"
    config.write_text(
        f"database = {with_password(server.url, 'wrong-pw')}\nspool = {tmp_path}/policyd.spool\n"
    )
    config.chmod(0o600)
    result = check_config(config, "--connect")
    assert result.returncode == 1
    assert "database: FAILED: " in result.stdout
    assert "the server refused user 'policyd' with this password" in result.stdout
    assert "wrong-pw" not in result.stdout + result.stderr


def test_check_config_as_an_unknown_user(tmp_path: Path) -> None:
    config = tmp_path / "policyd.cfg"
    config.write_text(f"database = sqlite://{tmp_path}/policyd.sqlite\n")
    result = check_config(config, "--as-user", "no-such-user-here")
    assert result.returncode == 2
    assert result.stderr == "policyd: no user 'no-such-user-here' on this system\n"
