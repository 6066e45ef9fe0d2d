"""Shared fixtures: storage backends (real servers), an in-process daemon, a policy client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from policyd.clock import utc_now
from policyd.config import Settings
from policyd.daemon import Daemon
from policyd.quota import QuotaRules
from policyd.storage import Event, Storage, create_storage

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
BACKENDS = ("sqlite", "mariadb", "postgresql", "galera")
_table_numbers = itertools.count(1)
_galera_first = itertools.count()


def skip_or_fail(reason: str) -> None:
    """Outside CI a missing server skips the test; in CI it is a failure."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: a missing server is a failure)")
    pytest.skip(reason)


# ---------------------------------------------------------------------------
# real database servers, one of each per test session, started on first use
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[Any]:
    from tests import dbservers

    reason = dbservers.available("mariadb")
    if reason:
        skip_or_fail(reason)
    with dbservers.MariaDBServer() as server:
        yield server


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[Any]:
    from tests import dbservers

    reason = dbservers.available("postgresql")
    if reason:
        skip_or_fail(reason)
    with dbservers.PostgreSQLServer() as server:
        yield server


@pytest.fixture(scope="session")
def galera_cluster() -> Iterator[Any]:
    """A 3-node MariaDB Galera cluster on 127.0.0.1 (~15 s to start), shared by the session."""
    from tests import dbservers

    reason = dbservers.available("galera")
    if reason:
        skip_or_fail(reason)
    with dbservers.GaleraCluster() as cluster:
        yield cluster


