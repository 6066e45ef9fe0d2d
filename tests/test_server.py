"""The real daemon over real sockets, on a temp SQLite file (in-process and as a subprocess)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from policyd import server as server_module
from policyd.spool import pending_on_disk
from tests.conftest import (
    FakeClock,
    PolicyClient,
    count_rows,
    encode_request,
    free_port,
    make_settings,
    run_daemon,
    serve_command,
    wait_for_port,
)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite://{tmp_path}/policyd.sqlite"


async def test_quota_boundaries_on_one_connection(sqlite_url: str) -> None:
    async with run_daemon(make_settings(sqlite_url, quota=10, reject_quota=20)) as daemon:
        client = await daemon.client()
        answers = [await client.ask(recipient_count=1) for _ in range(22)]
        await client.close()
    # totals 1..9 DUNNO, 10..19 HOLD, from 20 REJECT (rejected ones do not count, so it stays at 20)
    assert answers[:9] == ["DUNNO"] * 9
    assert answers[9:19] == ["HOLD quota exceeded"] * 10
    assert answers[19:] == ["REJECT max quota exceeded"] * 3
    assert await count_rows(sqlite_url) == 22


async def test_default_quota_boundaries(sqlite_url: str) -> None:
    async with run_daemon(make_settings(sqlite_url)) as daemon:
        client = await daemon.client()
        assert await client.ask(sasl_username="a", recipient_count=1499) == "DUNNO"
        assert await client.ask(sasl_username="b", recipient_count=1500) == "HOLD quota exceeded"
        assert await client.ask(sasl_username="c", recipient_count=2999) == "HOLD quota exceeded"
        assert await client.ask(sasl_username="d", recipient_count=3000) == "REJECT max quota exceeded"
        assert await client.ask(sasl_username="a", recipient_count=1) == "HOLD quota exceeded"
        await client.close()


async def test_window_slides_with_time(sqlite_url: str) -> None:
    clock = FakeClock()
    async with run_daemon(make_settings(sqlite_url, quota=10), clock=clock) as daemon:
        client = await daemon.client()
        assert await client.ask(recipient_count=9) == "DUNNO"
        clock.advance(hours=23)
        assert await client.ask(recipient_count=1) == "HOLD quota exceeded"  # 9 + 1
        clock.advance(hours=1, seconds=1)  # the 9 left the window; the held 1 has not
        assert await client.ask(recipient_count=8) == "DUNNO"  # 1 + 8
        assert await client.ask(recipient_count=1) == "HOLD quota exceeded"  # 10
        await client.close()


async def test_users_are_counted_apart_and_case_insensitively(sqlite_url: str) -> None:
    async with run_daemon(make_settings(sqlite_url, quota=10)) as daemon:
        client = await daemon.client()
        assert await client.ask(sasl_username="Alice", recipient_count=9) == "DUNNO"
        assert await client.ask(sasl_username="bob", recipient_count=9) == "DUNNO"
        assert await client.ask(sasl_username="ALICE", recipient_count=1) == "HOLD quota exceeded"
        await client.close()


async def test_unauthenticated_and_other_stages_are_not_recorded(sqlite_url: str) -> None:
    async with run_daemon(make_settings(sqlite_url, quota=1)) as daemon:
        client = await daemon.client()
        assert await client.ask(sasl_username="", recipient_count=50) == "DUNNO"
        assert await client.ask(protocol_state="RCPT", recipient_count=50) == "DUNNO"
        assert await client.ask(protocol_state="DATA", recipient_count=1) == "HOLD quota exceeded"
        await client.close()
    assert await count_rows(sqlite_url) == 1


async def test_blacklisted_is_held_and_logged(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(sqlite_url, blacklist=frozenset({"192.0.2.66"}))
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        assert await client.ask(client_address="192.0.2.66") == "HOLD blacklisted"
        assert await client.ask(client_address="192.0.2.67") == "DUNNO"
        await client.close()
    assert "Holding blacklisted user: alice/alice@example.org/192.0.2.66/1" in caplog.text


async def test_go_policyd_log_lines(sqlite_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(make_settings(sqlite_url, quota=10, reject_quota=20)) as daemon:
        client = await daemon.client()
        await client.ask(recipient_count=4)
        await client.ask(recipient_count=8)
        await client.ask(recipient_count=9)
        await client.close()
    assert "Updating db: alice/alice@example.org/192.0.2.10/4/4" in caplog.text
    assert (
        "DEFERRING overquota (12>10) for user alice using alice@example.org from ip [192.0.2.10]"
        in caplog.text
    )
    assert (
        "REJECTING overquota (21>2x10) for user alice using alice@example.org from ip [192.0.2.10]"
        in caplog.text
    )


async def test_many_concurrent_connections(sqlite_url: str) -> None:
    async with run_daemon(make_settings(sqlite_url)) as daemon:
        clients = [await daemon.client() for _ in range(30)]

        async def send(client: PolicyClient, index: int) -> list[str]:
            return [await client.ask(sasl_username=f"user{index}", recipient_count=2) for _ in range(20)]

        results = await asyncio.gather(*(send(client, i) for i, client in enumerate(clients)))
        for client in clients:
            await client.close()
    assert all(answer == "DUNNO" for answers in results for answer in answers)
    assert await count_rows(sqlite_url) == 600


async def test_pipelined_requests_are_answered_in_order(sqlite_url: str) -> None:
    async with run_daemon(make_settings(sqlite_url, quota=3)) as daemon:
        client = await daemon.client()
        client.writer.write(b"".join(encode_request(recipient_count=1) for _ in range(5)))
        answers = [await client.read_reply() for _ in range(5)]
        await client.close()
    assert answers == ["DUNNO", "DUNNO", "HOLD quota exceeded", "HOLD quota exceeded", "HOLD quota exceeded"]


async def test_unix_socket_with_mode(sqlite_url: str, tmp_path: Path) -> None:
    path = tmp_path / "policyd.sock"
    settings = make_settings(sqlite_url, socket=str(path))
    async with run_daemon(settings) as daemon:
        assert stat.S_IMODE(path.stat().st_mode) == 0o660
        client = await PolicyClient.connect(f"unix:{path}")
        assert await client.ask() == "DUNNO"
        await client.close()
        assert daemon.daemon.server is not None
    assert not path.exists()


@pytest.mark.parametrize(
    ("garbage", "logged"),
    [
        (b"this is not a policy request\n\n", "not name=value"),
        (b"\n", "empty request"),
        (b"a=" + b"x" * 20000 + b"\n", "the limit is 16384"),
        (b"".join(b"k%d=v\n" % i for i in range(200)), "attributes"),
        (encode_request(recipient_count="lots"), "recipient_count is not a number"),
        (b"name=val\0ue\n\n", "NUL byte"),
    ],
)
async def test_bad_input_closes_only_that_connection(
    sqlite_url: str, garbage: bytes, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(make_settings(sqlite_url)) as daemon:
        good = await daemon.client()
        bad = await daemon.client()
        bad.writer.write(garbage)
        assert await asyncio.wait_for(bad.reader.read(), 5) == b""  # closed, no reply
        assert await good.ask() == "DUNNO"
        again = await daemon.client()
        assert await again.ask() == "DUNNO"
        for client in (good, bad, again):
            await client.close()
    assert logged in caplog.text


async def test_half_request_then_disconnect_is_logged(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(make_settings(sqlite_url)) as daemon:
        client = await daemon.client()
        client.writer.write(b"request=smtpd_access_policy\nsasl_user")
        await client.writer.drain()
        await client.close()
        await asyncio.sleep(0.2)
        other = await daemon.client()
        assert await other.ask() == "DUNNO"
        await other.close()
    assert "in the middle of a request" in caplog.text
    assert await count_rows(sqlite_url) == 1


async def test_slow_request_and_idle_connection_time_out(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(server_module, "REQUEST_TIMEOUT_SECONDS", 0.5)
    monkeypatch.setattr(server_module, "IDLE_TIMEOUT_SECONDS", 1.0)
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(make_settings(sqlite_url)) as daemon:
        slow = await daemon.client()
        idle = await daemon.client()
        busy = await daemon.client()
        started = time.monotonic()
        for byte in encode_request()[:4]:  # a byte every 0.1s, then nothing: too slow
            slow.writer.write(bytes([byte]))
            assert await busy.ask() == "DUNNO"  # others are answered meanwhile
            await asyncio.sleep(0.1)
        assert await asyncio.wait_for(slow.reader.read(), 3) == b""
        assert await asyncio.wait_for(idle.reader.read(), 3) == b""
        assert time.monotonic() - started < 3
        for client in (slow, idle, busy):
            await client.close()
    assert "request not complete within 0.5s; closing the connection" in caplog.text
    assert "idle for 1s; closing the connection" in caplog.text


async def test_database_locked_answers_in_time_spools_and_replays(
    sqlite_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    settings = make_settings(sqlite_url, db_timeout=0.2, db_retry=0.3, quota=100)
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        assert await client.ask() == "DUNNO"
        # Another process holds the write lock (a long `policyd purge`, a backup...).
        blocker = sqlite3.connect(tmp_path / "policyd.sqlite", isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        try:
            for _ in range(10):
                started = time.monotonic()
                assert await client.ask(recipient_count=10) in {"DUNNO", "HOLD quota exceeded"}
                assert time.monotonic() - started < 1.0
            await asyncio.sleep(1.0)  # longer than db_timeout: the database counts as down
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        # Back: the spooled events are replayed, and the quota saw every one of them.
        deadline = time.monotonic() + 10
        while await count_rows(sqlite_url) < 11:
            assert time.monotonic() < deadline, "spool not replayed"
            await asyncio.sleep(0.1)
        assert await client.ask() == "HOLD quota exceeded"  # 1 + 10 x 10 + 1 > 100
        await client.close()
    assert await count_rows(sqlite_url) == 12
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("database unavailable")
    assert "database is back after" in caplog.text
    assert pending_on_disk(settings.spool) == 0


async def test_during_an_outage_every_user_is_decided_from_the_window(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite://{tmp_path}/policyd.sqlite"
    settings = make_settings(url, db_error_action="DEFER_IF_PERMIT try later", quota=10)
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        assert await client.ask(recipient_count=8) == "DUNNO"
        # A restore gone wrong: a view where the table was; writes now fail.
        with sqlite3.connect(tmp_path / "policyd.sqlite") as other:
            other.execute("DROP TABLE events")
            other.execute("CREATE VIEW events AS SELECT 1 AS x")
        # The window was loaded at start: bob is known to have sent nothing.
        assert await client.ask(sasl_username="bob") == "DUNNO"
        assert await client.ask(recipient_count=1) == "DUNNO"  # alice: 8 + 1, from the window
        assert await client.ask(recipient_count=1) == "HOLD quota exceeded"  # 10
        await client.close()
    assert caplog.text.count("database unavailable") == 1


async def test_database_down_since_start_unknown_users_get_db_error_action(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    settings = make_settings(
        f"sqlite://{blocker}/policyd.sqlite",
        db_error_action="DEFER_IF_PERMIT try later",
        quota=10,
        spool=str(tmp_path / "policyd.spool"),
    )
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        # No history could be read: a user never seen gets db_error_action; the message
        # is recorded (not counted: it was deferred) and the user is known from now on.
        assert await client.ask(recipient_count=8) == "DEFER_IF_PERMIT try later"
        assert await client.ask(recipient_count=9) == "DUNNO"  # decided from the window: 9
        assert await client.ask(recipient_count=1) == "HOLD quota exceeded"  # 10
        await client.close()
    assert "cannot open the database" in caplog.text


async def test_quota_survives_a_restart(sqlite_url: str) -> None:
    settings = make_settings(sqlite_url, quota=10)
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        assert await client.ask(recipient_count=9) == "DUNNO"
        await client.close()
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        assert await client.ask(recipient_count=1) == "HOLD quota exceeded"
        await client.close()


# ---------------------------------------------------------------------------
# the real command, as a subprocess
# ---------------------------------------------------------------------------


def write_config(path: Path, port: int, database: str, quota: int) -> None:
    path.write_text(
        f"bind = 127.0.0.1\nport = {port}\ndatabase = {database}\ndefaultquota = {quota}\n"
        f"spool = {path.parent}/policyd.spool\n"
    )


def ask_blocking(port: int, **attributes: object) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(encode_request(**attributes))
        reply = b""
        while not reply.endswith(b"\n\n"):
            chunk = sock.recv(4096)
            assert chunk, "connection closed before the reply"
            reply += chunk
    return reply.decode()[len("action=") : -2]


def test_serve_subprocess_reload_and_terminate(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "policyd.cfg"
    write_config(config, port, f"sqlite://{tmp_path}/db.sqlite", quota=100)
    process = subprocess.Popen(
        serve_command(config),
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    try:
        wait_for_port(port, process)
        assert ask_blocking(port, recipient_count=50) == "DUNNO"
        # SIGHUP: a new quota takes effect without a restart...
        write_config(config, port, f"sqlite://{tmp_path}/db.sqlite", quota=40)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while ask_blocking(port, recipient_count=0) != "HOLD quota exceeded":
            assert time.monotonic() < deadline, "reload did not take effect"
            time.sleep(0.05)
        # ...and a broken file is refused, keeping the old settings.
        config.write_text("defaultquota = many\n")
        process.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert ask_blocking(port, recipient_count=0) == "HOLD quota exceeded"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = process.stderr.read().decode() if process.stderr else ""
    assert "started: listening on 127.0.0.1:" in log
    assert "reloaded" in log
    assert "reload refused, keeping the old settings" in log
    assert f"{config}:1: defaultquota" in log
    assert "stopped" in log


def test_serve_refuses_a_bad_config_file(tmp_path: Path) -> None:
    config = tmp_path / "policyd.cfg"
    config.write_text("port = 9093\nquota = 5\n")
    result = subprocess.run(
        serve_command(config),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{config}:2: unknown key 'quota'" in result.stderr


def test_serve_reports_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "policyd.cfg"
        write_config(config, port, f"sqlite://{tmp_path}/db.sqlite", quota=10)
        result = subprocess.run(
            serve_command(config),
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ},
        )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (is another policyd" in result.stderr
    assert result.stderr.index("cannot listen") < result.stderr.index("INFO: stopped")
    assert "Traceback" not in result.stderr


def test_serve_names_a_socket_in_a_missing_directory(tmp_path: Path) -> None:
    config = tmp_path / "policyd.cfg"
    write_config(config, free_port(), f"sqlite://{tmp_path}/db.sqlite", quota=10)
    with config.open("a") as file:
        file.write(f"socket = {tmp_path}/missing/policyd.sock\n")
    result = subprocess.run(
        serve_command(config),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert (
        f"ERROR: cannot listen on {tmp_path}/missing/policyd.sock: No such file or directory "
        f"(does {tmp_path}/missing exist?)" in result.stderr
    )
    assert result.stderr.index("cannot listen") < result.stderr.index("INFO: stopped")
    assert "Traceback" not in result.stderr


def test_serve_tells_systemd_ready_status_and_stopping(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "policyd.cfg"
    write_config(config, port, f"sqlite://{tmp_path}/db.sqlite", quota=100)
    notify_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify_socket:
        notify_socket.bind(str(notify_path))
        notify_socket.settimeout(15)
        process = subprocess.Popen(
            serve_command(config),
            stderr=subprocess.DEVNULL,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        )
        try:
            first = notify_socket.recv(4096).decode()
            assert first.startswith("READY=1\nSTATUS=0 requests"), first
            wait_for_port(port, process)
            process.send_signal(signal.SIGTERM)
            messages = []
            while "STOPPING=1" not in messages:
                messages.append(notify_socket.recv(4096).decode())
            assert process.wait(timeout=15) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert any(message.startswith("STATUS=") and "database ok" in message for message in messages)


def test_control_characters_in_names_are_escaped_in_the_log_and_top(tmp_path: Path) -> None:
    hostile = "mallory\x1b]0;pwned\x07\x1b[31m\rx"
    port = free_port()
    config = tmp_path / "policyd.cfg"
    write_config(config, port, f"sqlite://{tmp_path}/db.sqlite", quota=100)
    process = subprocess.Popen(
        serve_command(config),
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_port(port, process)
        assert ask_blocking(port, sasl_username=hostile, sender=f"{hostile}@example.org") == "DUNNO"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = process.stderr.read().decode() if process.stderr else ""
    escaped = "mallory\\x1b]0;pwned\\x07\\x1b[31mx"  # (a CR is taken out with the line end)
    assert f"Updating db: {escaped}/{escaped}@example.org/192.0.2.10/1/1" in log
    top = subprocess.run(
        [sys.executable, "-m", "policyd", "top", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert top.returncode == 0, top.stderr
    assert escaped in top.stdout
    for output in (log, top.stdout):
        assert "\x1b" not in output and "\x07" not in output and "\r" not in output
