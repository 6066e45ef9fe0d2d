"""PostgreSQL backend (asyncpg): several daemons can share one database.

URL: ``postgresql://user:password@host:port/dbname`` (or ``postgres://``); the user
and password are URL-decoded, the port defaults to 5432 and ``?sslmode=`` (disable,
allow, prefer, require, verify-ca, verify-full) is passed on to the driver.  Without a
host, asyncpg's defaults apply (PGHOST, else the local unix socket).

One clock
    ``ts`` is ``timestamptz(3)``: an instant, not a wall-clock reading.  The 24h window
    is computed by the daemon from its own UTC clock (the ``since`` it passes in) and
    compared with instants, so relays in different time zones, a server whose
    ``TimeZone`` is not UTC, and DST changes all agree on who sent what when.  Each
    session also runs with ``TimeZone=UTC``, so the only place a zone is ever applied,
    the go-policyd drop-in below (``timestamp`` without time zone holding UTC),
    reads as UTC too.  Timestamps are truncated to the millisecond before they are
    sent, like the other backends, so a window boundary means the same thing on each.

Schema and indexes (created and upgraded by ``migrate()``, never by ``open()``)::

    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY
    ts              timestamptz(3) NOT NULL
    sasl_username   text NOT NULL DEFAULT ''
    sender          text
    client_address  text
    recipient_count integer                   -- NULL (old go-policyd rows) counts 0
    action          varchar(16) NOT NULL DEFAULT 'DUNNO'
    event_id        char(32)                  -- UNIQUE: a replayed write is skipped

    <t>_user_ts      (sasl_username, ts) INCLUDE (recipient_count, action)
                     WHERE length(sasl_username) <= 512
    <t>_user_md5_ts  (md5(sasl_username), ts) WHERE length(sasl_username) > 512
    <t>_ts           (ts)                     -- purge, top
    <t>_event_id     UNIQUE (event_id)        -- ON CONFLICT (event_id) DO NOTHING

A btree entry must fit in a third of a page (about 2700 bytes), so a plain index on
the username would make an insert of a very long name fail.  Two partial indexes
split the names by length: every realistic name (up to 512 characters, at most
2048 bytes in UTF-8) is in ``<t>_user_ts``, which covers the per-request sum: an
index-only scan reads the user's rows in the window without touching the table.
Longer names, which only a misbehaving client sends, are indexed by their md5 (fixed
size, so ANY length works) and rechecked against the row, so an md5 collision can
never merge two users.  The per-request sum is one statement with one branch per
index; each branch is gated on the length of the name asked for, which PostgreSQL
evaluates once (a one-time filter), so only one index is ever probed, and the
length is measured by the server in the same way as in the index predicates.

go-policyd drop-in
    A go-policyd table copied into PostgreSQL (``ts timestamp(3)`` holding UTC, padded
    ``char(n)`` columns, primary key (ts, sasl_username, sender, client_address)) is
    upgraded in place by ``migrate()``, in one transaction and one table rewrite:
    ts becomes timestamptz read as UTC, char(n) becomes text without its padding,
    ``action`` (old rows: 'DUNNO') and ``event_id`` are added, an identity ``id``
    replaces the composite key, then the indexes.  ``pg_advisory_xact_lock`` makes a
    second daemon starting at the same moment wait, then find nothing to do.  Before
    that, reads already work on the old table (recipients_since, top, count, purge:
    its rows all count as DUNNO, a NULL recipient_count as 0); writing needs the
    migration (event_id), and says so.

Reconnecting
    Connections come from a small asyncpg pool (1 to 4).  A pooled connection the
    server has closed (restart, ``pg_terminate_backend``, a proxy timing out) is
    replaced by the pool on its next use; when an operation fails because its
    connection turned out to be dead, every pooled connection is expired (after a
    server restart they are all dead) and the operation is retried once on a new
    one.  That is safe: reads are reads, and the insert is idempotent on event_id.
    A server that is down fails fast: connection refused at once, connect timeout
    3s, statement timeout 5s.  Nothing needs a restart of policyd.

Errors
    Every driver error (asyncpg.PostgresError, InterfaceError, OSError, timeouts) is
    raised as StorageError, with a message that never contains the password.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg

from policyd.logs import log
from policyd.quota import Outcome
from policyd.storage import schema
from policyd.storage.base import (
    EVENT_COLUMNS,
    EVENT_VALUES,
    OUTCOME_CODE_SQL,
    PURGE_BATCH_ROWS,
    Event,
    SchemaMissing,
    SenderStats,
    Storage,
    StorageError,
    Tail,
    TailRow,
    UserHistory,
    event_row,
    outcome_of_stored,
    utc,
)

T = TypeVar("T")

DEFAULT_PORT = 5432
# A server that does not answer the connection within this is down, as far as we care.
CONNECT_TIMEOUT = 3.0
# Default bound on one statement (and on waiting for a pooled connection).  The daemon
# bounds its own wait per request separately (db_timeout).
COMMAND_TIMEOUT = 5.0
# A migration may rewrite a big go-policyd table: give it time.
MIGRATE_TIMEOUT = 3600.0
# Reading the window at start (a few seconds for millions of rows).
LOAD_TIMEOUT = 600.0
POOL_MIN_SIZE = 1
POOL_MAX_SIZE = 4
CLOSE_TIMEOUT = 5.0
# Names up to this many characters are in the covering index; longer ones in the md5 one.
SHORT_NAME_CHARS = 512
PG_MAX_IDENTIFIER = 63
SSL_MODES = frozenset({"disable", "allow", "prefer", "require", "verify-ca", "verify-full"})
APPLICATION_NAME = "policyd"

# Errors meaning "this connection is dead": the operation is retried once on a fresh
# connection, after expiring the whole pool.  (An InterfaceError counts only when the
# connection is closed: "connection is closed", not a bad argument.)
_CONNECTION_LOST: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,  # ConnectionDoesNotExistError, ConnectionFailureError, ...
    asyncpg.AdminShutdownError,  # pg_terminate_backend, fast shutdown
    asyncpg.CrashShutdownError,
    ConnectionError,  # reset, refused, broken pipe
)
# Statements cached before a schema change: asyncpg drops its caches; retry once.
_STALE_STATEMENT: tuple[type[BaseException], ...] = (
    asyncpg.InvalidCachedStatementError,
    asyncpg.OutdatedSchemaCacheError,
)
# Everything the driver raises, wrapped as StorageError.  UnicodeError: a string the
# server encoding cannot hold.
_DRIVER_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
    UnicodeError,
    *_STALE_STATEMENT,
)

# The table is missing or older than this code: migrate() fixes it.
_SCHEMA_OUT_OF_DATE: tuple[type[BaseException], ...] = (
    asyncpg.UndefinedTableError,
    asyncpg.UndefinedColumnError,
    asyncpg.InvalidColumnReferenceError,  # ON CONFLICT (event_id) without its unique index
)

_COLUMNS = {
    "id": "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    "ts": "timestamptz(3) NOT NULL",
    "sasl_username": "text NOT NULL DEFAULT ''",
    "sender": "text",
    "client_address": "text",
    "recipient_count": "integer",
    "action": "varchar(16) NOT NULL DEFAULT 'DUNNO'",
    "event_id": "char(32)",
    "queue_id": "text",
    "origin": "text",
}
_TEXT_COLUMNS = ("sasl_username", "sender", "client_address")


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def _ms(moment: datetime) -> datetime:
    """UTC, truncated to the millisecond (what timestamptz(3) keeps, without rounding up)."""
    moment = utc(moment)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def _as_utc(moment: datetime) -> datetime:
    # timestamptz comes back aware; an un-migrated go-policyd `timestamp` holds UTC.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _is_closed(connection: Any) -> bool:
    try:
        return bool(connection.is_closed())
    except asyncpg.InterfaceError:
        # The pool detached it already ("released back to the pool"): it is gone.
        return True


def _rows_affected(status: str) -> int:
    # asyncpg returns the command tag, e.g. "DELETE 25".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


def _check_no_nul(what: str, value: str) -> None:
    if "\x00" in value:
        raise StorageError(f"postgresql: {what} contains a NUL byte, which PostgreSQL text cannot store")


class _QuietPoolFloor(logging.Filter):
    """asyncpg's pool reconnects in the background to keep its one idle connection, and
    logs a warning with a traceback each time that fails.  During an outage the daemon
    already logs the incident (once, then a reminder a minute); drop the duplicates."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to restore the pool connection floor")


