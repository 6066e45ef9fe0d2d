"""Where log lines go: syslog (facility daemon, ident policyd) or stderr."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from policyd import logs
from policyd.logs import LOGGER_NAME, log, setup_logging


@pytest.fixture(autouse=True)
def restore_logger() -> Iterator[None]:
    logger = logging.getLogger(LOGGER_NAME)
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in handlers:
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = propagate


def test_syslog_facility_daemon_and_ident(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(5)
        setup_logging(foreground=False, level="info", syslog_socket=path)
        log.info("Updating db: alice/a@example.org/192.0.2.1/3/3")
        log.debug("not at info level")
        log.error("database unavailable: test")
        first = receiver.recv(4096).decode()
        second = receiver.recv(4096).decode()
    # <priority> = facility daemon (3) * 8 + severity (info 6, error 3)
    assert first == f"<30>policyd[{os.getpid()}]: Updating db: alice/a@example.org/192.0.2.1/3/3\x00"
    assert second == f"<27>policyd[{os.getpid()}]: database unavailable: test\x00"


def test_no_syslog_socket_falls_back_to_stderr_with_one_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging(foreground=False, level="info", syslog_socket=str(tmp_path / "missing"))
    log.info("hello")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "WARNING: no syslog at" in err[0] and "logging to stderr" in err[0]
    assert err[1].endswith("INFO: hello")


def test_foreground_logs_readable_lines_to_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(foreground=True, level="warning")
    log.info("hidden")
    log.warning("shown")
    err = capsys.readouterr().err
    assert "hidden" not in err
    assert f"policyd[{os.getpid()}] WARNING: shown" in err


def test_a_full_syslog_never_blocks_and_the_dropped_lines_are_counted(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        setup_logging(foreground=False, level="info", syslog_socket=path)
        sent = 3000
        for number in range(sent):  # nobody reads meanwhile: the socket's queue fills up
            log.info("line %d", number)
        receiver.setblocking(False)
        received = []
        with contextlib.suppress(BlockingIOError):
            while True:
                received.append(receiver.recv(4096).decode())
        log.info("after")
        receiver.settimeout(5)
        notice = receiver.recv(4096).decode()
        after = receiver.recv(4096).decode()
    assert len(received) < sent, "the queue never filled: the test proves nothing"
    match = re.fullmatch(
        r"<28>policyd\[\d+\]: syslog had no room for (\d+) lines; they were dropped\x00", notice
    )
    assert match, notice
    assert len(received) + int(match.group(1)) == sent  # every line is shown or counted
    assert after.endswith(": after\x00")


def test_control_characters_reach_syslog_escaped(tmp_path: Path) -> None:
    path = str(tmp_path / "log.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        receiver.settimeout(5)
        setup_logging(foreground=False, level="info", syslog_socket=path)
        logs.info("Updating db: evil\x1b[2J\x00\x9b/s/192.0.2.1/1/1")
        log.warning("user %s", "evil\x07")
        first = receiver.recv(4096).decode()
        second = receiver.recv(4096).decode()
    assert first == f"<30>policyd[{os.getpid()}]: Updating db: evil\\x1b[2J\\x00\\x9b/s/192.0.2.1/1/1\x00"
    assert second == f"<28>policyd[{os.getpid()}]: user evil\\x07\x00"