def database_url(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> str:
    if backend == "sqlite":
        return f"sqlite://{tmp_path}/policyd.sqlite"
    if backend == "galera":
        # Every node listed, a different one first from test to test.
        cluster = request.getfixturevalue("galera_cluster")
        first = next(_galera_first) % len(cluster.nodes)
        return str(cluster.url_for(cluster.database, cluster.nodes[first:] + cluster.nodes[:first]))
    server = request.getfixturevalue(f"{backend}_server")
    return str(server.url)


def unique_table() -> str:
    # Each test gets its own table, so tests sharing one server never see each other's rows.
    return f"events_t{os.getpid()}_{next(_table_numbers)}"


@pytest.fixture(params=[pytest.param(name, marks=getattr(pytest.mark, name)) for name in BACKENDS])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def database(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> tuple[str, str]:
    """(URL, table) of an empty place to store events, on each backend."""
    return database_url(request, backend, tmp_path), unique_table()


@contextlib.contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A real small file system at `mount` (root only: else skipped, or failed in CI)."""
    mount.mkdir(exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    if result.returncode != 0:
        skip_or_fail(f"cannot mount a tmpfs: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill_disk(disk: Path) -> Path:
    """A file taking all the space left on `disk` (written until the disk says no)."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as file:
        while True:
            try:
                file.write(b"\0" * 65536)
            except OSError:
                break
    return filler


def remount_read_only(mount: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)


async def add_events(url: str, table: str, events: list[Event]) -> None:
    """`events` written into the table (made first if needed), through a storage of its own."""
    storage = create_storage(url, table)
    await storage.open()
    try:
        await storage.migrate()
        await storage.add_events(events)
    finally:
        await storage.close()


async def count_rows(url: str, table: str = "events") -> int:
    """The events in the table, through a storage of its own."""
    store = create_storage(url, table)
    await store.open()
    try:
        return await store.count_events()
    finally:
        await store.close()


def execute_admin_sql(request: pytest.FixtureRequest | None, url: str, sql: str) -> None:
    """Run `sql` on the database of `url` as its administrator (SQLite: the file; a
    server needs the test's `request`, to find its fixture)."""
    if url.startswith("sqlite://"):
        with contextlib.closing(sqlite3.connect(url[len("sqlite://") :], isolation_level=None)) as connection:
            connection.executescript(sql)
        return
    assert request is not None, "a database server's fixture is found through the test's request"
    if url.startswith("mysql") and "," in url.rpartition("@")[2].partition("/")[0]:
        cluster: Any = request.getfixturevalue("galera_cluster")  # several hosts: the cluster's
        cluster.admin_execute(sql, cluster.database)
        return
    backend = "mariadb" if url.startswith("mysql") else "postgresql"
    server: Any = request.getfixturevalue(f"{backend}_server")
    server.admin_execute(sql, server.database)


@pytest.fixture
async def storage(database: tuple[str, str]) -> AsyncIterator[Storage]:
    url, table = database
    store = create_storage(url, table)
    await store.open()
    await store.migrate()
    try:
        yield store
    finally:
        await store.close()


# ---------------------------------------------------------------------------
# time, settings, the daemon
# ---------------------------------------------------------------------------


class FakeClock:
    """Time that moves only when a test says so (never slept)."""

    def __init__(self, start: datetime | None = None) -> None:
        self.now = start or datetime(2026, 11, 24, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


# Keywords of make_settings that are Settings' own (the others are QuotaRules').
SETTINGS_KEYS = frozenset(item.name for item in fields(Settings)) - {"rules", "database", "table", "port"}


def make_settings(url: str, table: str = "events", **changes: Any) -> Settings:
    """Test settings: ephemeral port, given storage, settings and rules overridden by keyword.

    The spool goes beside an SQLite file, or in a new temp dir for a server database.
    """
    settings_changes = {key: changes.pop(key) for key in list(changes) if key in SETTINGS_KEYS}
    if "spool" not in settings_changes:
        if url.startswith("sqlite://"):
            settings_changes["spool"] = url[len("sqlite://") :] + ".spool"
        else:
            settings_changes["spool"] = os.path.join(tempfile.mkdtemp(prefix="policyd-spool-"), "spool")
    rules = replace(QuotaRules(), **changes)
    return replace(Settings(), port=0, database=url, table=table, rules=rules, **settings_changes)


class PolicyClient:
    """A Postfix-like client: one persistent connection, one request at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, address: str) -> PolicyClient:
        if address.startswith("unix:"):
            reader, writer = await asyncio.open_unix_connection(address[5:])
        else:
            host, _, port = address.rpartition(":")
            reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer)

    async def ask(self, timeout: float = 5.0, **attributes: Any) -> str:
        self.writer.write(encode_request(**attributes))
        return await self.read_reply(timeout)

    async def read_reply(self, timeout: float = 5.0) -> str:
        raw = await asyncio.wait_for(self.reader.readuntil(b"\n\n"), timeout)
        text = raw.decode()
        assert text.startswith("action="), text
        return text[len("action=") : -2]

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def encode_request(**attributes: Any) -> bytes:
    """A request as Postfix sends it at END-OF-MESSAGE, with attributes overridden."""
    base: dict[str, Any] = {
        "request": "smtpd_access_policy",
        "protocol_state": "END-OF-MESSAGE",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "client.example.net",
        "helo_name": "client.example.net",
        "sender": "alice@example.org",
        "recipient": "",
        "recipient_count": 1,
        "queue_id": "4ABCDEF",
        "sasl_method": "PLAIN",
        "sasl_username": "alice",
        "size": 1234,
    }
    base.update(attributes)
    return "".join(f"{name}={value}\n" for name, value in base.items()).encode() + b"\n"


@dataclass(frozen=True)
class HttpAnswer:
    status: int
    headers: dict[str, str]  # names lowercased
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()


async def http_get(url: str, headers: dict[str, str] | None = None, timeout: float = 10.0) -> HttpAnswer:
    """GET `url` (http://host:port/path) over a socket of its own, Connection: close."""
    split = urlsplit(url)
    assert split.hostname is not None and split.port is not None, url
    target = split.path + (f"?{split.query}" if split.query else "")
    reader, writer = await asyncio.open_connection(split.hostname, split.port)
    try:
        lines = [f"GET {target or '/'} HTTP/1.1", f"Host: {split.netloc}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return HttpAnswer(int(status_line.split(" ")[1]), parsed, body)


class RunningDaemon:
    def __init__(self, daemon: Daemon, task: asyncio.Task[None]) -> None:
        self.daemon = daemon
        self.task = task

    @property
    def address(self) -> str:
        assert self.daemon.server is not None
        return self.daemon.server.addresses[0]

    async def client(self) -> PolicyClient:
        return await PolicyClient.connect(self.address)

    @property
    def web_url(self) -> str:
        """http://host:port of the HTTP listener (http_listen)."""
        assert self.daemon.web is not None, "started without http_listen"
        return self.daemon.web.addresses[0]

    async def stop(self) -> None:
        self.daemon.stopping.set()
        await asyncio.wait_for(self.task, 15)


@contextlib.asynccontextmanager
async def run_daemon(
    settings: Settings, clock: Callable[[], datetime] | None = None
) -> AsyncIterator[RunningDaemon]:
    """The real daemon, in-process, on an ephemeral port."""
    daemon = Daemon(settings, config_path=None, clock=clock or utc_now)
    started = asyncio.Event()
    task = asyncio.create_task(daemon.run(ready=lambda _: started.set()))
    waiter = asyncio.create_task(started.wait())
    done, _ = await asyncio.wait({task, waiter}, timeout=15, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        waiter.cancel()
        task.result()  # raises what went wrong
    assert waiter in done, "daemon did not start in 15s"
    running = RunningDaemon(daemon, task)
    try:
        yield running
    finally:
        if not task.done():
            await running.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def serve_command(config: Path | str) -> list[str]:
    """`policyd serve` in the foreground with this config, by the tests' interpreter."""
    return [sys.executable, "-m", "policyd", "serve", "-c", str(config), "--foreground"]


def wait_for_port(port: int, process: subprocess.Popen[bytes] | None = None, timeout: float = 15) -> None:
    """Until something accepts connections on 127.0.0.1:`port` (a `policyd serve` just
    started); fails with its stderr if `process` exits first, or after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(process.stderr.read().decode() if process.stderr else "exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout:g}s")
