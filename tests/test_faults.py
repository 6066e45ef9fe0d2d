"""Faults under a steady load, on real MariaDB and PostgreSQL servers started by the tests.

Each test runs the real ``policyd serve`` as a subprocess (its own config, a fresh
database, a spool in the test's temp dir) and drives it with ``Load``: 10 persistent
connections sending requests back to back, each request carrying a unique sender so
that every event can be found (once) in the database afterwards.  Then a fault:

- the database is stopped (gracefully, or killed) during the load, and restarted; or it
  hangs (SIGSTOP: connections accepted, nothing answered) and resumes;
- policyd is killed with SIGKILL during a database outage, and restarted while the
  database is still down;
- the disk spool is filled to its bound during a database outage.

And the same questions each time: was every request answered, within the bound
(db_timeout plus a margin, far below Postfix's 100s smtpd_policy_service_timeout)?  Is
every event in the database exactly once (or, for a full spool, exactly the reported
number missing)?  Do the quotas see exactly what the database holds?  Did the outage
make one log line when it started and one when it ended, never one per request?

Each test prints a row of figures and writes it to ``figures.json`` in its temp dir
(and appends it to $POLICYD_FAULT_FIGURES when set: see bench/faults_report.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

from policyd.spool import pending_on_disk
from tests.conftest import PolicyClient, encode_request, free_port

pytestmark = pytest.mark.slow

BACKENDS = [
    pytest.param("mariadb", marks=pytest.mark.mariadb),
    pytest.param("postgresql", marks=pytest.mark.postgresql),
]

DB_TIMEOUT = 0.5
DB_RETRY = 0.5
# Every answer must come within this: db_timeout plus a margin (Postfix waits 100s).
LATENCY_BOUND = 2.0
# The client gives up on an answer after this (far beyond the bound: a late answer is
# measured, not mistaken for a lost one).
REPLY_TIMEOUT = 10.0
CONNECTIONS = 10
USERS = ("user0", "user1", "user2", "user3")
# High enough that the load never reaches it: every load request is DUNNO, and the
# exact boundary checks after recovery show the daemon sees exactly the database's total.
QUOTA = 1_000_000
REJECT_QUOTA = 2_000_000
SPOOL_MIN_SIZE = 64 * 1024  # the smallest spool_max_size the config allows
HOLD = "HOLD quota exceeded"
REJECT = "REJECT max quota exceeded"
# After the load stops, the spool must be empty and the outage over within this.
RECOVERY_TIMEOUT = 15.0
# With the load going on, the outage must end this soon after the database is back
# (reconnecting takes up to db_retry; the replay a few hundred ms).
RECOVERY_UNDER_LOAD = 5.0

# Log lines about the outage, by what they say.
OUTAGE_STARTED = "database unavailable: "
OUTAGE_REMINDER = "database still unavailable after"
OUTAGE_ENDED_RE = re.compile(
    r"database is back after (?P<seconds>[\d.]+)s: (?P<replayed>\d+) events replayed from the spool, "
    r"(?P<memory>\d+) requests were decided from memory, (?P<error_action>\d+) answered with "
    r"db_error_action, (?P<dropped>\d+) events dropped"
)
SPOOL_LOSS = "events are being lost until the database is back"
# Each backend says so when it finds a pooled connection dead (the server went away
# under it) before retrying on a new one: at most once per pooled connection (pools of
# 4 on both), however many requests there are.
# The load's RCPT-stage requests: the daemon says once an hour that such a check is
# misplaced (placement.py), whatever happens to the database.
MISPLACED_RE = re.compile(r"client \S+: asked at the RCPT stage, where recipients cannot be counted")
CONNECTION_LOST_RE = re.compile(
    r"^(postgresql://\S+ table \S+: connection lost while .*; retrying on a new connection"
    r"|mysql \S+: .* failed \(.*\); retrying on a fresh connection)$"
)
LOG_LINE_RE = re.compile(r"^\S+ \S+ policyd\[\d+\] (?P<level>[A-Z]+): (?P<message>.*)$")


# ---------------------------------------------------------------------------
# the database: a fresh one per test on the session's server
# ---------------------------------------------------------------------------


class FaultDatabase:
    """A fresh database on the session's server, which the test may stop and restart."""

    def __init__(self, backend: str, server: Any) -> None:
        self.backend = backend
        self.server = server
        self.name = f"faults_{uuid.uuid4().hex[:12]}"
        self.url = server.create_database(self.name)
        self.stopped_at: float | None = None
        self.outage_seconds = 0.0
        self.hung: list[int] = []  # pids stopped by hang()

    async def stop(self, crash: bool = False) -> None:
        self.stopped_at = time.monotonic()
        await asyncio.to_thread(self.server.stop_server, crash=crash)

    async def start(self) -> None:
        await asyncio.to_thread(self.server.start_server)
        self._back()

    def hang(self) -> None:
        """SIGSTOP the server and its children (postgres backends): the kernel still
        accepts connections, but nothing answers.  A database that hangs."""
        main = self.server.pid
        assert main is not None
        os.kill(main, signal.SIGSTOP)  # first, so that it forks no new backend
        self.hung = [main, *_children(main)]
        for pid in self.hung[1:]:
            os.kill(pid, signal.SIGSTOP)
        self.stopped_at = time.monotonic()

    def resume(self) -> None:
        for pid in reversed(self.hung):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        if self.hung:
            self.hung = []
            self._back()

    def _back(self) -> None:
        if self.stopped_at is not None:
            self.outage_seconds += time.monotonic() - self.stopped_at
            self.stopped_at = None

    async def query(self, sql: str) -> list[list[str]]:
        output = await asyncio.to_thread(self.server.admin_execute, sql, self.name)
        return [line.split("\t") for line in output.splitlines() if line]

    async def events(self) -> list[tuple[str, str, int, str]]:
        """(sender, user, recipients, action) of every row."""
        rows = await self.query("SELECT sender, sasl_username, recipient_count, action FROM events")
        return [(sender, user, int(count), action) for sender, user, count, action in rows]

    def drop(self) -> None:
        self.resume()
        if not self.server.running:  # a test that failed mid-outage: leave the server usable
            self.server.start_server()
        self.server.drop_database(self.name)