_POOL_LOGGER = logging.getLogger("asyncpg.pool")
if not any(isinstance(existing, _QuietPoolFloor) for existing in _POOL_LOGGER.filters):
    _POOL_LOGGER.addFilter(_QuietPoolFloor())


async def _keep_session(connection: Any) -> None:
    """Pool reset hook: asyncpg always rolls back an open transaction; we set nothing
    else (no SET, LISTEN, cursors or session locks), so skip its reset query and save a
    round trip per operation."""


@dataclass(frozen=True, slots=True)
class _Plan:
    """What migrate() would do: descriptions, and the statements that do it."""

    steps: list[str]
    statements: list[str]


class PostgreSQLStorage(Storage):
    dialect = schema.POSTGRESQL

    def __init__(
        self,
        *,
        host: str | None,
        port: int,
        user: str | None,
        password: str | None,
        database: str,
        table: str = "events",
        ssl: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
    ) -> None:
        super().__init__(table)
        if len(table) > PG_MAX_IDENTIFIER:
            raise ValueError(f"table name {table!r} is longer than PostgreSQL's {PG_MAX_IDENTIFIER}")
        # An unquoted name in SQL is folded to lower case: do the same, so `table=Events`
        # finds the table that `CREATE TABLE Events` made.
        self.relname = table.lower()
        self.host = host
        self.port = port
        self.user = user
        self.password = password
        self.database = database
        self.ssl = ssl
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self._pool: Any = None
        self._t = _quote(self.relname)

    # -- URL, description ---------------------------------------------------

    @classmethod
    def from_url(cls, url: str, table: str) -> PostgreSQLStorage:
        scheme, _, rest = url.partition("://")
        base, _, driver = scheme.lower().partition("+")
        if not rest or base not in {"postgresql", "postgres"} or driver not in {"", "asyncpg"}:
            raise ValueError("not a postgresql:// URL (want postgresql://user:password@host:port/dbname)")
        parts = urlsplit("postgresql://" + rest)
        if parts.fragment:
            raise ValueError("postgresql:// URL must not have a #fragment")
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ValueError("postgresql:// URL has an invalid port") from None
        database = unquote(parts.path.lstrip("/"))
        if not database or "/" in database:
            raise ValueError(
                "postgresql:// URL without a database name (want postgresql://user:pw@host/dbname)"
            )
        ssl = None
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key == "sslmode" and value in SSL_MODES:
                ssl = value
            elif key == "sslmode":
                raise ValueError(f"postgresql:// URL: sslmode must be one of {', '.join(sorted(SSL_MODES))}")
            else:
                raise ValueError(f"postgresql:// URL: unsupported parameter {key!r} (only sslmode)")
        return cls(
            host=unquote(parts.hostname) if parts.hostname else None,
            port=port,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            database=database,
            table=table,
            ssl=ssl,
        )

    @property
    def description(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = self.host or "(default host)"
        if ":" in host:
            host = f"[{host}]"
        return f"postgresql://{user}{host}:{self.port}/{self.database} table {self.relname}"

    def backup_command(self) -> str:
        where = [f"-h {shlex.quote(self.host)}"] if self.host else []
        where += [f"-p {self.port}"] + ([f"-U {shlex.quote(self.user)}"] if self.user else [])
        return (
            f"pg_dump {' '.join(where)} -t {shlex.quote(self.relname)} {shlex.quote(self.database)} "
            f"> {shlex.quote(self.relname + '-before-migrate.sql')}"
        )

    def _error(self, what: str, error: BaseException, *, connecting: bool = False) -> StorageError:
        if isinstance(error, TimeoutError):
            reason = "no answer in time"
        else:
            reason = str(error).strip() or type(error).__name__
        if connecting:
            reason = f"cannot connect: {reason}"
        if isinstance(error, _SCHEMA_OUT_OF_DATE):
            reason += " (is the schema up to date? run: policyd migrate)"
        if self.password and len(self.password) >= 4:
            reason = reason.replace(self.password, "***")
        where = f"{self.host or 'localhost'}:{self.port}/{self.database}"
        message = f"postgresql {where}: {what}: {reason}"
        if isinstance(error, _SCHEMA_OUT_OF_DATE):
            return SchemaMissing(message)
        return StorageError(message, hint=self._hint(error))

    def _hint(self, error: BaseException) -> str | None:
        """What to do about an error that will not pass by itself; None for the others."""
        if isinstance(error, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError):
            return (
                f"the server refused user {self.user!r} with this password: check `database`, "
                "and pg_hba.conf for this host"
            )
        if isinstance(error, asyncpg.InvalidCatalogNameError):
            return f"the database does not exist: createdb -O {self.user} {self.database}"
        if isinstance(error, asyncpg.InsufficientPrivilegeError):
            return (
                f"the user lacks a privilege: GRANT CREATE, USAGE ON SCHEMA public TO {self.user}; "
                f"GRANT SELECT, INSERT, DELETE ON {self.table} TO {self.user} (or make it the owner)"
            )
        return None

    # -- connections ---------------------------------------------------------

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                host=self.host,
                port=self.port,
                user=self.user,
                password=self.password,
                database=self.database,
                ssl=self.ssl,
                min_size=POOL_MIN_SIZE,
                max_size=POOL_MAX_SIZE,
                timeout=self.connect_timeout,
                command_timeout=self.command_timeout,
                server_settings={"application_name": APPLICATION_NAME, "timezone": "UTC"},
                reset=_keep_session,
            )
        except _DRIVER_ERRORS as error:
            raise self._error("opening", error, connecting=True) from error

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT)
        except Exception:  # a dead server or a stuck connection: just drop them
            pool.terminate()

    async def _run(
        self,
        what: str,
        operation: Callable[[Any], Awaitable[T]],
    ) -> T:
        """Run `operation` on a pooled connection; once more on a new one if it was dead."""
        pool = self._pool
        if pool is None:
            raise StorageError("postgresql: storage is not open")
        for attempt in (1, 2):
            try:
                connection = await pool.acquire(timeout=self.command_timeout)
            except _DRIVER_ERRORS as error:
                # Could not connect at all: retrying at once would only double the wait.
                raise self._error(what, error, connecting=True) from error
            try:
                return await operation(connection)
            except _DRIVER_ERRORS as error:
                lost = isinstance(error, _CONNECTION_LOST) or (
                    isinstance(error, (asyncpg.InterfaceError, asyncpg.InternalClientError))
                    and _is_closed(connection)
                )
                if attempt == 2 or not (lost or isinstance(error, _STALE_STATEMENT)):
                    if isinstance(error, TimeoutError):
                        # No answer: do not trust this connection again (a silently
                        # dead peer would otherwise time out every request that gets it).
                        connection.terminate()
                    raise self._error(what, error) from error
                if lost:
                    # debug: the daemon logs the outage itself, once, if the retry fails too.
                    log.debug(
                        "%s: connection lost while %s (%s); retrying on a new connection",
                        self.description,
                        what,
                        self._error(what, error),
                    )
                    # After a server restart every pooled connection is dead: replace them all.
                    await pool.expire_connections()
            finally:
                try:
                    await pool.release(connection)
                except Exception:  # the pool has discarded it; a new one comes next time
                    pass
        raise AssertionError("unreachable")  # pragma: no cover

    # -- schema ----------------------------------------------------------------

    def _index_name(self, suffix: str) -> str:
        name = f"{self.relname}_{suffix}"
        if len(name) <= PG_MAX_IDENTIFIER:
            return name
        digest = hashlib.md5(self.relname.encode(), usedforsecurity=False).hexdigest()[:8]
        keep = PG_MAX_IDENTIFIER - len(suffix) - len(digest) - 2
        return f"{self.relname[:keep]}_{digest}_{suffix}"

    def _wanted_indexes(self) -> dict[str, str]:
        t = self._t
        user_ts = self._index_name("user_ts")
        user_md5_ts = self._index_name("user_md5_ts")
        ts = self._index_name("ts")
        event_id = self._index_name("event_id")
        return {
            user_ts: f"CREATE INDEX {_quote(user_ts)} ON {t} (sasl_username, ts) "
            f"INCLUDE (recipient_count, action) WHERE length(sasl_username) <= {SHORT_NAME_CHARS}",
            user_md5_ts: f"CREATE INDEX {_quote(user_md5_ts)} ON {t} (md5(sasl_username), ts) "
            f"WHERE length(sasl_username) > {SHORT_NAME_CHARS}",
            ts: f"CREATE INDEX {_quote(ts)} ON {t} (ts)",
            event_id: f"CREATE UNIQUE INDEX {_quote(event_id)} ON {t} (event_id)",
        }

    async def _plan(self, connection: Any, timeout: float | None = None) -> _Plan:
        columns = {
            row["column_name"]: row
            for row in await connection.fetch(
                "SELECT column_name, data_type, datetime_precision, is_nullable, column_default "
                "FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = $1",
                self.relname,
                timeout=timeout,
            )
        }
        steps: list[str] = []
        before: list[str] = []  # statements run before the ALTER TABLE
        clauses: list[str] = []  # one ALTER TABLE: a single rewrite of a big table
        t = self._t
        if not columns:
            definition = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items())
            steps.append(f"create table {self.relname}")
            before.append(f"CREATE TABLE {t} ({definition})")
            existing_indexes: set[str] = set()
        else:
            existing_indexes = {
                row["indexname"]
                for row in await connection.fetch(
                    "SELECT indexname FROM pg_indexes WHERE schemaname = current_schema() AND tablename = $1",
                    self.relname,
                    timeout=timeout,
                )
            }
            primary = await connection.fetchrow(
                "SELECT c.conname, array_agg(a.attname::text ORDER BY k.ord) AS columns "
                "FROM pg_constraint c "
                "CROSS JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord) "
                "JOIN pg_attribute a ON a.attrelid = c.conrelid AND a.attnum = k.attnum "
                "WHERE c.contype = 'p' AND c.conrelid = "
                "(quote_ident(current_schema()) || '.' || quote_ident($1))::regclass "
                "GROUP BY c.conname",
                self.relname,
                timeout=timeout,
            )
            steps_clauses = self._column_changes(columns, primary)
            for step, clause in steps_clauses:
                steps.append(step)
                if clause.startswith("UPDATE "):
                    before.append(clause)
                else:
                    clauses.append(clause)
        after = [
            statement for name, statement in self._wanted_indexes().items() if name not in existing_indexes
        ]
        steps += [f"create index {name}" for name in self._wanted_indexes() if name not in existing_indexes]
        statements = before + ([f"ALTER TABLE {t} " + ", ".join(clauses)] if clauses else []) + after
        if clauses:
            # Rewritten columns lose their statistics: give the planner fresh ones now.
            steps.append(f"analyze {self.relname}")
            statements.append(f"ANALYZE {t}")
        existing_tables = {
            str(row[0])
            for row in await connection.fetch(schema.EXISTING_TABLES_SQL[schema.POSTGRESQL], timeout=timeout)
        }
        for step, statement in schema.missing_tables(self.relname, existing_tables, schema.POSTGRESQL):
            steps.append(step)
            statements.append(statement)
        return _Plan(steps, statements)

    def _column_changes(self, columns: dict[str, Any], primary: Any) -> list[tuple[str, str]]:
        """(step, ALTER TABLE clause or UPDATE statement) to bring existing columns in line."""
        t = self._t
        changes: list[tuple[str, str]] = []
        ts = columns.get("ts")
        if ts is None:
            changes.append(("add column ts", "ADD COLUMN ts timestamptz(3) NOT NULL DEFAULT now()"))
        elif ts["data_type"] == "timestamp without time zone":
            # go-policyd wrote UTC wall-clock times: read them as UTC, whatever the
            # server's or the session's TimeZone.
            changes.append(
                (
                    "convert ts to timestamptz(3), reading the old values as UTC",
                    "ALTER COLUMN ts TYPE timestamptz(3) USING (ts AT TIME ZONE 'UTC')",
                )
            )
        elif ts["data_type"] != "timestamp with time zone":
            raise StorageError(
                f"postgresql: column {self.relname}.ts has type {ts['data_type']}; "
                "cannot convert it to timestamptz automatically"
            )
        elif ts["datetime_precision"] != 3:
            changes.append(("change ts to millisecond precision", "ALTER COLUMN ts TYPE timestamptz(3)"))
        for name in _TEXT_COLUMNS:
            column = columns.get(name)
            if column is None:
                changes.append((f"add column {name}", f"ADD COLUMN {name} {_COLUMNS[name]}"))
                continue
            if column["data_type"] == "character":
                # char(n) pads with spaces: the padding is not part of the value.
                changes.append(
                    (
                        f"widen {name} from char to text, trimming the padding",
                        f"ALTER COLUMN {name} TYPE text USING rtrim({name}::text, ' ')",
                    )
                )
            elif column["data_type"] != "text":
                changes.append(
                    (
                        f"widen {name} from {column['data_type']} to text",
                        f"ALTER COLUMN {name} TYPE text USING {name}::text",
                    )
                )
        username = columns.get("sasl_username")
        if username is not None:
            if username["is_nullable"] == "YES":
                changes.append(
                    (
                        "replace NULL sasl_username by ''",
                        f"UPDATE {t} SET sasl_username = '' WHERE sasl_username IS NULL",
                    )
                )
                changes.append(("make sasl_username NOT NULL", "ALTER COLUMN sasl_username SET NOT NULL"))
            if username["column_default"] is None:
                changes.append(
                    ("give sasl_username the default ''", "ALTER COLUMN sasl_username SET DEFAULT ''")
                )
        for name in ("recipient_count", "action", "event_id", "queue_id", "origin"):
            if name not in columns:
                changes.append((f"add column {name}", f"ADD COLUMN {name} {_COLUMNS[name]}"))
        primary_columns = list(primary["columns"]) if primary is not None else []
        if primary_columns != ["id"]:
            if primary is not None:
                changes.append(
                    (
                        f"drop primary key {primary['conname']} ({', '.join(primary_columns)})",
                        f"DROP CONSTRAINT {_quote(primary['conname'])}",
                    )
                )
            if "id" not in columns:
                changes.append(("add column id (identity, primary key)", f"ADD COLUMN id {_COLUMNS['id']}"))
            else:
                changes.append(("make id the primary key", "ADD PRIMARY KEY (id)"))
        return changes

    async def pending_migrations(self) -> list[str]:
        async def plan(connection: Any) -> list[str]:
            return (await self._plan(connection)).steps

        return await self._run("reading the schema", plan)

    async def migrate(self) -> list[str]:
        # Two daemons starting at once: the second waits for the first, then finds
        # nothing left to do.  All steps in one transaction: all or nothing.
        lock_key = int.from_bytes(
            hashlib.sha256(f"policyd migrate {self.relname}".encode()).digest()[:8], "big", signed=True
        )

        async def migrate(connection: Any) -> list[str]:
            async with connection.transaction():
                await connection.execute(
                    "SELECT pg_advisory_xact_lock($1)", lock_key, timeout=MIGRATE_TIMEOUT
                )
                plan = await self._plan(connection, timeout=MIGRATE_TIMEOUT)
                for statement in plan.statements:
                    await connection.execute(statement, timeout=MIGRATE_TIMEOUT)
            return plan.steps

        steps = await self._run("migrating the schema", migrate)
        if steps and self._pool is not None:
            # Statements prepared against the old shape: start afresh.
            await self._pool.expire_connections()
        return steps

    # -- events -----------------------------------------------------------------

    def _sum_sql(self) -> str:
        """The per-request sum: one branch per username index, only one of them runs."""
        t = self._t
        n = SHORT_NAME_CHARS
        return (
            "SELECT COALESCE(SUM(part), 0)::bigint FROM ("
            f"SELECT SUM(recipient_count) AS part FROM {t} "
            f"WHERE length($1::text) <= {n} AND sasl_username = $1::text AND length(sasl_username) <= {n} "
            "AND ts >= $2::timestamptz AND action = ANY($3::text[]) "
            "UNION ALL "
            f"SELECT SUM(recipient_count) FROM {t} "
            f"WHERE length($1::text) > {n} AND md5(sasl_username) = md5($1::text) "
            f"AND sasl_username = $1::text AND length(sasl_username) > {n} "
            "AND ts >= $2::timestamptz AND action = ANY($3::text[])"
            ") AS parts"
        )

    async def recipients_since(self, sasl_username: str, since: datetime, outcomes: Sequence[Outcome]) -> int:
        _check_no_nul("sasl_username", sasl_username)
        since = _ms(since)
        actions = [str(outcome) for outcome in outcomes]
        sql = self._sum_sql()
        # A go-policyd table not migrated yet has no `action`: all its rows were let through.
        legacy_sql = (
            f"SELECT COALESCE(SUM(recipient_count), 0)::bigint FROM {self._t} "
            "WHERE sasl_username = $1 AND ts >= $2::timestamptz"
        )

        async def total(connection: Any) -> int:
            try:
                value = await connection.fetchval(sql, sasl_username, since, actions)
            except asyncpg.UndefinedColumnError:
                if Outcome.DUNNO not in outcomes:
                    return 0
                value = await connection.fetchval(legacy_sql, sasl_username, since)
            return int(value or 0)

        return await self._run("summing recipients", total)

    async def add_events(self, events: Sequence[Event], origin: str | None = None) -> None:
        if not events:
            return
        columns: tuple[list[Any], ...] = tuple([] for _ in range(EVENT_VALUES))
        for event in events:
            row = event_row(event, _ms, origin)
            _check_no_nul("sasl_username", event.sasl_username)
            _check_no_nul("sender", event.sender)
            _check_no_nul("client_address", event.client_address)
            _check_no_nul("queue_id", event.queue_id)
            for column, value in zip(columns, row, strict=True):
                column.append(value)
        # One statement, so one transaction, whatever the number of rows.
        sql = (
            f"INSERT INTO {self._t} ({EVENT_COLUMNS}) "
            "SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[], "
            "$5::integer[], $6::text[], $7::text[], $8::text[], $9::text[]) "
            "ON CONFLICT (event_id) DO NOTHING"
        )

        async def insert(connection: Any) -> None:
            await connection.execute(sql, *columns)

        await self._run("recording events", insert)

    async def max_event_id(self) -> int:
        async def top(connection: Any) -> int:
            try:
                return int(await connection.fetchval(f"SELECT COALESCE(MAX(id), 0) FROM {self._t}"))
            except asyncpg.UndefinedColumnError:
                return 0  # a go-policyd table not migrated yet has no ids: nothing to tail

        return await self._run("reading the last event id", top)

    async def load_window(
        self, since: datetime, up_to_id: int, exclude_origin: str | None, before: datetime | None = None
    ) -> list[UserHistory]:
        since = _ms(since)
        until = _ms(before) if before is not None else None
        ms = "(extract(epoch FROM ts) * 1000)::bigint"
        sql = (
            # No ORDER BY in the aggregates: each would sort on its own, and two events of
            # one millisecond could then pair up wrongly (Window.load sorts).
            f"SELECT sasl_username, array_agg({ms}), array_agg(COALESCE(recipient_count, 0)), "
            f"array_agg({OUTCOME_CODE_SQL}) "
            f"FROM {self._t} WHERE ts >= $1::timestamptz AND id <= $2 "
            "AND ($3::text IS NULL OR origin IS DISTINCT FROM $3) "
            "AND ($4::timestamptz IS NULL OR ts < $4::timestamptz) GROUP BY sasl_username"
        )
        legacy_sql = (
            f"SELECT rtrim(sasl_username::text, ' '), array_agg({ms}), "
            "array_agg(COALESCE(recipient_count, 0)), array_agg(0) "
            f"FROM {self._t} WHERE ts >= $1::timestamptz AND ($2::timestamptz IS NULL OR ts < $2::timestamptz) "
            "GROUP BY 1"
        )

        async def load(connection: Any) -> list[Any]:
            try:
                rows: list[Any] = await connection.fetch(
                    sql, since, up_to_id, exclude_origin, until, timeout=LOAD_TIMEOUT
                )
            except asyncpg.UndefinedColumnError:
                rows = await connection.fetch(legacy_sql, since, until, timeout=LOAD_TIMEOUT)
            return rows

        rows = await self._run("loading the window", load)
        return [
            UserHistory(str(user), list(times), list(counts), list(codes))
            for user, times, counts, codes in rows
        ]

    async def tail(self, after_id: int, exclude_origin: str, limit: int) -> Tail:
        sql = (
            f"SELECT id, sasl_username, (extract(epoch FROM ts) * 1000)::bigint, "
            f"COALESCE(recipient_count, 0), {OUTCOME_CODE_SQL}, COALESCE(origin, '') "
            f"FROM {self._t} WHERE id > $1 AND origin IS DISTINCT FROM $2 ORDER BY id LIMIT $3"
        )

        async def read(connection: Any) -> Tail:
            try:
                # One snapshot: the highest id and the rows agree.
                async with connection.transaction(isolation="repeatable_read", readonly=True):
                    rows = await connection.fetch(sql, after_id, exclude_origin, limit)
                    top = await connection.fetchval(f"SELECT COALESCE(MAX(id), 0) FROM {self._t}")
            except asyncpg.UndefinedColumnError:
                return Tail([], 0)
            return Tail(
                [TailRow(int(a), str(b), int(c), int(d), int(e), str(f)) for a, b, c, d, e, f in rows],
                int(top),
            )

        return await self._run("reading new events", read)

    async def tail_summary(self, after_id: int, up_to_id: int, exclude_origin: str) -> tuple[int, int]:
        sql = (
            f"SELECT COUNT(*), COALESCE(SUM(id), 0) FROM {self._t} "
            "WHERE id > $1 AND id <= $2 AND origin IS DISTINCT FROM $3"
        )

        async def read(connection: Any) -> tuple[int, int]:
            try:
                count, total = await connection.fetchrow(sql, after_id, up_to_id, exclude_origin)
            except asyncpg.UndefinedColumnError:
                return 0, 0
            return int(count), int(total)

        return await self._run("reading new events", read)

    async def existing_event_ids(self, event_ids: Sequence[str], exclude_origin: str) -> set[str]:
        sql = (
            f"SELECT event_id FROM {self._t} WHERE event_id = ANY($1::text[]) AND origin IS DISTINCT FROM $2"
        )

        async def find(connection: Any) -> set[str]:
            try:
                rows = await connection.fetch(sql, list(event_ids), exclude_origin)
            except asyncpg.UndefinedColumnError:
                return set()
            return {str(row[0]).strip() for row in rows}

        return await self._run("looking up event ids", find)

    async def queue_ids(self, sasl_username: str, since: datetime) -> set[str]:
        sql = (
            f"SELECT DISTINCT queue_id FROM {self._t} WHERE sasl_username = $1 AND ts >= $2::timestamptz "
            "AND queue_id IS NOT NULL AND queue_id <> ''"
        )

        async def read(connection: Any) -> set[str]:
            try:
                rows = await connection.fetch(sql, sasl_username, _ms(since))
            except asyncpg.UndefinedColumnError:
                return set()  # go-policyd's table, not migrated: none recorded
            return {str(row[0]) for row in rows}

        return await self._run("reading queue ids", read)

    async def top_senders(
        self,
        since: datetime,
        limit: int,
        user: str | None = None,
        counted: Sequence[Outcome] = (Outcome.DUNNO, Outcome.HOLD),
    ) -> list[SenderStats]:
        since = _ms(since)
        if user is not None:
            _check_no_nul("sasl_username", user)
        sql = (
            "SELECT sasl_username, COALESCE(SUM(recipient_count), 0)::bigint, COUNT(*), "
            "COUNT(*) FILTER (WHERE action = 'HOLD'), COUNT(*) FILTER (WHERE action = 'REJECT'), MAX(ts), "
            "COALESCE(SUM(recipient_count) FILTER (WHERE action = ANY($3::text[])), 0)::bigint, "
            "COUNT(DISTINCT client_address) "
            f"FROM {self._t} WHERE ts >= $1::timestamptz AND ($4::text IS NULL OR sasl_username = $4) "
            "GROUP BY sasl_username "
            'ORDER BY 7 DESC, 2 DESC, sasl_username COLLATE "C" LIMIT $2'
        )
        legacy_sql = (
            "SELECT rtrim(sasl_username::text, ' '), COALESCE(SUM(recipient_count), 0)::bigint, COUNT(*), "
            "0, 0, MAX(ts), "
            "CASE WHEN 'DUNNO' = ANY($3::text[]) THEN COALESCE(SUM(recipient_count), 0) ELSE 0 END::bigint, "
            "COUNT(DISTINCT client_address) "
            f"FROM {self._t} WHERE ts >= $1::timestamptz "
            "AND ($4::text IS NULL OR rtrim(sasl_username::text, ' ') = $4) GROUP BY 1 "
            "ORDER BY 7 DESC, 2 DESC, rtrim(sasl_username::text, ' ') COLLATE \"C\" LIMIT $2"
        )
        actions = [str(outcome) for outcome in counted]

        async def top(connection: Any) -> list[Any]:
            try:
                rows: list[Any] = await connection.fetch(sql, since, limit, actions, user)
            except asyncpg.UndefinedColumnError:
                rows = await connection.fetch(legacy_sql, since, limit, actions, user)
            return rows

        rows = await self._run("listing top senders", top)
        return [
            SenderStats(
                str(name),
                int(recipients),
                int(messages),
                int(held),
                int(rejected),
                _as_utc(last),
                int(counted_sum),
                int(addresses),
            )
            for name, recipients, messages, held, rejected, last, counted_sum, addresses in rows
        ]

    async def user_events(self, sasl_username: str, since: datetime, limit: int) -> list[Event]:
        since = _ms(since)
        sql = (
            "SELECT ts, sender, client_address, recipient_count, action, event_id, queue_id "
            f"FROM {self._t} WHERE sasl_username = $1 AND ts >= $2::timestamptz "
            "ORDER BY ts DESC, id DESC LIMIT $3"
        )
        # go-policyd's table: char columns padded with spaces, no action, event or queue id.
        legacy_sql = (
            "SELECT ts, rtrim(sender::text, ' '), rtrim(client_address::text, ' '), "
            "COALESCE(recipient_count, 0), 'DUNNO', '', '' "
            f"FROM {self._t} WHERE rtrim(sasl_username::text, ' ') = $1 AND ts >= $2::timestamptz "
            "ORDER BY ts DESC LIMIT $3"
        )

        async def read(connection: Any) -> list[Any]:
            try:
                rows: list[Any] = await connection.fetch(sql, sasl_username, since, limit)
            except asyncpg.UndefinedColumnError:
                rows = await connection.fetch(legacy_sql, sasl_username, since, limit)
            return rows

        rows = await self._run("reading a user's events", read)
        return [
            Event(
                _as_utc(ts),
                sasl_username,
                str(sender or ""),
                str(client or ""),
                int(count or 0),
                outcome_of_stored(action),
                str(event_id or "").strip(),
                str(queue_id or ""),
            )
            for ts, sender, client, count, action, event_id, queue_id in rows
        ]

    async def purge(self, before: datetime, batch_rows: int = PURGE_BATCH_ROWS) -> int:
        before = _ms(before)
        # Each batch is its own statement, so its own short transaction: daemons
        # inserting meanwhile never wait.  `ctid = ANY(ARRAY(...))` is a TID scan.
        sql = (
            f"DELETE FROM {self._t} WHERE ctid = ANY(ARRAY("
            f"SELECT ctid FROM {self._t} WHERE ts < $1::timestamptz LIMIT $2))"
        )

        async def delete_batch(connection: Any) -> int:
            return _rows_affected(await connection.execute(sql, before, batch_rows))

        deleted = 0
        while True:
            count = await self._run("purging old events", delete_batch)
            deleted += count
            if count < batch_rows:
                return deleted

    async def probe_write(self) -> None:
        class _RolledBack(Exception):
            pass

        async def probe(connection: Any) -> None:
            try:
                async with connection.transaction():
                    await connection.execute(
                        f"INSERT INTO {self._t} (ts, sasl_username, sender, client_address, recipient_count) "
                        "VALUES (now(), 'policyd-probe', '', '', 0)"
                    )
                    raise _RolledBack
            except _RolledBack:
                pass

        await self._run("writing a test row (rolled back)", probe)

    async def count_events(self, before: datetime | None = None) -> int:
        async def count(connection: Any) -> int:
            if before is None:
                return int(await connection.fetchval(f"SELECT COUNT(*) FROM {self._t}"))
            sql = f"SELECT COUNT(*) FROM {self._t} WHERE ts < $1::timestamptz"
            return int(await connection.fetchval(sql, _ms(before)))

        return await self._run("counting events", count)

    async def _rules_fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        rendered = schema.placeholders(sql, schema.POSTGRESQL)

        async def read(connection: Any) -> list[tuple[Any, ...]]:
            return [tuple(row) for row in await connection.fetch(rendered, *params)]

        return await self._run("reading rules", read)

    async def _rules_execute(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        for _, params in statements:
            for value in params:
                if isinstance(value, str):
                    _check_no_nul("a rule", value)

        async def run(connection: Any) -> list[int]:
            counts = []
            async with connection.transaction():
                for sql, params in statements:
                    status = await connection.execute(schema.placeholders(sql, schema.POSTGRESQL), *params)
                    counts.append(_rows_affected(status))
            return counts

        return await self._run("changing rules", run)
