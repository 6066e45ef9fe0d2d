"""The run-time rules tables, described once and rendered for each dialect.

Beside the events table ``<t>`` (described by each backend, which also upgrades
go-policyd's table in place), three small tables hold what ``policyd quota``,
``allow`` / ``block`` and ``reset`` write, read whole by every daemon sharing the
database:

``<t>_overrides``  a user's own thresholds for one limit window
``<t>_lists``      allow and block entries
``<t>_resets``     a user's events before a moment are forgotten
``<t>_alerts``     the alerts told (claimed by the daemon that tells them, so that of
                   several relays one only does; not a rule: not in the signature)

Times are integers (milliseconds since the epoch, UTC), the daemon's own clock, as in
the window: no time zone or column type differs between the backends.  Ids only grow
(AUTOINCREMENT in SQLite), so the largest id and the number of rows of each table tell
a daemon, in one cheap query, whether anything changed (sync.py).

SQL here is written with ``?`` placeholders; ``placeholders()`` renders them for the
backend's driver.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

SQLITE = "sqlite"
MYSQL = "mysql"
POSTGRESQL = "postgresql"
# The longest table name every backend takes (PostgreSQL's; MariaDB's is 64).
MAX_IDENTIFIER = 63


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    kind: str  # "id", "text", "bigint", "int"
    nullable: bool = False


@dataclass(frozen=True, slots=True)
class Table:
    suffix: str  # the table is named <events table>_<suffix>
    columns: tuple[Column, ...]
    what: str
    unique: tuple[str, ...] = ()  # columns whose values are unique (each of kind "key")

    def name(self, events_table: str) -> str:
        """<events table>_<suffix>; when that is longer than an identifier may be
        (PostgreSQL: 63), the events table's name is cut and a digest of it added."""
        name = f"{events_table}_{self.suffix}"
        if len(name) <= MAX_IDENTIFIER:
            return name
        digest = hashlib.md5(events_table.encode(), usedforsecurity=False).hexdigest()[:8]
        keep = MAX_IDENTIFIER - len(self.suffix) - len(digest) - 2
        return f"{events_table[:keep]}_{digest}_{self.suffix}"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)


OVERRIDES = Table(
    "overrides",
    (
        Column("id", "id"),
        Column("sasl_username", "text"),
        Column("window_ms", "bigint"),
        Column("hold_from", "int"),
        Column("reject_from", "int"),
        Column("until_ms", "bigint", nullable=True),
        Column("reason", "text"),
        Column("created_ms", "bigint"),
    ),
    "per-user limit overrides",
)
LISTS = Table(
    "lists",
    (
        Column("id", "id"),
        Column("kind", "text"),  # allow | block
        Column("target", "text"),  # user, sender, @domain, IP or network (normal form)
        Column("sasl_username", "text"),  # "" for any user
        Column("action", "text"),  # HOLD | REJECT (block)
        Column("until_ms", "bigint", nullable=True),
        Column("reason", "text"),
        Column("created_ms", "bigint"),
    ),
    "allow and block entries",
)
RESETS = Table(
    "resets",
    (
        Column("id", "id"),
        Column("sasl_username", "text"),
        Column("before_ms", "bigint"),
        Column("reason", "text"),
        Column("created_ms", "bigint"),
    ),
    "resets of users' counted recipients",
)
RULES_TABLES = (OVERRIDES, LISTS, RESETS)
ALERTS = Table(
    "alerts",
    (
        Column("id", "id"),
        Column("claim", "key"),  # digest of user, limit, level and incident: one teller
        Column("sasl_username", "text"),
        Column("limit_label", "text"),
        Column("level", "int"),  # 1 HOLD, 2 REJECT
        Column("at_ms", "bigint"),  # when the limit was reached
        Column("origin", "text"),  # the daemon run that told it
    ),
    "alerts told, one per incident",
    unique=("claim",),
)
# Every table migrate() makes beside the events table.
TABLES = (*RULES_TABLES, ALERTS)