def _children(pid: int) -> list[int]:
    """Processes whose parent is `pid` (from /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # pid (comm) state ppid ...: comm may hold spaces, so split after its ')'
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


@pytest.fixture
def fault_db(request: pytest.FixtureRequest) -> Iterator[FaultDatabase]:
    backend: str = request.param
    server = request.getfixturevalue(f"{backend}_server")
    database = FaultDatabase(backend, server)
    try:
        yield database
    finally:
        database.drop()


# ---------------------------------------------------------------------------
# policyd, the real command, as a subprocess
# ---------------------------------------------------------------------------


class Policyd:
    """`policyd serve --foreground` on a temp config; each run logs to its own file."""

    def __init__(self, directory: Path, database_url: str, **extra: str) -> None:
        self.dir = directory
        self.port = free_port()
        self.spool = directory / "policyd.spool"
        self.config = directory / "policyd.cfg"
        settings = {
            "bind": "127.0.0.1",
            "port": str(self.port),
            "database": database_url,
            "defaultquota": str(QUOTA),
            "rejectquota": str(REJECT_QUOTA),
            "db_timeout": f"{DB_TIMEOUT:g}s",
            "db_retry": f"{DB_RETRY:g}s",
            "spool": str(self.spool),
            "log_level": "info",
            **extra,
        }
        self.config.write_text("".join(f"{key} = {value}\n" for key, value in settings.items()))
        self.config.chmod(0o600)  # it holds the database password
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self._log_file: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, timeout: float = 15.0) -> None:
        """Start a new run and wait until it says it is listening."""
        assert self.process is None or self.process.poll() is not None
        log_path = self.dir / f"policyd-{len(self.logs) + 1}.log"
        self.logs.append(log_path)
        self._spawn(log_path)
        deadline = time.monotonic() + timeout
        while "started: listening on" not in log_path.read_text(errors="replace"):
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"policyd exited ({self.process.returncode}):\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"policyd did not start in {timeout:g}s:\n{self.log_text()}")
            await asyncio.sleep(0.05)

    def _spawn(self, log_path: Path) -> None:
        self._log_file = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "policyd", "serve", "-c", str(self.config), "--foreground"],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=self.dir,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL, by pid: no shutdown, no flush, nothing."""
        assert self.process is not None and self.process.poll() is None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self._close_log()

    def terminate(self) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not exit.  Returns the exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        self._close_log()
        return process.returncode

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def log_text(self, run: int | None = None) -> str:
        paths = self.logs if run is None else [self.logs[run]]
        return "".join(path.read_text(errors="replace") for path in paths if path.exists())

    def notable_lines(self, run: int | None = None) -> list[str]:
        """The WARNING and ERROR lines (and anything that is not a log line: a traceback)."""
        lines = []
        for line in self.log_text(run).splitlines():
            match = LOG_LINE_RE.match(line)
            if match is None or match["level"] not in {"INFO", "DEBUG"}:
                lines.append(match["message"] if match else line)
        return lines

    def spool_bytes(self) -> int:
        """What the spool's files take on disk (its bound applies to this)."""
        total = 0
        for segment in self.spool.parent.glob(f"{self.spool.name}.[0-9]*"):
            with contextlib.suppress(FileNotFoundError):
                total += segment.stat().st_size
        return total

    def spool_pending(self) -> int:
        """Bytes of events in the spool the database does not have (per the spool's files)."""
        return pending_on_disk(str(self.spool))


