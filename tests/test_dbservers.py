"""The test-database harness (tests/dbservers.py) really works: each server
starts, takes password logins over TCP from the async drivers policyd uses,
survives a simulated outage, hands out fresh databases, and cleans up.

Sync tests that drive the async drivers with asyncio.run(), so no pytest
plugin is needed. Skipped when the server binaries are missing, except with
CI=true, where that is a failure.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

try:
    from tests import dbservers
except ImportError:  # tests/ is not a package: pytest put tests/ on sys.path
    import dbservers  # type: ignore[no-redef]

KINDS = [
    pytest.param("mariadb", marks=pytest.mark.mariadb),
    pytest.param("postgresql", marks=pytest.mark.postgresql),
]
DRIVERS = {"mariadb": "aiomysql", "postgresql": "asyncpg"}


def _driver(kind: str) -> ModuleType:
    """The async driver for kind; skip if not installed (fail when CI=true)."""
    name = DRIVERS[kind]
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true but driver {name} is not installed: {exc}", pytrace=False)
        pytest.skip(f"driver {name} not installed")


async def _query(
    kind: str,
    server: dbservers.DBServer,
    sql: str,
    *,
    database: str | None = None,
    password: str | None = None,
) -> list[tuple[Any, ...]]:
    """Connect over TCP with a password as the test user, run sql, return rows."""
    drv = _driver(kind)
    db = database or server.database
    pw = server.password if password is None else password
    if kind == "postgresql":
        conn = await drv.connect(
            host=server.host, port=server.port, user=server.user, password=pw, database=db, timeout=10
        )
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        finally:
            await conn.close()
    conn = await drv.connect(
        host=server.host,
        port=server.port,
        user=server.user,
        password=pw,
        db=db,
        connect_timeout=10,
        autocommit=True,
    )
    try:
        async with conn.cursor() as cur:
            await cur.execute(sql)
            return list(await cur.fetchall())
    finally:
        conn.close()


def query(kind: str, server: dbservers.DBServer, sql: str, **kwargs: Any) -> list[tuple[Any, ...]]:
    return asyncio.run(_query(kind, server, sql, **kwargs))


@pytest.fixture(scope="module", params=KINDS)
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, dbservers.DBServer]]:
    kind: str = request.param
    dbservers.require(kind)
    _driver(kind)
    with dbservers.server_class(kind)() as srv:
        yield kind, srv


def test_select_1_over_tcp_with_password(server: tuple[str, dbservers.DBServer]) -> None:
    kind, srv = server
    assert srv.host == "127.0.0.1"
    assert srv.url == f"{srv.scheme}://policyd:policyd-pw@127.0.0.1:{srv.port}/policyd_test"
    assert query(kind, srv, "SELECT 1") == [(1,)]


def test_wrong_password_is_rejected(server: tuple[str, dbservers.DBServer]) -> None:
    kind, srv = server
    with pytest.raises(Exception, match=r"(?i)password|denied"):
        query(kind, srv, "SELECT 1", password="wrong")


def test_user_owns_test_database(server: tuple[str, dbservers.DBServer]) -> None:
    kind, srv = server
    query(kind, srv, "CREATE TABLE owned (id INTEGER PRIMARY KEY)")
    query(kind, srv, "INSERT INTO owned (id) VALUES (7)")
    assert query(kind, srv, "SELECT id FROM owned") == [(7,)]
    assert srv.admin_execute("SELECT id FROM owned", database=srv.database).split() == ["7"]


@pytest.mark.parametrize("crash", [False, True], ids=["graceful", "crash"])
def test_outage_stop_and_restart_same_port(server: tuple[str, dbservers.DBServer], crash: bool) -> None:
    kind, srv = server
    table = f"survives_{'crash' if crash else 'graceful'}"
    query(kind, srv, f"CREATE TABLE {table} (v INTEGER)")
    query(kind, srv, f"INSERT INTO {table} (v) VALUES (42)")
    port, old_pid = srv.port, srv.pid

    srv.stop_server(crash=crash)
    assert not srv.running
    # Connection refused: asyncpg raises OSError, aiomysql its OperationalError.
    refused = (OSError, _driver(kind).OperationalError) if kind == "mariadb" else (OSError,)
    with pytest.raises(refused):
        query(kind, srv, "SELECT 1")

    srv.start_server()
    assert srv.running and srv.port == port and srv.pid != old_pid
    assert query(kind, srv, f"SELECT v FROM {table}") == [(42,)]


def test_create_database_is_fresh_and_owned(server: tuple[str, dbservers.DBServer]) -> None:
    kind, srv = server
    url = srv.create_database("iso_one")
    assert url.endswith(f":{srv.port}/iso_one")
    query(kind, srv, "CREATE TABLE owned (id INTEGER)", database="iso_one")  # same name, other db
    assert query(kind, srv, "SELECT COUNT(*) FROM owned", database="iso_one") == [(0,)]
    srv.drop_database("iso_one")
    with pytest.raises(Exception, match=r"(?i)iso_one"):
        query(kind, srv, "SELECT 1", database="iso_one")


@pytest.mark.parametrize("kind", KINDS)
def test_stop_kills_server_and_removes_tmpdir(kind: str) -> None:
    dbservers.require(kind)
    srv = dbservers.server_class(kind)()
    with srv:
        pid, tmpdir = srv.pid, srv.tmpdir
        assert pid is not None and tmpdir is not None and tmpdir.is_dir()
    assert srv.pid is None and srv.tmpdir is None
    assert not tmpdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_available_reports_reasons() -> None:
    with pytest.raises(ValueError):
        dbservers.available("oracle")
    for kind in ("mariadb", "postgresql"):
        reason = dbservers.available(kind)
        assert reason is None or isinstance(reason, str)