_TYPES: dict[str, dict[str, str]] = {
    SQLITE: {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "text": "TEXT",
        "bigint": "INTEGER",
        "int": "INTEGER",
        "key": "TEXT",
    },
    MYSQL: {
        "id": "BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY",
        "text": "TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        "bigint": "BIGINT",
        "int": "INT",
        "key": "VARCHAR(64) CHARACTER SET ascii COLLATE ascii_bin",
    },
    POSTGRESQL: {
        "id": "bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "text": "text",
        "bigint": "bigint",
        "int": "integer",
        "key": "text",
    },
}
_TABLE_OPTIONS = {
    SQLITE: "",
    MYSQL: " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    POSTGRESQL: "",
}
# The tables that exist, one row per name (the name in the first column).
EXISTING_TABLES_SQL = {
    SQLITE: "SELECT name FROM sqlite_master WHERE type = 'table'",
    MYSQL: "SELECT TABLE_NAME FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()",
    POSTGRESQL: "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()",
}


def quote(name: str, dialect: str) -> str:
    return f"`{name}`" if dialect == MYSQL else f'"{name}"'


def create_statement(table: Table, events_table: str, dialect: str) -> str:
    types = _TYPES[dialect]
    columns = ", ".join(
        f"{quote(column.name, dialect)} {types[column.kind]}"
        + ("" if column.kind == "id" or column.nullable else " NOT NULL")
        for column in table.columns
    )
    for column in table.unique:
        columns += f", UNIQUE ({quote(column, dialect)})"
    name = quote(table.name(events_table), dialect)
    return f"CREATE TABLE IF NOT EXISTS {name} ({columns}){_TABLE_OPTIONS[dialect]}"


def table_name_for(events_table: str, dialect: str) -> str:
    """PostgreSQL folds unquoted names to lower case: the events table's name as the
    backend uses it."""
    return events_table.lower() if dialect == POSTGRESQL else events_table


def missing_tables(events_table: str, existing: set[str], dialect: str) -> list[tuple[str, str]]:
    """(step, CREATE TABLE statement) for each rules table not in `existing`."""
    base = table_name_for(events_table, dialect)
    lowered = {name.lower() for name in existing}
    return [
        (f"create table {table.name(base)} ({table.what})", create_statement(table, base, dialect))
        for table in TABLES
        if table.name(base).lower() not in lowered
    ]


def signature_sql(events_table: str, dialect: str) -> str:
    """One row: the largest id and the row count of each rules table."""
    base = table_name_for(events_table, dialect)
    parts = []
    for table in RULES_TABLES:
        name = quote(table.name(base), dialect)
        parts.append(f"(SELECT COALESCE(MAX(id), 0) FROM {name})")
        parts.append(f"(SELECT COUNT(*) FROM {name})")
    return "SELECT " + ", ".join(parts)


def select_sql(table: Table, events_table: str, dialect: str, where: str = "") -> str:
    base = table_name_for(events_table, dialect)
    columns = ", ".join(quote(name, dialect) for name in table.column_names)
    return f"SELECT {columns} FROM {quote(table.name(base), dialect)}{where} ORDER BY id"


def insert_sql(table: Table, events_table: str, dialect: str) -> str:
    base = table_name_for(events_table, dialect)
    names = [name for name in table.column_names if name != "id"]
    columns = ", ".join(quote(name, dialect) for name in names)
    marks = ", ".join("?" * len(names))
    return f"INSERT INTO {quote(table.name(base), dialect)} ({columns}) VALUES ({marks})"


def insert_unless_there_sql(table: Table, events_table: str, dialect: str) -> str:
    """insert_sql(), skipped (0 rows) when a unique column's value is there already."""
    plain = insert_sql(table, events_table, dialect)
    if dialect == SQLITE:
        return plain.replace("INSERT INTO", "INSERT OR IGNORE INTO", 1)
    if dialect == MYSQL:
        return plain.replace("INSERT INTO", "INSERT IGNORE INTO", 1)
    return f"{plain} ON CONFLICT DO NOTHING"


def delete_sql(table: Table, events_table: str, dialect: str, where: str) -> str:
    base = table_name_for(events_table, dialect)
    return f"DELETE FROM {quote(table.name(base), dialect)} WHERE {where}"


_MARK = re.compile(r"\?")


def placeholders(sql: str, dialect: str) -> str:
    """`?` placeholders as the driver wants them: ? (sqlite3), %s (aiomysql), $1.. (asyncpg)."""
    if dialect == SQLITE:
        return sql
    if dialect == MYSQL:
        return sql.replace("%", "%%").replace("?", "%s")
    numbers = iter(range(1, 10_000))
    return _MARK.sub(lambda _: f"${next(numbers)}", sql)