@pytest.fixture
def policyd_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[Policyd] = []

    def make(database_url: str, **extra: str) -> Policyd:
        policyd = Policyd(tmp_path, database_url, **extra)
        started.append(policyd)
        return policyd

    yield make
    for policyd in started:
        policyd.terminate()


# ---------------------------------------------------------------------------
# the load
# ---------------------------------------------------------------------------


@dataclass
class Sent:
    """One request on the wire, and what became of it."""

    worker: int
    user: str
    recipients: int
    counted: bool  # an authenticated END-OF-MESSAGE request: policyd records an event
    sender: str
    sent_at: float
    latency: float | None = None
    action: str | None = None
    error: str | None = None


@dataclass
class Load:
    """Persistent connections sending requests back to back, each answer timed.

    A worker whose connection breaks reconnects (retrying every 20 ms while nothing
    listens); the request in flight is recorded as unanswered.  Every 7th request is at
    the RCPT stage and every 11th unauthenticated: answered, never recorded.
    """

    port: int
    connections: int = CONNECTIONS
    requests: list[Sent] = field(default_factory=list)
    connect_failures: int = 0
    _stopping: bool = False
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _serial: int = 0

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(index)) for index in range(self.connections)]

    async def stop(self) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks)

    def _next(
        self, worker: int, user: str | None = None, recipients: int | None = None
    ) -> tuple[Sent, bytes]:
        self._serial += 1
        serial = self._serial
        attributes: dict[str, Any] = {}
        counted = True
        if user is None:
            user = USERS[worker % len(USERS)]
            recipients = 1 + serial % 5
            if serial % 7 == 3:
                attributes["protocol_state"] = "RCPT"
                counted = False
            elif serial % 11 == 5:
                user = ""
                counted = False
        assert recipients is not None
        sender = f"s{serial}-w{worker}@example.org"
        sent = Sent(worker, user, recipients, counted, sender, time.monotonic())
        request = encode_request(
            sasl_username=user, sender=sender, recipient_count=recipients, queue_id=f"Q{serial}", **attributes
        )
        return sent, request

    async def _worker(self, index: int) -> None:
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        try:
            while not self._stopping:
                if writer is None:
                    try:
                        reader, writer = await asyncio.wait_for(
                            asyncio.open_connection("127.0.0.1", self.port), 2.0
                        )
                    except (OSError, TimeoutError):
                        self.connect_failures += 1
                        await asyncio.sleep(0.02)
                        continue
                assert reader is not None and writer is not None
                sent, request = self._next(index)
                if not await self._exchange(reader, writer, sent, request):
                    await _close(writer)
                    reader = writer = None
        finally:
            if writer is not None:
                await _close(writer)

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: Sent, request: bytes
    ) -> bool:
        self.requests.append(sent)
        sent.sent_at = time.monotonic()
        try:
            writer.write(request)
            raw = await asyncio.wait_for(reader.readuntil(b"\n\n"), REPLY_TIMEOUT)
        except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
            sent.error = type(error).__name__
            return False
        sent.latency = time.monotonic() - sent.sent_at
        text = raw.decode()
        assert text.startswith("action="), text
        sent.action = text[len("action=") : -2]
        return True

    async def ask(self, user: str, recipients: int) -> str | None:
        """One request on a connection of its own, recorded like the load's."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            sent, request = self._next(-1, user, recipients)
            await self._exchange(reader, writer, sent, request)
            return sent.action
        finally:
            await _close(writer)

    # -- what happened ---------------------------------------------------------------
    @property
    def answered(self) -> list[Sent]:
        return [sent for sent in self.requests if sent.action is not None]

    @property
    def unanswered(self) -> list[Sent]:
        return [sent for sent in self.requests if sent.action is None]

    def latencies(self) -> list[float]:
        return sorted(sent.latency for sent in self.requests if sent.latency is not None)

    def counted_totals(self, senders: set[str] | None = None) -> Counter[str]:
        """Recipients per user of counted events (all within quota: every one counts)."""
        totals: Counter[str] = Counter()
        for sent in self.requests:
            if sent.counted and (sent.sender in senders if senders is not None else sent.action):
                totals[sent.user] += sent.recipients
        return totals


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


@contextlib.asynccontextmanager
async def running(load: Load) -> AsyncIterator[Load]:
    load.start()
    try:
        yield load
    finally:
        await load.stop()


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, math.ceil(fraction * len(sorted_values)) - 1)]


# ---------------------------------------------------------------------------
# checks and figures shared by the scenarios
# ---------------------------------------------------------------------------


async def wait_for(condition: Any, timeout: float) -> bool:
    """Poll `condition` (an async callable) until true or `timeout`; returns the last result."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def wait_for_log(policyd: Policyd, text: str, run: int = -1, timeout: float = 10.0) -> None:
    async def logged() -> bool:
        return text in policyd.log_text(run)

    assert await wait_for(logged, timeout), (
        f"{text!r} not logged within {timeout:g}s:\n{policyd.notable_lines()}"
    )


