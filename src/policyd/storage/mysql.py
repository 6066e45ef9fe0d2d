"""MariaDB / MySQL backend (aiomysql): MariaDB >= 10.3 and MySQL >= 8.0.13.

``mysql://user:password@host:3306/dbname`` (or ``mariadb://``); user and password are
URL-decoded, the port defaults to 3306; ``?unix_socket=/run/mysqld/mysqld.sock`` connects
over a unix socket instead of TCP and ``?charset=utf8mb4`` is accepted (utf8mb4 is the
only charset that holds every name, so it is the only one allowed).  Several hosts,
libpq style: ``mysql://user:password@db1:3306,db2:3306,db3:3306/dbname`` (a Galera
cluster's nodes), see "Several hosts" below.

One clock: UTC
--------------
Every session runs ``SET time_zone = '+00:00'``.  ``ts`` is a DATETIME(3) holding UTC;
the 24h window is computed by the daemon from its own clock (the ``since`` passed in,
timezone-aware, converted to UTC here) and compared with ``ts`` as is.  Neither the
server's time zone nor the relays' matter, so relays in different time zones share one
table and a DST change neither doubles nor drops an hour of the window.  Timestamps are
cut to the millisecond in Python (as the SQLite backend does), so MariaDB (which
truncates extra digits) and MySQL (which rounds them) store the same value.

Connections and reconnecting
----------------------------
A small aiomysql pool (1 to 4 connections, 3 s connect timeout) in autocommit mode:
each read is one statement with nothing to commit, so no pooled connection ever holds a
REPEATABLE READ snapshot from an earlier request (which would freeze the sums it reads);
writes that take several statements run between an explicit BEGIN and COMMIT.  Every
session also sets a strict ``sql_mode`` (``STRICT_ALL_TABLES``): a value that does not
fit is an error, never silently truncated.

A connection that failed in any way is closed, never handed out again.  A "connection is
broken" error (2006 gone away, 2013 lost, 1927 killed, 1053 shutdown, 4031 idle timeout,
1047 Galera node not ready, socket errors) also retires every pooled connection opened
before it: after a server restart or a failover to another Galera node behind the same
address they are all stale, and the next call opens a fresh one.  A call that failed
that way on a connection it had already got is retried once on a fresh connection when
that is safe: reads, purge batches, and add_events (idempotent on event_id, so a batch
whose COMMIT may or may not have landed is simply written again).  Deadlocks and Galera
certification failures (1213) are retried up to 3 times.  migrate() is never retried.  If the server is
down the call fails at once (connection refused) or after the 3 s connect timeout, as a
StorageError; nothing needs restarting when it comes back.

Several hosts
-------------
The nodes are tried in order, each with a pool of its own, opened when first used.  A
node that cannot be connected to (refused, the 3 s connect timeout), whose connection
broke, or that is not ready (1047: a Galera node out of the primary component) makes the
call go on with the next node at once, within the caller's bound; a write that may or
may not have committed on the node that failed is written again (idempotent).  While on
a later node, a background check every PREFERRED_NODE_RETRY_SECONDS goes back to the
first earlier node that takes a connection and, on Galera, is Synced in a primary
component.  One warning line per change of node.

On a Galera node each session sets ``wsrep_sync_wait = 1``: its reads wait until the
node has applied what the cluster committed before them, so a read on one node sees a
commit acknowledged on another (the cross-relay bound).  Certification conflicts (1213)
are retried up to CONFLICT_RETRIES times.  A write's ``ON DUPLICATE KEY UPDATE`` absorbs
only its own event_id: when the cluster changes size, Galera changes each node's
auto_increment offset, and an id handed out locally may collide with another node's row
being applied; that insert fails (and is retried) instead of updating the other row.

Schema (created or upgraded in place by migrate())
----------------------------------------------------
::

    id              BIGINT UNSIGNED AUTO_INCREMENT PRIMARY KEY
    ts              DATETIME(3) NOT NULL DEFAULT (UTC_TIMESTAMP(3))         -- UTC
    sasl_username   TEXT utf8mb4_bin NOT NULL                               -- verbatim
    sender          TEXT utf8mb4_bin NOT NULL
    client_address  TEXT utf8mb4_bin NOT NULL
    recipient_count INT NOT NULL DEFAULT 0
    action          VARCHAR(16) NOT NULL DEFAULT 'DUNNO'                    -- DUNNO/HOLD/REJECT
    event_id        CHAR(32) ascii NULL, UNIQUE                              -- idempotent writes
    user_key        VARCHAR(250) AS (sasl_username if <= 200 characters, else its first
                    180 characters + '#' + SHA-256 hex) STORED
    INDEX user_ts (user_key, ts, action, recipient_count)                   -- covers the sum
    INDEX ts (ts)                                                           -- purge, top

Names of any length are stored verbatim in TEXT columns (the policy protocol caps a
line at 16 KiB, TEXT holds 64 KiB; anything longer is refused, not cut).  TEXT cannot be
indexed whole, so the sum goes through ``user_key``: the name itself for every real
name, a collision-free digest for absurdly long ones.  The per-request sum is then one
range scan of ``user_ts`` that never touches the table rows.  utf8mb4_bin compares
names exactly (the daemon lowercases SASL names before they get here).

Drop-in on a go-policyd table
-----------------------------
go-policyd's table (``ts`` TIMESTAMP or DATETIME, char(8)/char(80) latin1 columns, a
primary key on (ts, sasl_username, sender[, client_address]), no action column) is used
as it is from the first request: open() notices the missing ``action`` column and reads
with queries that count every old row as DUNNO (a NULL recipient_count as 0).  A
TIMESTAMP ``ts`` already reads as UTC in our sessions; a DATETIME ``ts`` holds the
server's local time (go-policyd wrote NOW() in a session of the server's default time
zone), so the window bounds are converted with ``CONVERT_TZ(?, '+00:00',
@@global.time_zone)``.  add_events() refuses to write into such a table (it cannot
record what it needs to) until ``policyd migrate`` has run; the daemon migrates at start.

migrate() upgrades the table in place, keeping every row:

1. only if ``ts`` is a DATETIME (local time): ``ALTER TABLE .. MODIFY ts TIMESTAMP(3)``
   run with the session time zone set to ``@@global.time_zone``.  The server converts
   each value from that zone to UTC itself, with the same rules (DST included) it used
   when go-policyd wrote NOW(); an ambiguous local hour at the autumn change is resolved
   the server's way.  Being a change of type, the step cannot be applied twice.
2. only if ``recipient_count`` is nullable: ``UPDATE .. SET recipient_count = 0 WHERE
   recipient_count IS NULL`` (strict mode would refuse NOT NULL otherwise).
3. one ``ALTER TABLE`` (one table rebuild) that adds ``id`` as the new primary key in
   place of go-policyd's composite key (which refused two messages of a user in the same
   millisecond), turns ``ts`` into DATETIME(3) (UTC: converted from TIMESTAMP in our
   +00:00 session) without go-policyd's ON UPDATE clause, widens the three text columns
   to TEXT utf8mb4, makes recipient_count NOT NULL DEFAULT 0, adds ``action`` (existing
   rows get 'DUNNO'), ``event_id`` and ``user_key``, the three indexes, utf8mb4 as the
   table default and, when needed, InnoDB and ROW_FORMAT=DYNAMIC.

Every step is planned from information_schema, so migrate() is idempotent and
``pending_migrations()`` lists exactly what it would do.  A named lock (GET_LOCK) keeps
two processes from migrating at once; on Galera it holds on one node only, so migrate()
runs one statement at a time, and one that collides with the same change made meanwhile
by another node (1050 table exists, 1060 duplicate column, ...) plans the rest again.
On Galera the ALTER runs in total order isolation (every node waits for it): migrate a
big table at a quiet time.

go-policyd after the migration: it can still write.  Its INSERT
(``INSERT INTO events SET sasl_username=?, sender=?, client_address=?,
recipient_count=?``) names none of the new columns: ``id`` is generated, ``action``
defaults to 'DUNNO', ``event_id`` to NULL, ``user_key`` is computed, and ``ts`` defaults
to UTC_TIMESTAMP(3), which is UTC whatever go-policyd's session time zone, so the row
counts correctly for policyd.  go-policyd's own sum (``ts > DATE_SUB(CURRENT_TIMESTAMP(3),
INTERVAL 1 DAY)``) compares with its session's local time: exact when the server runs in
UTC, otherwise its window is off by the UTC offset until it is retired.  Versions of
go-policyd that wrote ``ts=now()`` explicitly write local time and should be stopped
before migrating on a server that is not in UTC.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import random
import re
import shlex
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import aiomysql
from pymysql.converters import escape_string

from policyd.logs import log
from policyd.quota import Outcome
from policyd.storage import schema
from policyd.storage.base import (
    EVENT_COLUMNS,
    EVENT_ID_CHUNK,
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
    split_numbers,
    utc_text,
)

T = TypeVar("T")

DEFAULT_PORT = 3306
POOL_MIN = 1
POOL_MAX = 4
CONNECT_TIMEOUT_SECONDS = 3.0
# Backstop for one operation (reads, a write batch, a purge batch) when the caller sets
# no tighter bound (the daemon does: db_timeout).  migrate() has none: an ALTER of a big
# table may take minutes.
OPERATION_TIMEOUT_SECONDS = 30.0
# Connections idle longer than this are replaced rather than trusted (firewalls and
# proxies drop idle connections silently; the server's wait_timeout is 8 h by default).
POOL_RECYCLE_SECONDS = 600
# A multi-row INSERT at most this long (max_allowed_packet is 16M by default).
MAX_STATEMENT_BYTES = 1_000_000
# How long migrate() waits for another process that is migrating the same table.
MIGRATE_LOCK_SECONDS = 60
# How many times migrate() plans again after colliding with another process's change.
MIGRATE_COLLISIONS = 5
# With several nodes in the URL: while on a later node, how often an earlier one is
# tried again (in the background; it is used again once it answers, Synced on Galera).
PREFERRED_NODE_RETRY_SECONDS = 5.0
# With several nodes, one operation's bound (not migrate() nor the load at start): a
# node that takes longer has stopped answering, and the next call goes to the next node.
NODE_TIMEOUT_SECONDS = 10.0
# A deadlock or a Galera certification conflict (1213): retried this many times, after
# a pause of CONFLICT_PAUSE_SECONDS times the attempt number.
CONFLICT_RETRIES = 3
CONFLICT_PAUSE_SECONDS = 0.01

SESSION_SQL = "SET time_zone = '+00:00', sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'"

# user_key: the name itself when it is at most USER_KEY_VERBATIM characters, else its
# first USER_KEY_PREFIX characters + '#' + 64 hex digits of SHA-256 (245 characters: no
# verbatim name is that long, so the two kinds never collide).
USER_KEY_VERBATIM = 200
USER_KEY_PREFIX = 180
# Rows per fetch of the window load (one row per user).
LOAD_FETCH_ROWS = 1000
# A big table's window is loaded by this many queries at once, each over its own range of
# user_key: the server scans the index on as many cores (10 M rows: ready in about half
# the time on 2 cores).  The ranges are cut at user_keys of rows picked at random.
LOAD_PARTS = 2
LOAD_PARTS_FROM_ROWS = 500_000
LOAD_SAMPLE_ROWS = 300
USER_KEY_LENGTH = 250
# Stored as the column comment: a different definition one day means a different comment,
# which migrate() notices.
USER_KEY_COMMENT = (
    f"policyd v1: sasl_username if <= {USER_KEY_VERBATIM} chars, "
    f"else first {USER_KEY_PREFIX} + # + sha256 hex"
)

_EVENT_ID_LENGTH = 32

_TEXT = "TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL"

# MySQL error codes that mean the connection is unusable (client 2xxx and server ones).
_BROKEN_CONNECTION_CODES = frozenset(
    {
        1047,  # WSREP has not yet prepared node for application use (Galera)
        1053,  # server shutdown in progress
        1927,  # connection was killed (MariaDB)
        2006,  # MySQL server has gone away
        2013,  # lost connection to MySQL server during query
        2055,  # lost connection to MySQL server at '...'
        4031,  # disconnected by the server because of inactivity (MySQL 8)
    }
)
_RETRYABLE_CODES = frozenset({1213})  # deadlock; Galera reports certification failures so
_SCHEMA_CHANGED_CODES = frozenset({1054, 1146})  # unknown column, no such table
_CANNOT_CONNECT_CODES = frozenset({2002, 2003, 2005})
# The table, or a column of it, is missing: 1146 no such table, 1054 unknown column.
_MISSING_SCHEMA_CODES = frozenset({1146, 1054})
# What a schema change gets when another process made the same change just before it.
_CONCURRENT_DDL_CODES = frozenset(
    {
        1050,  # table already exists
        1060,  # duplicate column name
        1061,  # duplicate key name
        1068,  # multiple primary key defined
        1091,  # can't drop: it does not exist
        1213,  # deadlock (a Galera conflict with the other node's statement)
    }
)


class _RowCollision(Exception):
    """An INSERT hit another event's row (not a duplicate of its own event_id)."""


