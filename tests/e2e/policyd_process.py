"""The real policyd daemon as a subprocess, for end-to-end tests.

``PolicydProcess`` writes a policyd.cfg into a directory of its own (SQLite database,
spool and log next to it), runs ``policyd serve -c CONFIG --foreground`` with stderr
going to a log file, waits until the port accepts connections, and stops the daemon by
its pid (SIGTERM, wait, SIGKILL only if it does not exit).  Nothing is left running:
``stop()`` is idempotent, the class is a context manager, daemons still running when
the interpreter exits are stopped, and the rig's watchdog kills them if the test process
itself is killed.

    with PolicydProcess(tmp_path, quota=10) as policyd:
        rig = postfix_rig(policyd.target, users={"alice": "pw"})
        ...
        assert "DEFERRING overquota" in policyd.log_text()
        print(policyd.top(), policyd.events())
        policyd.write_config(defaultquota="20")
        policyd.reload()   # SIGHUP
        policyd.restart()  # SIGTERM, then a new daemon on the same port and database
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Self

try:
    from tests.e2e.postfix_rig import _Watchdog
except ImportError:  # tests/e2e is not a package: pytest put tests/e2e on sys.path
    from postfix_rig import _Watchdog  # type: ignore[no-redef,import-not-found]

__all__ = ["POLICYD_BIN", "PolicydError", "PolicydProcess", "RecordedEvent"]

# The console script of the venv running the tests (.venv/bin/policyd), else on PATH.
POLICYD_BIN = str(Path(sys.executable).with_name("policyd"))
STARTED_RE = r"policyd \S+ started: listening on"


class PolicydError(RuntimeError):
    """policyd did not start, or did not stop."""


@dataclass(frozen=True)
class RecordedEvent:
    """One row of policyd's events table."""

    ts: datetime  # UTC
    sasl_username: str
    sender: str
    client_address: str
    recipient_count: int
    action: str


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PolicydProcess:
    """One policyd daemon with its own config, SQLite database, spool and log.

    Args:
        directory: where policyd.cfg, policyd.sqlite, policyd.spool and policyd.log go
            (created if missing).
        quota / reject_quota: ``defaultquota`` / ``rejectquota`` (None: policyd's default,
            twice the quota).
        port: TCP port on 127.0.0.1 (default: a free one).
        socket_path / socket_mode: the optional unix socket (``socket`` / ``socket_mode``).
        extra: more ``key = value`` lines for policyd.cfg (e.g. log_level).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        quota: int = 10,
        reject_quota: int | None = None,
        port: int | None = None,
        socket_path: str | os.PathLike[str] | None = None,
        socket_mode: str | None = None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.socket_path = str(socket_path) if socket_path else None
        self.config_path = self.dir / "policyd.cfg"
        self.database_path = self.dir / "policyd.sqlite"
        self.spool_path = self.dir / "policyd.spool"
        self.log_path = self.dir / "policyd.log"
        settings = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "database": f"sqlite://{self.database_path}",
            "spool": str(self.spool_path),
            "defaultquota": str(quota),
        }
        if reject_quota is not None:
            settings["rejectquota"] = str(reject_quota)
        if self.socket_path:
            settings["socket"] = self.socket_path
        if socket_mode:
            settings["socket_mode"] = socket_mode
        settings.update(extra or {})
        self.settings = settings
        self.write_config()
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._watchdog: _Watchdog | None = None
        self.starts = 0

    def write_config(self, **changes: str) -> None:
        """(Re)write policyd.cfg, with ``changes`` to the settings (see ``reload()``)."""
        self.settings.update(changes)
        self.config_path.write_text("".join(f"{key} = {value}\n" for key, value in self.settings.items()))

    # -- what Postfix needs ------------------------------------------------------------
    @property
    def target(self) -> str:
        """The TCP service in Postfix notation: ``inet:127.0.0.1:PORT``."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self, timeout: float = 15) -> Self:
        """Start the daemon and wait until its port accepts connections."""
        if self.running:
            return self
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._log_file = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            [POLICYD_BIN, "serve", "-c", str(self.config_path), "--foreground"],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            cwd=self.dir,
            start_new_session=True,  # a ^C in the terminal is not its business
        )
        _LIVE.add(self)
        self._watchdog = _Watchdog()  # kills it (its own process group) if we die first
        self._watchdog.watch(self._proc.pid)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not (self._port_open() and re.search(STARTED_RE, self.log_text()[log_offset:])):
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._close_log()
                self._proc = None
                raise PolicydError(f"policyd exited with status {code} at start:\n{self.log_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise PolicydError(f"policyd did not listen on port {self.port} in {timeout}s")
            time.sleep(0.02)
        return self

    def _port_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status (None if not running)."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
                self._close_log()
                raise PolicydError(
                    f"policyd (pid {proc.pid}) ignored SIGTERM for {timeout}s; killed"
                ) from None
        self._close_log()
        return proc.returncode

    def restart(self) -> Self:
        status = self.stop()
        if status not in (None, 0):
            raise PolicydError(f"policyd exited with status {status} when stopped:\n{self.log_text()}")
        return self.start()

    def reload(self, timeout: float = 10) -> None:
        """SIGHUP, and wait until policyd logged that it re-read its configuration."""
        if self._proc is None or not self.running:
            raise PolicydError("policyd is not running")
        before = len(self.log_lines(r"INFO: reloaded "))
        os.kill(self._proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while len(self.log_lines(r"INFO: reloaded ")) <= before:
            if time.monotonic() > deadline:
                raise PolicydError(f"policyd did not reload in {timeout}s:\n{self.log_text()}")
            time.sleep(0.02)

    def _close_log(self) -> None:
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- what it did ----------------------------------------------------------------------
    def log_text(self) -> str:
        """Everything the daemon(s) wrote to stderr, over all starts."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_lines(self, pattern: str) -> list[str]:
        """The log lines matching regex ``pattern``."""
        return [line for line in self.log_text().splitlines() if re.search(pattern, line)]

    def wait_log(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (match := re.search(pattern, self.log_text())) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pattern!r} not in policyd's log after {timeout}s:\n{self.log_text()}")
            time.sleep(0.05)
        return match

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``policyd ARGS -c CONFIG``."""
        proc = subprocess.run(
            [POLICYD_BIN, *args, "-c", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check and proc.returncode != 0:
            raise PolicydError(f"policyd {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def top(self, *args: str) -> str:
        """The output of ``policyd top -c CONFIG [ARGS]``."""
        return self.cli("top", *args).stdout

    def top_rows(self) -> dict[str, dict[str, int]]:
        """``policyd top`` as {user: {recipients, messages, held, rejected}}."""
        rows: dict[str, dict[str, int]] = {}
        for line in self.top().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 6 and fields[1].isdigit():  # user, counted, recipients ...
                rows[fields[0]] = dict(
                    zip(("recipients", "messages", "held", "rejected"), map(int, fields[2:6]), strict=True)
                )
        return rows

    def events(self, settle: float = 5.0) -> list[RecordedEvent]:
        """Every row of the events table, oldest first (read-only; fine while it runs).

        The database is written behind the answers (a few ms): while it runs, wait (up to
        `settle` seconds) until it holds every event the log says was counted.
        """
        deadline = time.monotonic() + settle
        while True:
            rows = self._rows()
            counted = len(self.log_lines(r"Updating db: "))
            if len(rows) >= counted or self._proc is None or time.monotonic() > deadline:
                return rows
            time.sleep(0.02)

    def _rows(self) -> list[RecordedEvent]:
        if not self.database_path.exists():
            return []
        with contextlib.closing(
            sqlite3.connect(f"file:{self.database_path}?mode=ro", uri=True, timeout=5)
        ) as db:
            rows = db.execute(
                "SELECT ts, sasl_username, sender, client_address, recipient_count, action "
                "FROM events ORDER BY ts, rowid"
            ).fetchall()
        return [
            RecordedEvent(
                datetime.fromisoformat(str(ts)).replace(tzinfo=UTC), user, sender, ip, int(count), action
            )
            for ts, user, sender, ip, count, action in rows
        ]


_LIVE: set[PolicydProcess] = set()


@atexit.register
def _stop_all() -> None:
    for daemon in list(_LIVE):
        with contextlib.suppress(Exception):
            daemon.stop(timeout=5)