def outage_end(policyd: Policyd, run: int = -1) -> re.Match[str] | None:
    """The last 'database is back' line of a run."""
    ends = list(OUTAGE_ENDED_RE.finditer(policyd.log_text(run)))
    return ends[-1] if ends else None


def outage_end_count(policyd: Policyd, run: int = -1) -> int:
    return len(OUTAGE_ENDED_RE.findall(policyd.log_text(run)))


class SpoolWatch:
    """Samples the spool file's size every 20 ms while it runs: the largest it ever was."""

    def __init__(self, policyd: Policyd) -> None:
        self.policyd = policyd
        self.largest = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.largest = max(self.largest, self.policyd.spool_bytes())
            await asyncio.sleep(0.02)

    def __enter__(self) -> SpoolWatch:
        self._task = asyncio.create_task(self._sample())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self.largest = max(self.largest, self.policyd.spool_bytes())


class Report:
    """What a scenario found: figures (always written, even when a check fails) and the
    checks that failed (all of them, so one run shows the whole picture)."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.row: dict[str, Any] = {}
        self.failures: list[str] = []

    def check(self, ok: bool, failure: str) -> bool:
        if not ok:
            self.failures.append(failure)
        return ok

    def load_figures(self, load: Load) -> None:
        latencies = load.latencies()
        self.row.update(
            requests_sent=len(load.requests),
            requests_answered=len(load.answered),
            events_sent=sum(1 for sent in load.requests if sent.counted),
            events_answered=sum(1 for sent in load.answered if sent.counted),
            max_latency_ms=round(1000 * (latencies[-1] if latencies else 0.0), 1),
            p99_ms=round(1000 * percentile(latencies, 0.99), 1),
            p50_ms=round(1000 * percentile(latencies, 0.50), 1),
        )

    def outage_figures(self, ended: re.Match[str] | None) -> None:
        if ended is not None:
            self.row.update(
                outage_logged_s=float(ended["seconds"]),
                replayed=int(ended["replayed"]),
                decided_from_memory=int(ended["memory"]),
                db_error_action=int(ended["error_action"]),
                dropped=int(ended["dropped"]),
            )

    @contextlib.contextmanager
    def recording(self, backend: str, fault: str) -> Iterator[Report]:
        self.row.update(backend=backend, fault=fault)
        try:
            yield self
            self.row["result"] = "pass" if not self.failures else "FAIL"
        except BaseException as error:
            self.row["result"] = "FAIL"
            self.failures.append(
                f"stopped by {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            )
            raise
        finally:
            self.row["failures"] = self.failures
            self.row["test"] = self.request.node.nodeid
            print(f"\nFAULT FIGURES {json.dumps(self.row)}")
            (self.tmp_path / "figures.json").write_text(json.dumps(self.row, indent=2) + "\n")
            target = os.environ.get("POLICYD_FAULT_FIGURES")
            if target:
                with open(target, "a") as file:
                    file.write(json.dumps(self.row) + "\n")
        assert not self.failures, f"{len(self.failures)} checks failed:\n- " + "\n- ".join(self.failures)


@pytest.fixture
def report(request: pytest.FixtureRequest, tmp_path: Path) -> Report:
    return Report(request, tmp_path)


async def recover_under_load(report: Report, policyd: Policyd, database: FaultDatabase, run: int = -1) -> int:
    """Start the database again while the load goes on; the outage must end (the spool
    replayed) within RECOVERY_UNDER_LOAD, then the load goes on a second more."""
    ends_before = outage_end_count(policyd, run)
    if database.hung:
        database.resume()
    else:
        await database.start()
    back = time.monotonic()

    async def ended() -> bool:
        return outage_end_count(policyd, run) > ends_before

    recovered = await wait_for(ended, RECOVERY_UNDER_LOAD)
    report.row["recovery_under_load_s"] = round(time.monotonic() - back, 2) if recovered else None
    report.check(
        recovered,
        f"the outage did not end within {RECOVERY_UNDER_LOAD:g}s of the database coming back while the "
        f"load went on ({policyd.spool_pending()} bytes still to write from the spool)",
    )
    await asyncio.sleep(1.0)
    return ends_before


async def wait_until_recovered(policyd: Policyd, run: int = -1, ends_before: int = 0) -> re.Match[str]:
    """After the load: an end line logged since the database came back (there were
    `ends_before` until then), and the spool empty."""

    async def recovered() -> bool:
        return outage_end_count(policyd, run) > ends_before and policyd.spool_pending() == 0

    assert await wait_for(recovered, RECOVERY_TIMEOUT), (
        f"no recovery within {RECOVERY_TIMEOUT:g}s of the load stopping "
        f"(spool {policyd.spool_pending()} bytes behind):\n{policyd.notable_lines(run)}"
    )
    ended = outage_end(policyd, run)
    assert ended is not None
    return ended


def check_answers(report: Report, load: Load, expect_all: bool = True) -> None:
    """Every request answered; every answer within the bound; every load answer DUNNO."""
    if expect_all:
        report.check(
            not load.unanswered,
            f"{len(load.unanswered)} requests unanswered: {[(s.sender, s.error) for s in load.unanswered[:5]]}",
        )
    late = [
        sent.latency for sent in load.answered if sent.latency is not None and sent.latency >= LATENCY_BOUND
    ]
    report.check(
        not late,
        f"{len(late)} answers took {LATENCY_BOUND:g}s or more, the slowest {max(late, default=0):.2f}s",
    )
    actions = Counter(sent.action for sent in load.answered if sent.worker >= 0)
    report.check(set(actions) == {"DUNNO"}, f"load answers other than DUNNO: {actions}")


def check_events(
    report: Report,
    load: Load,
    rows: list[tuple[str, str, int, str]],
    may_be_missing: frozenset[str] = frozenset(),
) -> set[str]:
    """Each row an event that was sent (same user, recipients and outcome), none twice;
    every answered counted request has its row unless in `may_be_missing`.  Returns the
    senders found."""
    by_sender = {sent.sender: sent for sent in load.requests}
    senders = Counter(sender for sender, _, _, _ in rows)
    duplicates = [sender for sender, times in senders.items() if times > 1]
    report.check(
        not duplicates, f"{len(duplicates)} events are in the database more than once: {duplicates[:5]}"
    )
    strangers = [sender for sender in senders if sender not in by_sender]
    report.check(not strangers, f"rows nobody sent: {strangers[:5]}")
    wrong = []
    for sender, user, recipients, action in rows:
        sent = by_sender.get(sender)
        if sent is None:
            continue
        expected = (sent.action or "DUNNO").split()[0]
        if not sent.counted or (user, recipients, action) != (sent.user, sent.recipients, expected):
            wrong.append((sender, user, recipients, action))
    report.check(not wrong, f"{len(wrong)} rows differ from what was sent and answered: {wrong[:5]}")
    missing = [
        sent.sender
        for sent in load.answered
        if sent.counted and sent.sender not in senders and sent.sender not in may_be_missing
    ]
    report.check(not missing, f"{len(missing)} answered events are not in the database: {missing[:5]}")
    return set(senders)


async def check_quotas(
    report: Report,
    policyd: Policyd,
    database: FaultDatabase,
    expected: Counter[str],
    in_window: Counter[str] | None = None,
) -> None:
    """The database holds exactly `expected` recipients per user, and the daemon decides
    by `in_window` (by default the same: every answered event is in the database).

    For each user: a message that brings the total to quota - 1 is DUNNO only if the
    daemon counts no more than it should; one more recipient is HOLD only if it counts
    no less.  Both answers right: the daemon counts exactly that.
    """
    rows = await database.query(
        "SELECT sasl_username, SUM(recipient_count) FROM events "
        "WHERE action IN ('DUNNO', 'HOLD') GROUP BY sasl_username"
    )
    in_database = Counter({user: int(total) for user, total in rows})
    report.check(
        in_database == expected,
        f"recipients per user in the database {dict(in_database)}, sent {dict(expected)}",
    )
    counted = in_window if in_window is not None else in_database
    client = await PolicyClient.connect(policyd.address)
    try:
        for user in USERS:
            total = counted[user]
            answers = (
                await client.ask(
                    sasl_username=user, sender="check@example.org", recipient_count=QUOTA - total - 1
                ),
                await client.ask(sasl_username=user, sender="check@example.org", recipient_count=1),
            )
            report.check(
                answers == ("DUNNO", HOLD),
                f"{user}: with {total} recipients answered, to {QUOTA - 1} then {QUOTA} "
                f"answered {answers}, not ('DUNNO', {HOLD!r}): the daemon does not count what it answered",
            )
    finally:
        await client.close()


def check_outage_log(
    report: Report, policyd: Policyd, run: int | None = None, allowed: tuple[str, ...] = ()
) -> list[str]:
    """One line when the outage starts, one when it ends, no reminder (it is short),
    nothing per request: every other WARNING/ERROR line is an expected one."""
    notable = policyd.notable_lines(run)
    started = [line for line in notable if line.startswith(OUTAGE_STARTED)]
    ended = [line for line in notable if OUTAGE_ENDED_RE.search(line)]
    connection_lost = [line for line in notable if CONNECTION_LOST_RE.match(line)]
    misplaced = [line for line in notable if MISPLACED_RE.match(line)]
    report.check(len(misplaced) <= 1, f"{len(misplaced)} misplaced-check warnings, once an hour at most")
    report.check(len(started) == 1, f"{len(started)} 'database unavailable' lines, not 1: {started[:4]}")
    report.check(len(ended) == 1, f"{len(ended)} 'database is back' lines, not 1: {ended[:4]}")
    report.check(
        not connection_lost,
        f"{len(connection_lost)} 'connection lost' lines: the backends' retries are debug-level",
    )
    # A slow disk under a loaded machine (the spool's append moved to a thread for a
    # while) is said, and is about the disk, not the database: allowed everywhere.
    allowed = (*allowed, "spool: appending to ")
    others = [
        line
        for line in notable
        if line not in started + ended + connection_lost + misplaced and not line.startswith(allowed)
    ]
    report.check(not others, f"unexpected warnings or errors: {others[:6]}")
    report.row["warning_lines"] = len(notable)
    return notable


def check_replay_count(report: Report, ended: re.Match[str]) -> None:
    report.check(int(ended["replayed"]) > 0, f"the end line reports no replay: {ended.group(0)!r}")


# ---------------------------------------------------------------------------
# (a) the database stops, dies or hangs during a steady load, and comes back
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault_db", BACKENDS, indirect=True)
@pytest.mark.parametrize("how", ["stop", "crash", "hang"])
async def test_database_fails_under_load_and_comes_back(
    fault_db: FaultDatabase, policyd_factory: Any, how: str, report: Report
) -> None:
    fault = {
        "stop": "database stopped",
        "crash": "database killed",
        "hang": "database hangs (SIGSTOP)",
    }[how]
    with report.recording(fault_db.backend, fault):
        policyd: Policyd = policyd_factory(fault_db.url)
        await policyd.start()
        load = Load(policyd.port)
        with SpoolWatch(policyd) as spool:
            async with running(load):
                # A user near the quota, decided from memory during the outage.
                report.check(await load.ask("memo", QUOTA - 10) == "DUNNO", "memo: first message not DUNNO")
                await asyncio.sleep(1.0)
                if how == "hang":
                    fault_db.hang()
                else:
                    await fault_db.stop(crash=how == "crash")
                await wait_for_log(policyd, OUTAGE_STARTED)
                memo = (await load.ask("memo", 5), await load.ask("memo", 5))
                report.check(memo == ("DUNNO", HOLD), f"memo during the outage (from memory): {memo}")
                await asyncio.sleep(1.5)
                ends_before = await recover_under_load(report, policyd, fault_db)
        ended = await wait_until_recovered(policyd, ends_before=ends_before)
        report.load_figures(load)
        report.outage_figures(ended)
        report.row.update(outage_s=round(fault_db.outage_seconds, 2), spool_max_bytes=spool.largest)

        check_answers(report, load)
        rows = await fault_db.events()
        report.row["events_in_db"] = len(rows)
        events_sent = sum(1 for sent in load.requests if sent.counted)
        report.check(len(rows) == events_sent, f"{len(rows)} events in the database, {events_sent} sent")
        check_events(report, load, rows)
        check_outage_log(report, policyd)
        check_replay_count(report, ended)
        report.check(int(ended["dropped"]) == 0, f"events dropped: {ended.group(0)!r}")
        expected = load.counted_totals()
        await check_quotas(report, policyd, fault_db, expected)
        # The memo user's HOLD, decided from memory, was recorded as such and counts.
        client = await PolicyClient.connect(policyd.address)
        memo = (
            await client.ask(sasl_username="memo", recipient_count=REJECT_QUOTA - QUOTA - 1),
            await client.ask(sasl_username="memo", recipient_count=1),
        )
        await client.close()
        report.check(memo == (HOLD, REJECT), f"memo after recovery: {memo}, not ({HOLD!r}, {REJECT!r})")
        report.check(policyd.terminate() == 0, "policyd did not exit 0 on SIGTERM")


# ---------------------------------------------------------------------------
# (b) policyd is killed during an outage and restarted before the database is back
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault_db", BACKENDS, indirect=True)
async def test_policyd_killed_during_an_outage(
    fault_db: FaultDatabase, policyd_factory: Any, report: Report
) -> None:
    with report.recording(fault_db.backend, "policyd kill -9 during a database outage"):
        policyd: Policyd = policyd_factory(fault_db.url)
        await policyd.start()
        load = Load(policyd.port)
        with SpoolWatch(policyd) as spool:
            async with running(load):
                await asyncio.sleep(1.0)
                await fault_db.stop()
                await wait_for_log(policyd, OUTAGE_STARTED)
                await asyncio.sleep(1.0)
                report.row["spool_bytes_at_kill"] = policyd.spool_pending()
                killed_at = time.monotonic()
                policyd.kill()
                await asyncio.sleep(0.2)
                starting = time.monotonic()
                await policyd.start()  # the same config and spool; the database still down
                restarted_at = time.monotonic()
                report.row["restart_s"] = round(restarted_at - starting, 2)
                report.row["policyd_unreachable_s"] = round(restarted_at - killed_at, 2)
                await asyncio.sleep(1.0)
                ends_before = await recover_under_load(report, policyd, fault_db, run=1)
        ended = await wait_until_recovered(policyd, run=1, ends_before=ends_before)
        report.load_figures(load)
        report.outage_figures(ended)
        report.row.update(outage_s=round(fault_db.outage_seconds, 2), spool_max_bytes=spool.largest)

        # Only requests in flight when policyd was killed may be unanswered: at most one
        # per connection (Postfix answers those with a temporary error; the client retries).
        in_flight = load.unanswered
        report.row["in_flight_at_kill"] = len(in_flight)
        report.check(
            len(in_flight) <= CONNECTIONS
            and all(killed_at - REPLY_TIMEOUT < s.sent_at < restarted_at for s in in_flight),
            f"unanswered requests other than those in flight at the kill: {[(s.sender, s.error) for s in in_flight]}",
        )
        check_answers(report, load, expect_all=False)
        # Every answered event exactly once (the first run's spool replayed by the second,
        # nothing twice); an event in flight at the kill may or may not have made it.
        rows = await fault_db.events()
        report.row["events_in_db"] = len(rows)
        in_db = check_events(report, load, rows)
        answered_events = sum(1 for sent in load.answered if sent.counted)
        in_flight_kept = sum(1 for sent in in_flight if sent.counted and sent.sender in in_db)
        report.row["in_flight_kept"] = in_flight_kept
        report.check(
            len(rows) == answered_events + in_flight_kept,
            f"{len(rows)} events in the database, {answered_events} answered + {in_flight_kept} in flight",
        )
        # First run: the outage started (no end: it was killed).
        first = [
            line
            for line in policyd.notable_lines(0)
            if not CONNECTION_LOST_RE.match(line) and not MISPLACED_RE.match(line)
        ]
        report.check(
            len(first) == 1 and first[0].startswith(OUTAGE_STARTED),
            f"first run's warnings and errors: {first}",
        )
        # Second run: the spool the first left, replayed once the database is back.
        second = check_outage_log(
            report,
            policyd,
            run=1,
            # The database down at start; the spool left by the killed run (checked below).
            allowed=("cannot open the database", "database opened after", "spool: "),
        )
        waiting = [line for line in second if "events from a previous run are waiting" in line]
        other_spool = [
            line
            for line in second
            if line.startswith("spool: ") and line not in waiting and "cut off" not in line
        ]
        report.check(len(waiting) == 1, f"'events from a previous run' lines: {waiting}")
        report.check(not other_spool, f"unexpected spool lines: {other_spool}")
        left = int(waiting[0].split()[1]) if waiting else 0
        report.row["left_in_spool_by_killed_run"] = left
        report.check(
            int(ended["replayed"]) >= left > 0,
            f"{left} events left by the killed run, the end line says {ended.group(0)!r}",
        )
        report.check(int(ended["dropped"]) == 0, f"events dropped: {ended.group(0)!r}")
        await check_quotas(report, policyd, fault_db, load.counted_totals(in_db))
        report.check(policyd.terminate() == 0, "policyd did not exit 0 on SIGTERM")


# ---------------------------------------------------------------------------
# (c) the spool fills up to its bound during an outage
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault_db", BACKENDS, indirect=True)
async def test_spool_fills_to_its_bound(
    fault_db: FaultDatabase, policyd_factory: Any, report: Report
) -> None:
    with report.recording(fault_db.backend, "spool full (64K) during a database outage"):
        policyd: Policyd = policyd_factory(fault_db.url, spool_max_size="64K")
        await policyd.start()
        load = Load(policyd.port)
        with SpoolWatch(policyd) as spool:
            async with running(load):
                await asyncio.sleep(1.0)
                await fault_db.stop()
                await wait_for_log(policyd, SPOOL_LOSS)  # some 380 events fill 64K
                await asyncio.sleep(0.5)
                ends_before = await recover_under_load(report, policyd, fault_db)
        ended = await wait_until_recovered(policyd, ends_before=ends_before)
        report.load_figures(load)
        report.outage_figures(ended)
        report.row.update(outage_s=round(fault_db.outage_seconds, 2), spool_max_bytes=spool.largest)

        check_answers(report, load)
        report.check(
            SPOOL_MIN_SIZE - 400 < spool.largest <= SPOOL_MIN_SIZE,
            f"the spool grew to {spool.largest} bytes; its bound is {SPOOL_MIN_SIZE}",
        )
        # Exactly the events reported dropped are missing; the rest are there, once each.
        dropped = int(ended["dropped"])
        rows = await fault_db.events()
        report.row["events_in_db"] = len(rows)
        events_sent = sum(1 for sent in load.requests if sent.counted)
        report.row["lost_by_design"] = dropped
        report.check(dropped > 0, f"nothing dropped with a full spool? {ended.group(0)!r}")
        report.check(
            len(rows) == events_sent - dropped,
            f"{len(rows)} events in the database; {events_sent} sent - {dropped} reported dropped = "
            f"{events_sent - dropped}: {events_sent - dropped - len(rows)} lost without being reported",
        )
        in_db = check_events(
            report, load, rows, may_be_missing=frozenset(sent.sender for sent in load.requests)
        )
        # The loss: logged once, clearly; the outage: one line each way.
        losses = [line for line in policyd.notable_lines() if SPOOL_LOSS in line]
        report.check(
            len(losses) == 1 and f"would exceed its limit of {SPOOL_MIN_SIZE} bytes" in losses[0],
            f"lines about the loss: {losses}",
        )
        check_outage_log(
            report,
            policyd,
            allowed=(f"spool: {policyd.spool} would exceed", f"spool: {policyd.spool} takes events again"),
        )
        # The window counts every answered event, the dropped ones too (they were sent);
        # the database lacks exactly the dropped ones.
        await check_quotas(
            report, policyd, fault_db, load.counted_totals(in_db), in_window=load.counted_totals()
        )
        report.check(policyd.terminate() == 0, "policyd did not exit 0 on SIGTERM")


# ---------------------------------------------------------------------------
# (d) a restart during an outage keeps counting what the spool holds
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fault_db", BACKENDS, indirect=True)
async def test_restart_during_an_outage_counts_the_spool(
    fault_db: FaultDatabase, policyd_factory: Any
) -> None:
    """A user at 19 of 20, spooled during an outage; kill -9 and restart with the database
    still down: the next recipient is HOLD, not a fresh start."""
    policyd: Policyd = policyd_factory(fault_db.url, defaultquota="20", rejectquota="40")
    await policyd.start()
    load = Load(policyd.port)
    assert await load.ask("other", 1) == "DUNNO"  # in the database
    await fault_db.stop()
    assert await load.ask("victim", 10) == "DUNNO"  # spooled
    await wait_for_log(policyd, OUTAGE_STARTED)
    assert await load.ask("victim", 9) == "DUNNO"  # 19: spooled
    policyd.kill()
    await policyd.start()  # the database is still down
    # The 2 spooled, and maybe "other"'s too: the spool saves how far the database has got
    # once a second, and an event replayed again is skipped (counted once, below).
    await wait_for_log(policyd, "events from a previous run are waiting", run=1)
    assert re.search(r"spool: [23] events from a previous run are waiting", policyd.log_text(1))
    assert await load.ask("victim", 1) == HOLD  # 20: counted from the spool
    await fault_db.start()
    await wait_until_recovered(policyd, run=1)
    # Every answered event is in the database once; the window now holds the database.
    rows = await fault_db.events()
    assert sorted((user, recipients, action) for _, user, recipients, action in rows) == [
        ("other", 1, "DUNNO"),
        ("victim", 1, "HOLD"),
        ("victim", 9, "DUNNO"),
        ("victim", 10, "DUNNO"),
    ]
    assert await load.ask("victim", 19) == HOLD  # 39
    assert await load.ask("victim", 1) == REJECT  # 40
    assert await load.ask("other", 1) == "DUNNO"
    assert policyd.terminate() == 0