def _user_key_sql(operand: str) -> str:
    """user_key of `operand` (a column or a placeholder): one definition for the column
    and for the queries, so the two always agree."""
    return (
        f"IF(CHAR_LENGTH({operand}) <= {USER_KEY_VERBATIM}, {operand}, "
        f"CONCAT(LEFT({operand}, {USER_KEY_PREFIX}), '#', SHA2({operand}, 256)))"
    )


@dataclass(frozen=True, slots=True)
class _Column:
    """A wanted column, and how information_schema shows it when it is right."""

    name: str
    definition: str
    data_type: str
    nullable: bool | None = False  # None: not checked (generated columns)
    charset: str | None = None
    collation: str | None = None
    length: int | None = None  # CHARACTER_MAXIMUM_LENGTH
    precision: int | None = None  # DATETIME_PRECISION
    default: str | None = None  # normalised (see _normal_default)
    unsigned: bool = False
    extra_needs: tuple[str, ...] = ()
    extra_forbids: tuple[str, ...] = ()
    comment: str = ""


_COLUMNS: tuple[_Column, ...] = (
    _Column(
        "id",
        "BIGINT UNSIGNED NOT NULL AUTO_INCREMENT",
        "bigint",
        unsigned=True,
        extra_needs=("auto_increment",),
    ),
    _Column(
        "ts",
        "DATETIME(3) NOT NULL DEFAULT (UTC_TIMESTAMP(3))",
        "datetime",
        precision=3,
        default="utc_timestamp(3)",
        extra_forbids=("on update",),
    ),
    _Column("sasl_username", _TEXT, "text", charset="utf8mb4", collation="utf8mb4_bin"),
    _Column("sender", _TEXT, "text", charset="utf8mb4", collation="utf8mb4_bin"),
    _Column("client_address", _TEXT, "text", charset="utf8mb4", collation="utf8mb4_bin"),
    _Column("recipient_count", "INT NOT NULL DEFAULT 0", "int", default="0"),
    _Column(
        "action",
        "VARCHAR(16) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL DEFAULT 'DUNNO'",
        "varchar",
        charset="utf8mb4",
        collation="utf8mb4_bin",
        length=16,
        default="dunno",
    ),
    _Column(
        "event_id",
        "CHAR(32) CHARACTER SET ascii COLLATE ascii_bin NULL DEFAULT NULL",
        "char",
        nullable=True,
        charset="ascii",
        collation="ascii_bin",
        length=32,
    ),
    _Column(
        "user_key",
        f"VARCHAR({USER_KEY_LENGTH}) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin "
        f"AS ({_user_key_sql('`sasl_username`')}) STORED COMMENT '{USER_KEY_COMMENT}'",
        "varchar",
        nullable=None,
        charset="utf8mb4",
        collation="utf8mb4_bin",
        length=USER_KEY_LENGTH,
        extra_needs=("generated",),
        comment=USER_KEY_COMMENT,
    ),
    _Column(
        "queue_id",
        "VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL DEFAULT NULL",
        "varchar",
        nullable=True,
        charset="ascii",
        collation="ascii_bin",
        length=64,
    ),
    _Column(
        "origin",
        "VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin NULL DEFAULT NULL",
        "varchar",
        nullable=True,
        charset="ascii",
        collation="ascii_bin",
        length=64,
    ),
)
_TEXT_COLUMNS = frozenset(column.name for column in _COLUMNS if column.data_type == "text")

_PRIMARY_KEY = ("id",)
# name -> (unique, columns)
_INDEXES: dict[str, tuple[bool, tuple[str, ...]]] = {
    "event_id": (True, ("event_id",)),
    "user_ts": (False, ("user_key", "ts", "action", "recipient_count")),
    "ts": (False, ("ts",)),
}
_TABLE_COLLATION = "utf8mb4_bin"
_GOOD_ROW_FORMATS = frozenset({"dynamic", "compressed"})


def _q(name: str) -> str:
    return f"`{name}`"


def _text(value: Any) -> str:
    """information_schema values come back as bytes on some servers."""
    if value is None:
        return ""
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _normal_default(value: Any) -> str | None:
    """COLUMN_DEFAULT as MariaDB ('DUNNO', utc_timestamp(3), NULL) or MySQL (DUNNO,
    utc_timestamp(3), None) shows it, reduced to one spelling."""
    if value is None:
        return None
    text = _text(value).strip()
    if text.upper() == "NULL":
        return None
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].lower()
    return re.sub(r"[\s`]", "", text).lower()  # an expression: spacing and quoting vary


def _sql_literal(value: object) -> str:
    """A value of an event row as SQL text (str, int or None only)."""
    if value is None:
        return "NULL"
    if type(value) is int:
        return str(value)
    escaped: str = escape_string(str(value))
    return "'" + escaped + "'"


format_ts = utc_text  # UTC, cut to the millisecond: what DATETIME(3) holds, on MariaDB and MySQL alike


def _as_utc(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return datetime.strptime(_text(value)[:23].ljust(23, "0"), "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)


def _int(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, Decimal | int | float):
        return int(value)
    return int(_text(value))


@dataclass(frozen=True, slots=True)
class _ColumnInfo:
    data_type: str
    column_type: str
    charset: str
    collation: str
    nullable: bool
    default: str | None
    extra: str
    precision: int | None
    length: int | None
    comment: str


@dataclass(frozen=True, slots=True)
class _Layout:
    """What the table looks like, as far as the queries care."""

    columns: dict[str, _ColumnInfo] = field(default_factory=dict)

    @property
    def exists(self) -> bool:
        return bool(self.columns)

    @property
    def go_policyd(self) -> bool:
        """go-policyd's table, not migrated yet: no action column."""
        return self.exists and "action" not in self.columns

    @property
    def local_ts(self) -> bool:
        """ts holds the server's local time (go-policyd's DATETIME), not UTC."""
        ts = self.columns.get("ts")
        return self.go_policyd and ts is not None and ts.data_type == "datetime"

    @property
    def has_user_key(self) -> bool:
        return "user_key" in self.columns or not self.exists


@dataclass(frozen=True, slots=True)
class _Step:
    descriptions: list[str]
    statement: str
    # Session time zone to run the statement in (None: ours, +00:00).
    time_zone: str | None = None


def _parse_port(text: str, host: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"bad mysql:// URL: port of {host or 'the host'} must be a number from 1 to 65535")
    return int(text)


def _parse_hosts(hostlist: str) -> list[tuple[str, int]]:
    """``host[:port]`` pairs separated by commas (libpq's multi-host form); IPv6
    addresses in brackets.  An empty list for no host at all (a unix socket URL)."""
    if not hostlist:
        return []
    nodes: list[tuple[str, int]] = []
    for item in hostlist.split(","):
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ValueError("bad mysql:// URL: an IPv6 address goes in brackets, as [::1]:3306")
            port_text = rest[1:] if rest else ""
        else:
            host, colon, port_text = item.partition(":")
            if colon and not port_text:
                raise ValueError(f"bad mysql:// URL: {host or 'a host'} has an empty port")
        if not host:
            raise ValueError("bad mysql:// URL: an empty host in the list (want host1:3306,host2:3306)")
        if any(char in host for char in "@/?# "):
            raise ValueError("bad mysql:// URL: a host name with a character not allowed in one")
        nodes.append((host.lower(), _parse_port(port_text, host) if port_text else DEFAULT_PORT))
    return nodes


def _parse_url(url: str) -> dict[str, Any]:
    """The connection settings of a mysql:// URL (never echoes the URL: it has a password)."""
    scheme, _, _ = url.partition("://")
    if scheme.split("+", 1)[0].lower() not in {"mysql", "mariadb"}:
        raise ValueError("not a mysql:// or mariadb:// URL")
    try:
        parts = urlsplit(url)
    except ValueError as error:
        raise ValueError(f"bad mysql:// URL: {error}") from None
    query = parse_qs(parts.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - {"unix_socket", "charset"})
    if unknown:
        raise ValueError(f"mysql:// URL: unknown option {unknown[0]!r} (known: unix_socket, charset)")
    for name, values in query.items():
        if len(values) != 1 or not values[0]:
            raise ValueError(f"mysql:// URL: option {name!r} needs exactly one value")
    unix_socket = query.get("unix_socket", [None])[0]
    charset = query.get("charset", ["utf8mb4"])[0] or "utf8mb4"
    if charset.lower() != "utf8mb4":
        raise ValueError(
            f"mysql:// URL: charset must be utf8mb4 (the only one that holds every name), not {charset!r}"
        )
    if parts.fragment:
        raise ValueError("mysql:// URL: unexpected #fragment")
    # Not parts.hostname/port: they do not know several hosts.
    _, _, hostlist = parts.netloc.rpartition("@")
    nodes = _parse_hosts(hostlist)
    if not nodes and not unix_socket:
        raise ValueError("mysql:// URL without a host (want mysql://user:password@host:3306/dbname)")
    if unix_socket is not None and not unix_socket.startswith("/"):
        raise ValueError("mysql:// URL: unix_socket must be an absolute path")
    if unix_socket is not None and len(nodes) > 1:
        raise ValueError("mysql:// URL: unix_socket goes with one host, not a list of them")
    database = unquote(parts.path[1:] if parts.path.startswith("/") else parts.path)
    if not database or "/" in database:
        raise ValueError("mysql:// URL without a database name (want mysql://user:password@host:3306/dbname)")
    if len(database) > 64 or "`" in database or "\x00" in database:
        raise ValueError("mysql:// URL: database name must be at most 64 characters, without backquotes")
    # No user: the driver logs in as the OS user, as the mysql client does (go-policyd
    # files without dbuser become such URLs).
    user = unquote(parts.username) if parts.username is not None else ""
    password = unquote(parts.password) if parts.password is not None else ""
    return {
        "nodes": nodes or [("localhost", DEFAULT_PORT)],
        "user": user,
        "password": password,
        "database": database,
        "unix_socket": unix_socket,
        "scheme": scheme.lower(),
    }


def _node_text(node: tuple[str, int]) -> str:
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MySQLStorage(Storage):
    dialect = schema.MYSQL

    def __init__(
        self,
        *,
        nodes: Sequence[tuple[str, int]] = (("localhost", DEFAULT_PORT),),
        user: str,
        password: str,
        database: str,
        unix_socket: str | None = None,
        table: str = "events",
        scheme: str = "mysql",
    ) -> None:
        super().__init__(table)
        if not nodes:
            raise ValueError("no database host")
        # The servers in order of preference (a Galera cluster's nodes): the first that
        # answers is used; see _acquire and _prefer_earlier_node.
        self.nodes: tuple[tuple[str, int], ...] = tuple(nodes)
        self.node = 0  # index of the node in use
        self.user = user
        self._password = password
        self.database = database
        self.unix_socket = unix_socket
        self.scheme = scheme
        self._pools: dict[int, Any] = {}  # node index -> aiomysql pool, opened on first use
        self._open = False
        self._slots = asyncio.Semaphore(POOL_MAX)
        self._pool_lock = asyncio.Lock()
        self._layout: _Layout | None = None
        # Loop time of the last "connection is broken" error: pooled connections opened
        # before it are not trusted any more.
        self._broken_at = float("-inf")
        # Nodes known to run Galera (reads there wait for the cluster: wsrep_sync_wait).
        self._galera: dict[int, bool] = {}
        self._prepared: weakref.WeakSet[Any] = weakref.WeakSet()  # sessions set up for their node
        self._working = 0  # the node that last gave a connection
        self._failure = ""  # why it is not used any more
        self._all_failed = False  # the last attempt found no node answering
        self._prober: asyncio.Task[None] | None = None
        self._next_probe = 0.0
        self._closing: set[asyncio.Task[None]] = set()
        # Calls that failed on a stale connection and were retried on a fresh one.
        self.retries = 0
        # Times the node in use changed (to the next after a failure, back to an earlier one).
        self.failovers = 0

    @classmethod
    def from_url(cls, url: str, table: str) -> MySQLStorage:
        return cls(table=table, **_parse_url(url))

    @property
    def host(self) -> str:
        """The host of the node in use."""
        return self.nodes[self.node][0]

    @property
    def port(self) -> int:
        return self.nodes[self.node][1]

    @property
    def description(self) -> str:
        where = ",".join(map(_node_text, self.nodes)) if self.unix_socket is None else "localhost"
        socket = f"?unix_socket={self.unix_socket}" if self.unix_socket else ""
        user = f"{self.user}@" if self.user else ""
        return f"{self.scheme}://{user}{where}/{self.database}{socket} table {self.table}"

    def backup_command(self) -> str:
        where = (
            [f"--socket={shlex.quote(self.unix_socket)}"]
            if self.unix_socket
            else [f"-h {shlex.quote(self.host)}", f"-P {self.port}"]
        )
        where += [f"-u {shlex.quote(self.user)} -p"] if self.user else []
        return (
            f"mysqldump --single-transaction {' '.join(where)} {shlex.quote(self.database)} "
            f"{shlex.quote(self.table)} > {shlex.quote(self.table + '-before-migrate.sql')}"
        )

    @property
    def _where(self) -> str:
        nodes = self.nodes if self._all_failed else self.nodes[self.node : self.node + 1]
        where = self.unix_socket or ",".join(map(_node_text, nodes))
        return f"mysql {where}/{self.database}"

    # ------------------------------------------------------------------
    # connections

    def _settings(self, index: int) -> dict[str, Any]:
        settings: dict[str, Any] = {
            "user": self.user or None,
            "password": self._password,
            "db": self.database,
            "charset": "utf8mb4",
            "autocommit": True,
            "connect_timeout": CONNECT_TIMEOUT_SECONDS,
            "init_command": SESSION_SQL,
        }
        if self.unix_socket:
            settings["unix_socket"] = self.unix_socket
        else:
            settings["host"], settings["port"] = self.nodes[index]
        return settings

    async def _pool_of(self, index: int) -> Any:
        pool = self._pools.get(index)
        if pool is not None:
            return pool
        async with self._pool_lock:  # one pool per node, however many callers want it
            pool = self._pools.get(index)
            if pool is not None:
                return pool
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
            # cancellation that arrives as the awaited thing finishes.
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS * 2):
                pool = await aiomysql.create_pool(
                    minsize=POOL_MIN,
                    maxsize=POOL_MAX,
                    pool_recycle=POOL_RECYCLE_SECONDS,
                    **self._settings(index),
                )
            if not self._open:  # closed meanwhile
                pool.terminate()
                raise StorageError(f"{self._where}: storage is not open")
            self._pools[index] = pool
        return pool

    async def open(self) -> None:
        if self._open:
            return
        self._open = True
        try:
            try:
                async with self._connection():
                    pass
            except (asyncio.CancelledError, StorageError):
                raise
            except Exception as error:
                raise self._error("connecting", error) from error
            self._layout = await self._run("reading the schema", self._read_layout, retry_safe=True)
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        self._open = False
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(BaseException):
                await prober
        pools, self._pools = list(self._pools.values()), {}
        await asyncio.gather(*(self._close_pool(pool) for pool in pools), *self._closing)

    @staticmethod
    async def _close_pool(pool: Any) -> None:
        try:
            # Say goodbye to idle connections (COM_QUIT), so the server logs no aborted ones.
            async with asyncio.timeout(2):
                await pool.clear()
        except Exception:
            pass
        pool.close()
        try:
            async with asyncio.timeout(5):
                await pool.wait_closed()
        except Exception:
            pool.terminate()

    def _retire_pool(self, index: int) -> None:
        """Stop using node `index`'s pool; its connections in use close when released."""
        pool = self._pools.pop(index, None)
        if pool is not None:
            task = asyncio.get_running_loop().create_task(self._close_pool(pool))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _use_node(self, index: int) -> None:
        if index == self.node:
            return
        self._retire_pool(self.node)
        self.node = index
        self.failovers += 1

    def _node_failed(self, index: int, error: BaseException) -> None:
        """Node `index` failed (cannot connect, connection broken, not ready): go on with
        the next one in the list, if there is another and it is still the one in use."""
        if len(self.nodes) > 1 and index == self.node:
            if index == self._working:
                self._failure = f"failed ({self._error_detail(error)})"
            log.debug("%s: %s", self._where, self._error_detail(error))
            self._use_node((index + 1) % len(self.nodes))

    def _node_works(self, index: int) -> None:
        """Node `index` gave a connection: say so once, if it is not the one that did before."""
        self._all_failed = False
        previous, self._working = self._working, index
        if previous != index and len(self.nodes) > 1:
            # One line per change of node, not one per failed attempt: while every node
            # is down, the daemon's outage says so instead.
            log.warning(
                "mysql %s/%s: %s; now using %s",
                _node_text(self.nodes[previous]),
                self.database,
                self._failure,
                _node_text(self.nodes[index]),
            )

    async def _acquire(self) -> tuple[int, Any, Any]:
        """A connection: (node index, its pool, the connection).  With several nodes,
        each is tried once, from the one in use on, before giving up."""
        if not self._open:
            raise StorageError(f"{self._where}: storage is not open")
        self._maybe_probe()
        failure: BaseException | None = None
        for _ in range(len(self.nodes)):
            index = self.node
            try:
                pool = await self._pool_of(index)
                conn = await self._acquire_from(pool)
                await self._prepare(index, conn, pool)
            except (asyncio.CancelledError, StorageError):
                raise
            except Exception as error:
                if len(self.nodes) == 1 or not (isinstance(error, TimeoutError) or self._is_broken(error)):
                    raise
                self._node_failed(index, error)
                failure = error
                continue
            self._node_works(index)
            return index, pool, conn
        assert failure is not None
        self._all_failed = True  # named all in the error
        raise failure  # every node failed: the last one's error

    async def _acquire_from(self, pool: Any) -> Any:
        while True:
            async with asyncio.timeout(
                CONNECT_TIMEOUT_SECONDS + 2
            ):  # the handshake has no timeout of its own
                conn = await pool.acquire()
            connected_at = getattr(conn, "connected_time", None)
            if connected_at is None or connected_at > self._broken_at:
                return conn
            # Opened before a connection broke: after a restart or failover it is stale.
            conn.close()
            await pool.release(conn)

    async def _prepare(self, index: int, conn: Any, pool: Any) -> None:
        """Once per session: on a Galera node, make its reads wait until the node has
        applied what the cluster committed before them (wsrep_sync_wait = 1), so that a
        read after another node's commit sees it (the bound of docs/shared-database.md)."""
        if conn in self._prepared:
            return
        try:
            async with conn.cursor() as cursor:
                if index not in self._galera:
                    try:
                        await cursor.execute("SELECT @@wsrep_on")
                        row = await cursor.fetchone()
                        self._galera[index] = bool(row and _int(row[0]))
                    except aiomysql.Error as error:
                        if self._code(error) != 1193:  # unknown system variable: not MariaDB
                            raise
                        self._galera[index] = False
                if self._galera[index]:
                    await cursor.execute("SET SESSION wsrep_sync_wait = 1")
        except BaseException:
            conn.close()
            await pool.release(conn)
            raise
        self._prepared.add(conn)

    def _maybe_probe(self) -> None:
        """While not on the first node, look every PREFERRED_NODE_RETRY_SECONDS (in the
        background) whether an earlier node in the list is back."""
        if self.node == 0 or self._prober is not None:
            return
        loop = asyncio.get_running_loop()
        if loop.time() < self._next_probe:
            return
        self._next_probe = loop.time() + PREFERRED_NODE_RETRY_SECONDS
        self._prober = loop.create_task(self._prefer_earlier_node())

    async def _prefer_earlier_node(self) -> None:
        try:
            for index in range(self.node):
                if await self._node_is_ready(index):
                    if self._open and index < self.node:
                        self._failure = f"{_node_text(self.nodes[index])} is back"
                        self._use_node(index)
                    return
        finally:
            self._prober = None

    async def _node_is_ready(self, index: int) -> bool:
        """Whether node `index` takes connections and, if it runs Galera, is Synced
        with a primary component (a node still catching up after a restart is not)."""
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS + 2):
                conn = await aiomysql.connect(**self._settings(index))
        except Exception:
            return False
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS), conn.cursor() as cursor:
                try:
                    await cursor.execute("SELECT @@wsrep_on")
                except aiomysql.Error as error:
                    return self._code(error) == 1193  # not MariaDB: no more to check
                row = await cursor.fetchone()
                if not (row and _int(row[0])):
                    return True
                await cursor.execute(
                    "SHOW GLOBAL STATUS WHERE Variable_name IN "
                    "('wsrep_ready', 'wsrep_local_state', 'wsrep_cluster_status')"
                )
                status = {_text(name).lower(): _text(value) for name, value in await cursor.fetchall()}
            return (
                status.get("wsrep_ready", "").upper() == "ON"
                and status.get("wsrep_local_state") == "4"  # Synced
                and status.get("wsrep_cluster_status", "").lower() == "primary"
            )
        except Exception:
            return False
        finally:
            conn.close()

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[tuple[int, Any]]:
        async with self._slots:  # never more waiters than connections: no waiting in the pool
            index, pool, conn = await self._acquire()
            healthy = False
            try:
                yield index, conn
                healthy = True
            finally:
                if not healthy:
                    conn.close()  # in an unknown state (error, cancelled mid-query): never reuse
                await pool.release(conn)

    @staticmethod
    def _code(error: BaseException) -> int | None:
        if isinstance(error, aiomysql.Error) and error.args and isinstance(error.args[0], int):
            code: int = error.args[0]
            return code
        return None

    def _is_broken(self, error: BaseException) -> bool:
        if isinstance(error, TimeoutError):
            return False  # slow, not necessarily broken; retrying would double the wait
        if isinstance(error, aiomysql.InterfaceError | OSError | EOFError | ConnectionError):
            return True
        code = self._code(error)
        return code in _BROKEN_CONNECTION_CODES or code in _CANNOT_CONNECT_CODES

    def _error_detail(self, error: BaseException) -> str:
        code = self._code(error)
        if isinstance(error, TimeoutError):
            return "no answer in time"
        if code is not None and len(error.args) > 1:
            return f"({code}) {error.args[1]}"
        return str(error) or type(error).__name__

    def _error(self, what: str, error: BaseException) -> StorageError:
        detail = self._error_detail(error)
        code = self._code(error)
        if code in _MISSING_SCHEMA_CODES:
            return SchemaMissing(f"{self._where}: {what}: {detail} (run `policyd migrate` to create it)")
        return StorageError(f"{self._where}: {what}: {detail}", hint=self._hint(code))

    def _hint(self, code: int | None) -> str | None:
        """What to do about an error that will not pass by itself; None for the others."""
        grant = (
            f"GRANT SELECT, INSERT, DELETE, CREATE, ALTER, INDEX ON `{self.database}`.* "
            f"TO '{self.user}'@'<this host>'"
        )
        if code == 1045:
            return (
                f"the server refused user {self.user!r} with this password: check `database` "
                "(or dbuser/dbpass), and that the user may connect from this host"
            )
        if code == 1049:
            return f"the database does not exist: CREATE DATABASE `{self.database}`; then {grant}"
        if code == 1044:
            return (
                f"user {self.user!r} may not use database {self.database!r}, or it does not exist: "
                f"CREATE DATABASE IF NOT EXISTS `{self.database}`; {grant}"
            )
        if code in {1142, 1143}:
            return f"the user lacks a privilege: {grant}"
        return None

    async def _run(
        self,
        what: str,
        operation: Callable[[Any], Awaitable[T]],
        *,
        retry_safe: bool,
        timeout: float | None = OPERATION_TIMEOUT_SECONDS,
    ) -> T:
        """Run `operation` on a pooled connection; errors become StorageError.

        When `retry_safe`: retried once on a fresh connection (on the next node, when
        there are several) after a broken connection or a table changed under us, and up
        to CONFLICT_RETRIES times after a deadlock or a Galera certification conflict.
        """
        loop = asyncio.get_running_loop()
        if timeout is not None and len(self.nodes) > 1:
            timeout = min(timeout, NODE_TIMEOUT_SECONDS)
        attempt = 0
        while True:
            attempt += 1
            got_connection = False
            index = self.node
            try:
                async with asyncio.timeout(timeout):
                    async with self._connection() as (index, conn):
                        got_connection = True
                        return await operation(conn)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if isinstance(error, StorageError):
                    raise
                broken = self._is_broken(error)
                code = self._code(error)
                if broken:
                    self._broken_at = loop.time()
                    if got_connection:
                        self._node_failed(index, error)
                elif isinstance(error, TimeoutError) and got_connection:
                    # A node that stopped answering (a host gone silent: no reset, no
                    # refusal): the next call tries the next node.  Not retried here:
                    # the time is spent.
                    self._node_failed(index, error)
                if code in _SCHEMA_CHANGED_CODES:
                    self._layout = None  # read it again: someone migrated or dropped the table
                conflict = (code in _RETRYABLE_CODES or isinstance(error, _RowCollision)) and (
                    attempt <= CONFLICT_RETRIES
                )
                retry = (
                    retry_safe
                    and got_connection
                    and (conflict or (attempt == 1 and (broken or code in _SCHEMA_CHANGED_CODES)))
                )
                if not retry:
                    raise self._error(what, error) from error
                self.retries += 1
                # debug: the daemon logs the outage itself, once, if the retry fails too.
                log.debug("%s: %s failed (%s); retrying on a fresh connection", self._where, what, error)
                if conflict:
                    # Another transaction won (a deadlock, or on Galera another node's
                    # write certified first): a short pause, growing, then again.
                    await asyncio.sleep(CONFLICT_PAUSE_SECONDS * attempt)

    # ------------------------------------------------------------------
    # schema

    async def _read_layout(self, conn: Any) -> _Layout:
        async with conn.cursor() as cursor:
            await cursor.execute(
                "SELECT COLUMN_NAME, DATA_TYPE, COLUMN_TYPE, CHARACTER_SET_NAME, COLLATION_NAME, "
                "IS_NULLABLE, COLUMN_DEFAULT, EXTRA, DATETIME_PRECISION, CHARACTER_MAXIMUM_LENGTH, "
                "COLUMN_COMMENT FROM information_schema.COLUMNS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
                (self.table,),
            )
            rows = await cursor.fetchall()
        columns = {
            _text(name).lower(): _ColumnInfo(
                data_type=_text(data_type).lower(),
                column_type=_text(column_type).lower(),
                charset=_text(charset).lower(),
                collation=_text(collation).lower(),
                nullable=_text(nullable).upper() == "YES",
                default=_normal_default(default),
                extra=_text(extra).lower(),
                precision=None if precision is None else int(precision),
                length=None if length is None else int(length),
                comment=_text(comment),
            )
            for name, data_type, column_type, charset, collation, nullable, default, extra, precision, length, comment in rows
        }
        return _Layout(columns)

    async def _layout_of(self, conn: Any) -> _Layout:
        if self._layout is None:
            self._layout = await self._read_layout(conn)
        return self._layout

    @staticmethod
    def _column_is_right(wanted: _Column, have: _ColumnInfo) -> bool:
        checks = [
            have.data_type == wanted.data_type,
            wanted.nullable is None or have.nullable == wanted.nullable,
            wanted.charset is None or have.charset == wanted.charset,
            wanted.collation is None or have.collation == wanted.collation,
            wanted.length is None or have.length == wanted.length,
            wanted.precision is None or have.precision == wanted.precision,
            have.default == wanted.default,
            wanted.unsigned == ("unsigned" in have.column_type),
            all(word in have.extra for word in wanted.extra_needs),
            not any(word in have.extra for word in wanted.extra_forbids),
            have.comment == wanted.comment,
        ]
        return all(checks)

    def _create_statement(self) -> str:
        lines = [f"  {_q(column.name)} {column.definition}" for column in _COLUMNS]
        lines.append(f"  PRIMARY KEY ({', '.join(map(_q, _PRIMARY_KEY))})")
        for name, (unique, columns) in _INDEXES.items():
            kind = "UNIQUE KEY" if unique else "KEY"
            lines.append(f"  {kind} {_q(name)} ({', '.join(map(_q, columns))})")
        body = ",\n".join(lines)
        return (
            # Not IF NOT EXISTS: a table made meanwhile by another process (a daemon on
            # another Galera node) is error 1050, and migrate() plans again.
            f"CREATE TABLE {_q(self.table)} (\n{body}\n) "
            f"ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE={_TABLE_COLLATION} ROW_FORMAT=DYNAMIC"
        )

    async def _plan(self, conn: Any) -> list[_Step]:
        """The events table's steps, then the rules tables' (storage/schema.py)."""
        steps = await self._plan_events(conn)
        async with conn.cursor() as cursor:
            await cursor.execute(schema.EXISTING_TABLES_SQL[schema.MYSQL])
            existing = {_text(row[0]) for row in await cursor.fetchall()}
        steps += [
            _Step([step], statement)
            for step, statement in schema.missing_tables(self.table, existing, schema.MYSQL)
        ]
        return steps

    async def _plan_events(self, conn: Any) -> list[_Step]:
        layout = await self._read_layout(conn)
        self._layout = layout
        table = self.table
        if not layout.exists:
            return [_Step([f"create table {table}"], self._create_statement())]
        steps: list[_Step] = []
        columns = layout.columns

        if layout.local_ts:
            async with conn.cursor() as cursor:
                await cursor.execute("SELECT @@global.time_zone, @@system_time_zone")
                global_zone, system_zone = (_text(value) for value in (await cursor.fetchone() or ("", "")))
            zone = f"{global_zone} ({system_zone})" if global_zone.upper() == "SYSTEM" else global_zone
            steps.append(
                _Step(
                    [f"convert {table}.ts from the server's local time ({zone}) to UTC"],
                    f"ALTER TABLE {_q(table)} MODIFY COLUMN {_q('ts')} TIMESTAMP(3) NOT NULL "
                    "DEFAULT CURRENT_TIMESTAMP(3)",
                    time_zone=global_zone or "SYSTEM",
                )
            )
        count = columns.get("recipient_count")
        if count is not None and count.nullable:
            # "ts = ts": go-policyd's ts is ON UPDATE CURRENT_TIMESTAMP; assigning it
            # explicitly keeps the server from stamping the updated rows with "now".
            keep_ts = f", {_q('ts')} = {_q('ts')}" if "ts" in columns else ""
            steps.append(
                _Step(
                    [f"set NULL {table}.recipient_count to 0"],
                    f"UPDATE {_q(table)} SET {_q('recipient_count')} = 0{keep_ts} "
                    f"WHERE {_q('recipient_count')} IS NULL",
                )
            )

        clauses: list[str] = []
        descriptions: list[str] = []
        for column in _COLUMNS:
            have = columns.get(column.name)
            if have is None:
                position = " FIRST" if column.name == "id" else ""
                clauses.append(f"ADD COLUMN {_q(column.name)} {column.definition}{position}")
                descriptions.append(f"add column {table}.{column.name}")
            elif not self._column_is_right(column, have):
                clauses.append(f"MODIFY COLUMN {_q(column.name)} {column.definition}")
                wanted = column.definition.split(" AS (", 1)[0]
                descriptions.append(f"change column {table}.{column.name}: {have.column_type} -> {wanted}")

        async with conn.cursor() as cursor:
            await cursor.execute(
                "SELECT INDEX_NAME, NON_UNIQUE, COLUMN_NAME, SUB_PART FROM information_schema.STATISTICS "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s ORDER BY INDEX_NAME, SEQ_IN_INDEX",
                (table,),
            )
            index_rows = await cursor.fetchall()
            await cursor.execute(
                "SELECT ENGINE, TABLE_COLLATION, ROW_FORMAT FROM information_schema.TABLES "
                "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
                (table,),
            )
            table_row = await cursor.fetchone() or ("", "", "")
        # name -> (unique, columns, any of them a prefix)
        found: dict[str, tuple[bool, list[str], list[bool]]] = {}
        for index_name, non_unique, column_name, sub_part in index_rows:
            unique, index_columns, prefixes = found.setdefault(
                _text(index_name), (not int(non_unique), [], [])
            )
            index_columns.append(_text(column_name).lower())
            prefixes.append(sub_part is not None)
        indexes = {
            name: (unique, tuple(index_columns), any(prefixes))
            for name, (unique, index_columns, prefixes) in found.items()
        }

        primary = indexes.pop("PRIMARY", None)
        if primary != (True, _PRIMARY_KEY, False):
            if primary is not None:
                clauses.append("DROP PRIMARY KEY")
            clauses.append(f"ADD PRIMARY KEY ({', '.join(map(_q, _PRIMARY_KEY))})")
            old = f" in place of ({', '.join(primary[1])})" if primary is not None else ""
            descriptions.append(f"make ({', '.join(_PRIMARY_KEY)}) the primary key of {table}{old}")
        for name, (_, names, prefixed) in indexes.items():
            if name not in _INDEXES and not prefixed and _TEXT_COLUMNS.intersection(names):
                # An index of the admin's on a column that becomes TEXT: MySQL cannot keep it.
                clauses.append(f"DROP INDEX {_q(name)}")
                descriptions.append(f"drop index {table}.{name} ({', '.join(names)}): TEXT columns")
        for name, (unique, wanted_columns) in _INDEXES.items():
            have_index = indexes.get(name)
            if have_index == (unique, wanted_columns, False):
                continue
            if have_index is not None:
                clauses.append(f"DROP INDEX {_q(name)}")
            kind = "UNIQUE INDEX" if unique else "INDEX"
            clauses.append(f"ADD {kind} {_q(name)} ({', '.join(map(_q, wanted_columns))})")
            descriptions.append(
                f"add {'unique ' if unique else ''}index {table}.{name} ({', '.join(wanted_columns)})"
            )

        engine, collation, row_format = (_text(value) for value in table_row)
        if engine.lower() != "innodb":
            clauses.append("ENGINE=InnoDB")
            descriptions.append(f"convert {table} from {engine or '?'} to InnoDB")
        if row_format.lower() not in _GOOD_ROW_FORMATS:
            clauses.append("ROW_FORMAT=DYNAMIC")
            descriptions.append(
                f"change the row format of {table}: {row_format or '?'} -> Dynamic (long index keys)"
            )
        if collation.lower() != _TABLE_COLLATION:
            clauses.append(f"DEFAULT CHARACTER SET utf8mb4 COLLATE {_TABLE_COLLATION}")
            descriptions.append(
                f"change the default character set of {table}: {collation or '?'} -> {_TABLE_COLLATION}"
            )

        if clauses:
            steps.append(_Step(descriptions, f"ALTER TABLE {_q(table)}\n  " + ",\n  ".join(clauses)))
        return steps

    async def pending_migrations(self) -> list[str]:
        steps = await self._run("reading the schema", self._plan, retry_safe=True)
        return [description for step in steps for description in step.descriptions]

    async def _check_server_version(self, conn: Any) -> None:
        async with conn.cursor() as cursor:
            await cursor.execute("SELECT VERSION()")
            row = await cursor.fetchone()
        version = _text(row[0] if row else "")
        numbers = tuple(int(part) for part in re.findall(r"\d+", version.split("-", 1)[0])[:3])
        mariadb = "mariadb" in version.lower()
        needed = (10, 3) if mariadb else (8, 0, 13)
        if numbers < needed:
            name = "MariaDB" if mariadb else "MySQL"
            wanted = ".".join(map(str, needed))
            raise StorageError(
                f"{self._where}: {name} {version} is too old: policyd needs {name} >= {wanted}"
            )

    @staticmethod
    async def _apply(cursor: Any, step: _Step) -> None:
        """One statement, committed by itself (DDL commits anyway)."""
        if step.time_zone is None:
            await cursor.execute(step.statement)
            return
        await cursor.execute("SET time_zone = %s", (step.time_zone,))
        try:
            await cursor.execute(step.statement)
        finally:
            await cursor.execute("SET time_zone = '+00:00'")

    async def migrate(self) -> list[str]:
        lock_name = "policyd-migrate-" + hashlib.sha1(f"{self.database}.{self.table}".encode()).hexdigest()

        async def run(conn: Any) -> list[str]:
            await self._check_server_version(conn)
            async with conn.cursor() as cursor:
                try:
                    await cursor.execute("SELECT GET_LOCK(%s, %s)", (lock_name, MIGRATE_LOCK_SECONDS))
                    row = await cursor.fetchone()
                except aiomysql.OperationalError as error:
                    if self._is_broken(error):
                        raise
                    row = None  # no named locks here (some Galera set-ups): go on without
                if row is not None and row[0] is not None and int(row[0]) == 0:
                    raise StorageError(
                        f"{self._where}: another process has been migrating {self.table} for "
                        f"{MIGRATE_LOCK_SECONDS}s; try again later"
                    )
                done: list[_Step] = []
                try:
                    # On Galera the named lock holds on one node only, so daemons on
                    # other nodes may migrate at the same moment.  Each DDL statement runs
                    # in total order on every node; one that collides with the same change
                    # made just before by another node (a duplicate column, say) makes the
                    # rest be planned again from what the table now is.
                    steps = await self._plan(conn)
                    collisions = 0
                    while steps:
                        step = steps.pop(0)
                        try:
                            await self._apply(cursor, step)
                        except aiomysql.Error as error:
                            if self._code(error) not in _CONCURRENT_DDL_CODES:
                                raise
                            collisions += 1
                            if collisions > MIGRATE_COLLISIONS:
                                raise
                            log.info(
                                "schema: %s changed meanwhile (another daemon migrating?): %s",
                                self.table,
                                self._error_detail(error),
                            )
                            steps = await self._plan(conn)
                            continue
                        done.append(step)
                finally:
                    await cursor.execute("DO RELEASE_LOCK(%s)", (lock_name,))
            self._layout = await self._read_layout(conn)
            return [description for step in done for description in step.descriptions]

        return await self._run("migrating the schema", run, retry_safe=False, timeout=None)

    # ------------------------------------------------------------------
    # queries

    @staticmethod
    def _since_sql(layout: _Layout) -> str:
        if layout.local_ts:
            return "CONVERT_TZ(%s, '+00:00', @@global.time_zone)"
        return "%s"

    @staticmethod
    def _ts_out_sql(layout: _Layout, expression: str) -> str:
        if layout.local_ts:
            return f"CONVERT_TZ({expression}, @@global.time_zone, '+00:00')"
        return expression

    async def recipients_since(self, sasl_username: str, since: datetime, outcomes: Sequence[Outcome]) -> int:
        if not outcomes:
            return 0
        bound = format_ts(since)
        wanted = [str(outcome) for outcome in outcomes]

        async def run(conn: Any) -> int:
            layout = await self._layout_of(conn)
            table = _q(self.table)
            if layout.go_policyd:
                # Old rows have no action: they count as DUNNO.
                if str(Outcome.DUNNO) not in wanted:
                    return 0
                sql = (
                    f"SELECT COALESCE(SUM(recipient_count), 0) FROM {table} "
                    f"WHERE CONVERT(sasl_username USING utf8mb4) = %s AND ts >= {self._since_sql(layout)}"
                )
                params: list[Any] = [sasl_username, bound]
            else:
                marks = ", ".join(["%s"] * len(wanted))
                if layout.has_user_key:
                    user_sql, user_params = f"user_key = {_user_key_sql('%s')}", [sasl_username] * 4
                else:
                    user_sql, user_params = "sasl_username = %s", [sasl_username]
                sql = (
                    f"SELECT COALESCE(SUM(recipient_count), 0) FROM {table} "
                    f"WHERE {user_sql} AND ts >= %s AND action IN ({marks})"
                )
                params = [*user_params, bound, *wanted]
            async with conn.cursor() as cursor:
                await cursor.execute(sql, params)
                row = await cursor.fetchone()
            return _int(row[0]) if row else 0

        return await self._run("summing recipients", run, retry_safe=True)

    async def add_events(self, events: Sequence[Event], origin: str | None = None) -> None:
        if not events:
            return
        # Multi-row INSERTs of up to MAX_STATEMENT_BYTES each, the values escaped here with
        # PyMySQL's own escape_string (what its per-value dispatch ends in for a str).  One
        # statement (the usual case) is atomic by itself in autocommit: one round trip, no
        # BEGIN and COMMIT.  Not INSERT IGNORE: that would turn real errors (a value too
        # long...) into warnings.
        head = f"INSERT INTO {_q(self.table)} ({EVENT_COLUMNS}) VALUES "
        # A duplicate event_id is this very event, written before (a retried batch whose
        # COMMIT may have landed): nothing to do.  A duplicate of anything else is another
        # event's row, and must not swallow this one: on Galera a node may hand out an id
        # another node's row already holds (while the cluster changes size); then the
        # assignment fails (too long for CHAR(32): strict mode) and the batch is retried.
        tail = (
            " ON DUPLICATE KEY UPDATE event_id = "
            f"IF(event_id <=> VALUES(event_id), event_id, REPEAT('!', {_EVENT_ID_LENGTH + 1}))"
        )
        statements: list[str] = []
        values: list[str] = []
        size = 0
        for event in events:
            row = "(" + ",".join(map(_sql_literal, event_row(event, format_ts, origin))) + ")"
            if values and size + len(row) > MAX_STATEMENT_BYTES:
                statements.append(head + ",".join(values) + tail)
                values, size = [], 0
            values.append(row)
            size += len(row) + 1
        statements.append(head + ",".join(values) + tail)

        async def run(conn: Any) -> None:
            layout = await self._layout_of(conn)
            if layout.go_policyd:
                layout = self._layout = await self._read_layout(conn)  # migrated meanwhile?
            if layout.go_policyd:
                raise StorageError(
                    f"{self._where}: table {self.table} still has go-policyd's layout; "
                    "run `policyd migrate` to upgrade it"
                )
            try:
                async with conn.cursor() as cursor:
                    if len(statements) == 1:
                        await cursor.execute(statements[0])
                        return
                    await conn.begin()
                    for statement in statements:
                        await cursor.execute(statement)
                    await conn.commit()
            except aiomysql.Error as error:
                if self._code(error) == 1406 and "'event_id'" in str(error):
                    log.warning(
                        "%s: an event's row id was taken by another row; writing it again", self._where
                    )
                    raise _RowCollision(*error.args) from error
                raise

        await self._run("recording events", run, retry_safe=True)

    def _ms_sql(self, layout: _Layout) -> str:
        """ts as milliseconds since the epoch (UTC), by arithmetic: no time zone applied."""
        return f"TIMESTAMPDIFF(MICROSECOND, '1970-01-01', {self._ts_out_sql(layout, 'ts')}) DIV 1000"

    async def max_event_id(self) -> int:
        async def run(conn: Any) -> int:
            layout = await self._layout_of(conn)
            if "id" not in layout.columns:
                return 0  # go-policyd's table has no ids (until migrated): nothing to tail
            async with conn.cursor() as cursor:
                await cursor.execute(
                    f"SELECT COALESCE(MAX(id), 0), @@auto_increment_increment FROM {_q(self.table)}"
                )
                row = await cursor.fetchone()
            self._note_id_step(row)
            return _int(row[0]) if row else 0

        return await self._run("reading the last event id", run, retry_safe=True)

    def _note_id_step(self, row: Any) -> None:
        if row and len(row) > 1:
            self.id_step = max(1, _int(row[1]))

    async def load_window(
        self, since: datetime, up_to_id: int, exclude_origin: str | None, before: datetime | None = None
    ) -> list[UserHistory]:
        bound = format_ts(since)
        until = before is not None

        async def run(conn: Any, low: str | None = None, high: str | None = None) -> list[UserHistory]:
            """The histories of the users whose user_key is in [low, high) (None: open)."""
            layout = await self._layout_of(conn)
            table = _q(self.table)
            ms = self._ms_sql(layout)
            covered = False
            if layout.go_policyd:
                if low is not None:
                    # Cut by user_key, which this table has not (it was replaced since the
                    # cuts were read): the first part reads every row, the others none.
                    return []
                # Old rows have no action (all were let through), id or origin.
                sql = (
                    "SELECT MIN(CONVERT(sasl_username USING utf8mb4)), "
                    f"GROUP_CONCAT({ms}), GROUP_CONCAT(COALESCE(recipient_count, 0)), GROUP_CONCAT(0) "
                    f"FROM {table} WHERE ts >= {self._since_sql(layout)}"
                    + (f" AND ts < {self._since_sql(layout)}" if until else "")
                    + " GROUP BY sasl_username"
                )
                params: tuple[Any, ...] = (bound,) if before is None else (bound, format_ts(before))
            else:
                group = "user_key" if layout.has_user_key else "sasl_username"
                filters = ["ts >= %s", "id <= %s"]
                params = (bound, up_to_id)
                filter_origin = exclude_origin is not None and "origin" in layout.columns
                if filter_origin:
                    filters.append("NOT (origin <=> %s)")
                    params = (*params, exclude_origin)
                if before is not None:
                    filters.append("ts < %s")
                    params = (*params, format_ts(before))
                if low is not None:
                    filters.append("user_key >= %s")
                    params = (*params, low)
                if high is not None:
                    filters.append("user_key < %s")
                    params = (*params, high)
                # Without the origin, user_ts covers the query (user_key, ts, action,
                # recipient_count and the id): one pass over that index, in user order,
                # no row read, no temporary table (17 s -> 3 s for 10 million rows).
                # Left to itself the optimizer walks the primary key for `id <= %s`.
                covered = layout.has_user_key and not filter_origin
                name = "user_key" if covered else "MIN(sasl_username)"
                hint = " FORCE INDEX (user_ts)" if covered else ""
                sql = (
                    # No ORDER BY in the GROUP_CONCATs: each would sort on its own, and
                    # two events of one millisecond could then pair up wrongly; in one
                    # pass the three lists keep the rows' order (Window.load sorts).
                    f"SELECT {name}, GROUP_CONCAT({ms}), GROUP_CONCAT(recipient_count), "
                    f"GROUP_CONCAT({OUTCOME_CODE_SQL}) "
                    f"FROM {table}{hint} WHERE {' AND '.join(filters)} GROUP BY {group}"
                )
            histories: list[UserHistory] = []
            async with conn.cursor() as cursor:
                # A busy user's list is longer than the default 1 KiB cap.
                await cursor.execute("SET SESSION group_concat_max_len = 1073741824")
            # Unbuffered: the groups are parsed here while the server is still scanning.
            async with conn.cursor(aiomysql.SSCursor) as cursor:
                await cursor.execute(sql, params)
                while rows := await cursor.fetchmany(LOAD_FETCH_ROWS):
                    histories.extend(
                        UserHistory(
                            _text(user), split_numbers(times), split_numbers(counts), split_numbers(codes)
                        )
                        for user, times, counts, codes in rows
                    )
            if covered:
                # A user_key longer than a verbatim name is a digest: the names behind it.
                digests = [
                    history.sasl_username
                    for history in histories
                    if len(history.sasl_username) > USER_KEY_VERBATIM
                ]
                names: dict[str, str] = {}
                async with conn.cursor() as cursor:
                    for first in range(0, len(digests), LOAD_FETCH_ROWS):
                        chunk = digests[first : first + LOAD_FETCH_ROWS]
                        await cursor.execute(
                            f"SELECT user_key, MIN(sasl_username) FROM {table} "
                            f"WHERE user_key IN ({', '.join(['%s'] * len(chunk))}) GROUP BY user_key",
                            chunk,
                        )
                        names.update((_text(key), _text(user)) for key, user in await cursor.fetchall())
                if names:
                    histories = [
                        replace(
                            history, sasl_username=names.get(history.sasl_username, history.sasl_username)
                        )
                        for history in histories
                    ]
            return histories

        # The session setting stays with the pooled connection: harmless (no other query
        # uses GROUP_CONCAT).  A long load gets a long bound: it runs once, at start.
        cuts = (
            await self._run("loading the window", self._load_cuts(up_to_id), retry_safe=True)
            if exclude_origin is None and up_to_id >= LOAD_PARTS_FROM_ROWS
            else []
        )
        if not cuts:
            return await self._run("loading the window", run, retry_safe=True, timeout=None)
        bounds = [None, *cuts, None]
        tasks = [
            asyncio.ensure_future(
                self._run(
                    "loading the window",
                    functools.partial(run, low=low, high=high),
                    retry_safe=True,
                    timeout=None,
                )
            )
            for low, high in itertools.pairwise(bounds)
        ]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()  # one part failed: the others are of no use
            raise
        return [history for part in parts for history in part]

    def _load_cuts(self, up_to_id: int) -> Callable[[Any], Awaitable[list[str]]]:
        """Where to cut the user_ts index into LOAD_PARTS ranges of about as many rows:
        user_keys of rows picked at random ([] when the table has no user_key)."""

        async def run(conn: Any) -> list[str]:
            layout = await self._layout_of(conn)
            if not layout.has_user_key or layout.go_policyd:
                return []
            picked = random.sample(range(1, up_to_id + 1), LOAD_SAMPLE_ROWS)
            async with conn.cursor() as cursor:
                # In the server's order (its collation decides which range a key is in).
                await cursor.execute(
                    f"SELECT user_key FROM {_q(self.table)} "
                    f"WHERE id IN ({', '.join(map(str, picked))}) ORDER BY user_key"
                )
                keys = [_text(row[0]) for row in await cursor.fetchall()]
            cuts = [keys[len(keys) * part // LOAD_PARTS] for part in range(1, LOAD_PARTS)] if keys else []
            # A cut at the smallest key would leave its range empty; equal cuts, one empty.
            return [cut for index, cut in enumerate(cuts) if cut != keys[0] and cut not in cuts[:index]]

        return run

    async def tail(self, after_id: int, exclude_origin: str, limit: int) -> Tail:
        async def run(conn: Any) -> Tail:
            layout = await self._layout_of(conn)
            if "id" not in layout.columns or "origin" not in layout.columns:
                return Tail([], 0)
            table = _q(self.table)
            async with conn.cursor() as cursor:
                await cursor.execute(
                    f"SELECT id, sasl_username, {self._ms_sql(layout)}, recipient_count, {OUTCOME_CODE_SQL}, origin "
                    f"FROM {table} WHERE id > %s AND NOT (origin <=> %s) ORDER BY id LIMIT %s",
                    (after_id, exclude_origin, limit),
                )
                rows = await cursor.fetchall()
                await cursor.execute(f"SELECT COALESCE(MAX(id), 0), @@auto_increment_increment FROM {table}")
                top = await cursor.fetchone()
            self._note_id_step(top)
            return Tail(
                [
                    TailRow(_int(row_id), _text(user), _int(at), _int(count), _int(code), _text(origin))
                    for row_id, user, at, count, code, origin in rows
                ],
                _int(top[0]) if top else 0,
            )

        return await self._run("reading new events", run, retry_safe=True)

    async def tail_summary(self, after_id: int, up_to_id: int, exclude_origin: str) -> tuple[int, int]:
        async def run(conn: Any) -> tuple[int, int]:
            layout = await self._layout_of(conn)
            if "id" not in layout.columns or "origin" not in layout.columns:
                return 0, 0
            async with conn.cursor() as cursor:
                await cursor.execute(
                    f"SELECT COUNT(*), COALESCE(SUM(id), 0) FROM {_q(self.table)} "
                    "WHERE id > %s AND id <= %s AND NOT (origin <=> %s)",
                    (after_id, up_to_id, exclude_origin),
                )
                count, total = await cursor.fetchone()
            return _int(count), _int(total)

        return await self._run("reading new events", run, retry_safe=True)

    async def existing_event_ids(self, event_ids: Sequence[str], exclude_origin: str) -> set[str]:
        async def run(conn: Any) -> set[str]:
            layout = await self._layout_of(conn)
            if "event_id" not in layout.columns or "origin" not in layout.columns:
                return set()
            found: set[str] = set()
            async with conn.cursor() as cursor:
                for start in range(0, len(event_ids), EVENT_ID_CHUNK):
                    chunk = list(event_ids[start : start + EVENT_ID_CHUNK])
                    marks = ", ".join(["%s"] * len(chunk))
                    await cursor.execute(
                        f"SELECT event_id FROM {_q(self.table)} WHERE event_id IN ({marks}) "
                        "AND NOT (origin <=> %s)",
                        [*chunk, exclude_origin],
                    )
                    found.update(_text(row[0]) for row in await cursor.fetchall())
            return found

        return await self._run("looking up event ids", run, retry_safe=True)

    async def queue_ids(self, sasl_username: str, since: datetime) -> set[str]:
        async def run(conn: Any) -> set[str]:
            layout = await self._layout_of(conn)
            if "queue_id" not in layout.columns:
                return set()  # go-policyd's table, not migrated: none recorded
            if layout.has_user_key:
                user_sql, user_params = f"user_key = {_user_key_sql('%s')}", [sasl_username] * 4
            else:
                user_sql, user_params = "sasl_username = %s", [sasl_username]
            async with conn.cursor() as cursor:
                await cursor.execute(
                    f"SELECT DISTINCT queue_id FROM {_q(self.table)} WHERE {user_sql} AND ts >= %s "
                    "AND queue_id IS NOT NULL AND queue_id != ''",
                    [*user_params, format_ts(since)],
                )
                rows = await cursor.fetchall()
            return {_text(row[0]) for row in rows}

        return await self._run("reading queue ids", run, retry_safe=True)

    async def top_senders(
        self,
        since: datetime,
        limit: int,
        user: str | None = None,
        counted: Sequence[Outcome] = (Outcome.DUNNO, Outcome.HOLD),
    ) -> list[SenderStats]:
        bound = format_ts(since)
        actions = [str(outcome) for outcome in counted]

        async def run(conn: Any) -> list[SenderStats]:
            layout = await self._layout_of(conn)
            table = _q(self.table)
            params: list[Any]
            if layout.go_policyd:
                counted_sql = "COALESCE(SUM(recipient_count), 0)" if "DUNNO" in actions else "0"
                only = " AND CONVERT(sasl_username USING utf8mb4) = %s" if user is not None else ""
                sql = (
                    "SELECT MIN(CONVERT(sasl_username USING utf8mb4)), COALESCE(SUM(recipient_count), 0), "
                    f"COUNT(*), 0, 0, {self._ts_out_sql(layout, 'MAX(ts)')}, {counted_sql}, "
                    "COUNT(DISTINCT client_address) "
                    f"FROM {table} WHERE ts >= {self._since_sql(layout)}{only} GROUP BY sasl_username "
                    "ORDER BY 7 DESC, 2 DESC, 1 LIMIT %s"
                )
                params = [bound, *([user] if user is not None else []), limit]
            else:
                group = "user_key" if layout.has_user_key else "sasl_username"
                marks = ", ".join(["%s"] * len(actions)) or "NULL"
                only = ""
                only_params: list[Any] = []
                if user is not None:
                    if layout.has_user_key:
                        only, only_params = f" AND user_key = {_user_key_sql('%s')}", [user] * 4
                    else:
                        only, only_params = " AND sasl_username = %s", [user]
                sql = (
                    "SELECT MIN(sasl_username), COALESCE(SUM(recipient_count), 0), COUNT(*), "
                    "SUM(action = 'HOLD'), SUM(action = 'REJECT'), MAX(ts), "
                    f"COALESCE(SUM(CASE WHEN action IN ({marks}) THEN recipient_count ELSE 0 END), 0), "
                    "COUNT(DISTINCT client_address) "
                    f"FROM {table} WHERE ts >= %s{only} GROUP BY {group} ORDER BY 7 DESC, 2 DESC, 1 LIMIT %s"
                )
                params = [*actions, bound, *only_params, limit]
            async with conn.cursor() as cursor:
                await cursor.execute(sql, params)
                return [
                    SenderStats(
                        _text(name),
                        _int(recipients),
                        _int(messages),
                        _int(held),
                        _int(rejected),
                        _as_utc(last),
                        _int(counted_sum),
                        _int(addresses),
                    )
                    for name, recipients, messages, held, rejected, last, counted_sum, addresses in await cursor.fetchall()
                ]

        return await self._run("listing top senders", run, retry_safe=True)

    async def user_events(self, sasl_username: str, since: datetime, limit: int) -> list[Event]:
        bound = format_ts(since)

        async def run(conn: Any) -> list[Event]:
            layout = await self._layout_of(conn)
            table = _q(self.table)
            if layout.go_policyd:
                # Old rows have no action (all were let through), event id or queue id.
                sql = (
                    f"SELECT {self._ts_out_sql(layout, 'ts')}, sender, client_address, "
                    "COALESCE(recipient_count, 0), 'DUNNO', '', '' "
                    f"FROM {table} WHERE CONVERT(sasl_username USING utf8mb4) = %s "
                    f"AND ts >= {self._since_sql(layout)} ORDER BY ts DESC LIMIT %s"
                )
                params: list[Any] = [sasl_username, bound, limit]
            else:
                if layout.has_user_key:
                    user_sql, user_params = f"user_key = {_user_key_sql('%s')}", [sasl_username] * 4
                else:
                    user_sql, user_params = "sasl_username = %s", [sasl_username]
                sql = (
                    "SELECT ts, sender, client_address, recipient_count, action, event_id, queue_id "
                    f"FROM {table} WHERE {user_sql} AND ts >= %s ORDER BY ts DESC, id DESC LIMIT %s"
                )
                params = [*user_params, bound, limit]
            async with conn.cursor() as cursor:
                await cursor.execute(sql, params)
                rows = await cursor.fetchall()
            return [
                Event(
                    _as_utc(ts),
                    sasl_username,
                    _text(sender),
                    _text(client),
                    _int(count),
                    outcome_of_stored(action),
                    _text(event_id),
                    _text(queue_id),
                )
                for ts, sender, client, count, action, event_id, queue_id in rows
            ]

        return await self._run("reading a user's events", run, retry_safe=True)

    async def purge(self, before: datetime, batch_rows: int = PURGE_BATCH_ROWS) -> int:
        bound = format_ts(before)

        async def one_batch(conn: Any) -> int:
            layout = await self._layout_of(conn)
            async with conn.cursor() as cursor:
                # Autocommit: each batch is its own short transaction.
                deleted: int = await cursor.execute(
                    f"DELETE FROM {_q(self.table)} WHERE ts < {self._since_sql(layout)} ORDER BY ts LIMIT %s",
                    (bound, batch_rows),
                )
            return deleted

        deleted = 0
        while True:
            # Safe to retry: deleting old rows again deletes only old rows.
            batch = await self._run("purging old events", one_batch, retry_safe=True)
            deleted += batch
            if batch < batch_rows:
                return deleted

    async def probe_write(self) -> None:
        async def run(conn: Any) -> None:
            async with conn.cursor() as cursor:
                await cursor.execute("START TRANSACTION")
                try:
                    await cursor.execute(
                        f"INSERT INTO {_q(self.table)} (sasl_username, sender, client_address, recipient_count) "
                        "VALUES ('policyd-probe', '', '', 0)"
                    )
                finally:
                    await cursor.execute("ROLLBACK")

        await self._run("writing a test row (rolled back)", run, retry_safe=True)

    async def count_events(self, before: datetime | None = None) -> int:
        async def run(conn: Any) -> int:
            async with conn.cursor() as cursor:
                if before is None:
                    await cursor.execute(f"SELECT COUNT(*) FROM {_q(self.table)}")
                else:
                    layout = await self._layout_of(conn)  # the same bound as purge()
                    await cursor.execute(
                        f"SELECT COUNT(*) FROM {_q(self.table)} WHERE ts < {self._since_sql(layout)}",
                        (format_ts(before),),
                    )
                row = await cursor.fetchone()
            return _int(row[0]) if row else 0

        return await self._run("counting events", run, retry_safe=True)

    async def _rules_fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        rendered = schema.placeholders(sql, schema.MYSQL)

        async def run(conn: Any) -> list[tuple[Any, ...]]:
            async with conn.cursor() as cursor:
                await cursor.execute(rendered, tuple(params))
                return [
                    tuple(_text(value) if isinstance(value, bytes | bytearray) else value for value in row)
                    for row in await cursor.fetchall()
                ]

        return await self._run("reading rules", run, retry_safe=True)

    async def _rules_execute(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
        async def run(conn: Any) -> list[int]:
            counts: list[int] = []
            async with conn.cursor() as cursor:
                await conn.begin()
                try:
                    for sql, params in statements:
                        counts.append(
                            int(await cursor.execute(schema.placeholders(sql, schema.MYSQL), tuple(params)))
                        )
                    await conn.commit()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await conn.rollback()
                    raise
            return counts

        # Not retried: a COMMIT that may have landed would add an entry twice.
        return await self._run("changing rules", run, retry_safe=False)
