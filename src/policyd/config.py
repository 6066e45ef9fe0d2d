"""The configuration file: go-policyd's /etc/postfix/policyd.cfg, read strictly.

Format: one ``key = value`` per line; spaces around ``=`` are ignored; lines starting
with ``#`` and blank lines are skipped; the last line may lack its newline.  ``#`` in
the middle of a line is part of the value (passwords may contain it).  ``whitelist``
and ``blacklist`` may appear many times.  Any other mistake - an unknown key, a key
given twice, a bad value - refuses the whole file with its name and line number.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import urllib.parse
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from policyd.quota import DEFAULT_OFFICE_HOURS, Limit, OfficeHours, QuotaRules
from policyd.rules import parse_target
from policyd.storage import mask_url
from policyd.storage.base import check_table_name
from policyd.web.auth import parse_password_hash

DEFAULT_CONFIG_PATH = "/etc/postfix/policyd.cfg"
DEFAULT_DATABASE = "sqlite:///var/lib/policyd/policyd.sqlite"
DEFAULT_SPOOL = "/var/lib/policyd/policyd.spool"
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_ALLOWED_CLIENTS: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)

_ACTION_WORDS = frozenset({"DUNNO", "HOLD", "DEFER", "DEFER_IF_PERMIT", "DEFER_IF_REJECT", "REJECT", "OK"})
_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}
# Longer durations overflow timedelta or `now - duration` (window, retention, top --window).
_MAX_DURATION = timedelta(days=36500)
_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """The file cannot be used; `problems` holds one 'file:line: what' string each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Settings:
    """The effective settings, after defaults and legacy keys are resolved."""

    path: str = "(defaults)"
    bind: str = "127.0.0.1"
    port: int = 9093
    socket: str | None = None
    socket_mode: int = 0o660
    database: str = DEFAULT_DATABASE
    table: str = "events"
    db_timeout: float = 0.5
    db_retry: float = 2.0
    db_error_action: str = "DUNNO"
    spool: str = DEFAULT_SPOOL
    spool_max_size: int = 256 * 1024 * 1024
    allowed_clients: tuple[IPNetwork, ...] = DEFAULT_ALLOWED_CLIENTS
    max_connections: int = 1000
    retention: timedelta = timedelta(days=7)
    log_level: str = "info"
    syslog_socket: str = "/dev/log"
    # go-policyd cut "@domain" off SASL names (jdoe@univ.fr counted as jdoe).  None: not
    # set in the file, which means no (and check-config / migrate look at the table).
    strip_domain: bool | None = None
    # Bring the table's schema up to date at start (no: say what is needed, and wait).
    auto_migrate: bool = True
    # The HTTP listener (web/): off unless set; loopback only unless widened.
    http_listen: tuple[str, int] | None = None
    http_allowed_clients: tuple[IPNetwork, ...] = DEFAULT_ALLOWED_CLIENTS
    http_user: str | None = None
    http_password_hash: str | None = None
    alert_mail_to: tuple[str, ...] = ()
    alert_mail_from: str = ""  # "": policyd@<this host>
    alert_smtp: tuple[str, int] = ("localhost", 25)
    alert_webhook: str | None = None
    rules: QuotaRules = field(default_factory=QuotaRules)
    warnings: tuple[str, ...] = ()

    def describe(self) -> list[tuple[str, str]]:
        """(key, value) pairs for check-config, the password masked."""
        rules = self.rules
        return [
            ("config file", self.path),
            ("bind", self.bind),
            ("port", str(self.port)),
            ("socket", self.socket or "(none)"),
            ("socket_mode", f"{self.socket_mode:04o}"),
            ("database", mask_url(self.database)),
            ("policy_table", self.table),
            ("db_timeout", format_duration(timedelta(seconds=self.db_timeout))),
            ("db_retry", format_duration(timedelta(seconds=self.db_retry))),
            ("db_error_action", self.db_error_action),
            ("spool", self.spool),
            ("spool_max_size", _format_size(self.spool_max_size)),
            ("allowed_clients", ", ".join(str(network) for network in self.allowed_clients)),
            ("max_connections", str(self.max_connections)),
            ("defaultquota", str(rules.quota)),
            ("rejectquota", str(rules.reject_quota)),
            ("window", format_duration(rules.window)),
            ("limit", "; ".join(format_limit(limit) for limit in rules.extra_limits) or "(none)"),
            ("count_rejected", "yes" if rules.count_rejected else "no"),
            ("unauthenticated_action", rules.unauthenticated_action),
            ("whitelist", ", ".join(sorted(rules.whitelist)) or "(empty)"),
            ("blacklist", ", ".join(sorted(rules.blacklist)) or "(empty)"),
            ("whitelist_hours", rules.whitelist_hours.spec),
            ("retention", format_duration(self.retention)),
            ("strip_domain", {True: "yes", False: "no", None: "no (default)"}[self.strip_domain]),
            ("auto_migrate", "yes" if self.auto_migrate else "no"),
            ("log_level", self.log_level),
            ("syslog_socket", self.syslog_socket),
            ("http_listen", _format_address(self.http_listen) if self.http_listen else "(off)"),
            ("http_allowed_clients", ", ".join(str(network) for network in self.http_allowed_clients)),
            ("http_user", self.http_user or "(none: no password asked)"),
            ("http_password_hash", "(set)" if self.http_password_hash else "(none)"),
            ("alert_mail_to", ", ".join(self.alert_mail_to) or "(none)"),
            ("alert_mail_from", self.alert_mail_from or "policyd@<this host>"),
            ("alert_smtp", _format_address(self.alert_smtp)),
            # The path of a webhook URL is often its secret: the host only.
            (
                "alert_webhook",
                _webhook_host(self.alert_webhook) + " (path hidden)" if self.alert_webhook else "(none)",
            ),
        ]


# ---------------------------------------------------------------------------
# value parsers: each takes the text and returns the value or raises ValueError
# ---------------------------------------------------------------------------


def parse_int(text: str, minimum: int = 0, maximum: int = 2**31 - 1) -> int:
    # Always base 10: go-policyd read "0100" as octal 64.
    if not re.fullmatch(r"[0-9]+", text):
        raise ValueError(f"{text!r} is not a whole decimal number")
    value = int(text, 10)
    if not minimum <= value <= maximum:
        raise ValueError(f"{value} is out of range ({minimum}..{maximum})")
    return value


def parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in {"yes", "true", "on", "1"}:
        return True
    if lowered in {"no", "false", "off", "0"}:
        return False
    raise ValueError(f"{text!r} is not yes or no")


def parse_duration(text: str) -> timedelta:
    match = _DURATION_RE.match(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (like 30s, 15m, 24h, 7d; plain numbers are seconds)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if seconds > _MAX_DURATION.total_seconds():
        raise ValueError(f"{text!r} is too long (at most {_MAX_DURATION.days}d)")
    duration = timedelta(seconds=seconds)
    if duration <= timedelta(0):
        raise ValueError("a duration must be more than zero")
    return duration


def parse_action(text: str) -> str:
    word = text.split(None, 1)[0] if text.strip() else ""
    upper = word.upper()
    if upper not in _ACTION_WORDS and not re.fullmatch(r"[45]\d\d", word):
        raise ValueError(
            f"{text!r} is not a Postfix action (DUNNO, HOLD, DEFER_IF_PERMIT, REJECT, 4xx, 5xx ...)"
        )
    return upper + text.strip()[len(word) :]


def parse_port(text: str) -> int:
    return parse_int(text, 1, 65535)


def parse_bind(text: str) -> str:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9.-]+", text):
            raise ValueError(f"{text!r} is not an IP address or host name") from None
    return text


def parse_mode(text: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3}", text):
        raise ValueError(f"{text!r} is not an octal file mode like 0660")
    return int(text, 8)


def parse_log_level(text: str) -> str:
    if text.lower() not in _LOG_LEVELS:
        raise ValueError(f"{text!r} is not one of {', '.join(_LOG_LEVELS)}")
    return text.lower()


def parse_database(text: str) -> str:
    if "://" not in text:
        # Not echoed when it may hold a password (a mistyped mysql:user:pw@host...).
        shown = "the value" if "@" in text else repr(text)
        raise ValueError(f"{shown} is not a URL like sqlite:///var/lib/policyd/policyd.sqlite")
    return text


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kmg]?)i?b?", text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a size (like 512K, 100M, 1G; plain numbers are bytes)")
    value = int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2)]
    if value < 64 * 1024:
        raise ValueError("a spool smaller than 64K could not hold even a short outage")
    return value


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network (like 127.0.0.0/8)") from None
    return tuple(networks)


def parse_text(text: str) -> str:
    return text


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port``, ``[v6]:port``, or a port alone (on 127.0.0.1)."""
    text = text.strip()
    if re.fullmatch(r"[0-9]+", text):
        return "127.0.0.1", parse_port(text)
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:\s]+):([0-9]+)", text)
    if not match:
        raise ValueError(f"{text!r} is not host:port (like 127.0.0.1:9094 or [::1]:9094)")
    host = match.group(1) or match.group(3)
    port = parse_port(match.group(2) or match.group(4))
    if match.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        parse_bind(host)
    return host, port


def parse_addresses(text: str) -> tuple[str, ...]:
    """Mail addresses, comma-separated."""
    addresses = tuple(part.strip() for part in text.split(",") if part.strip())
    for address in addresses:
        if not re.fullmatch(r"[^@\s<>,]+@[^@\s<>,]+", address):
            raise ValueError(f"{address!r} is not a mail address (like postmaster@example.org)")
    if not addresses:
        raise ValueError("no mail address given")
    return addresses


def parse_address(text: str) -> str:
    addresses = parse_addresses(text)
    if len(addresses) != 1:
        raise ValueError("one mail address only")
    return addresses[0]


def parse_webhook(text: str) -> str:
    text = text.strip()
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("not an http:// or https:// URL")
    return text


def _webhook_host(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}"


def parse_user(text: str) -> str:
    if ":" in text or not text.isprintable():
        raise ValueError("a user name for basic auth cannot hold ':' or control characters")
    return text


def parse_table(text: str) -> str:
    return check_table_name(text)


def parse_hours(text: str) -> OfficeHours:
    return OfficeHours.parse(text)


def parse_list_entry(text: str) -> str:
    """A whitelist or blacklist entry in its normal form (rules.py): refused if it could
    never match (a wildcard, a bad network)."""
    return parse_target(text).text


_LIMIT_RE = re.compile(r"^(\d+)\s*/\s*(\S+)(?:\s+reject\s+(\d+))?$", re.IGNORECASE)


def parse_limit(text: str) -> Limit:
    """``300/1h`` (HOLD from 300 recipients per hour, REJECT from twice that) or
    ``300/1h reject 450``."""
    match = _LIMIT_RE.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not like 300/1h or 300/1h reject 600")
    hold = parse_int(match.group(1), 1)
    window = parse_duration(match.group(2))
    if window < timedelta(seconds=1) or window % timedelta(milliseconds=1):
        raise ValueError(f"the window of {text!r} must be at least 1s, in whole milliseconds")
    reject = parse_int(match.group(3), 1) if match.group(3) else min(2 * hold, 2**31 - 1)
    if reject < hold:
        raise ValueError(f"in {text!r} the reject threshold ({reject}) is below the hold one ({hold})")
    return Limit(hold, reject, window)


def format_limit(limit: Limit) -> str:
    return f"{limit.hold}/{format_duration(limit.window)} reject {limit.reject}"


# key -> (parser, what it is).  The order is the order of `policyd check-config --keys`.
KEYS: dict[str, tuple[Any, str]] = {
    # go-policyd's keys
    "port": (parse_port, "TCP port to listen on (default 9093)"),
    "bind": (parse_bind, "address to listen on (default 127.0.0.1)"),
    "defaultquota": (
        lambda text: parse_int(text, 1),
        "recipients per user per window before HOLD (default 1500)",
    ),
    "dbuser": (parse_text, "MariaDB user (go-policyd style; prefer `database`)"),
    "dbpass": (parse_text, "MariaDB password (go-policyd style)"),
    "dbhost": (parse_text, "MariaDB host (default localhost)"),
    "dbport": (parse_port, "MariaDB port (default 3306)"),
    "dbname": (parse_text, "MariaDB database name"),
    "policy_table": (parse_table, "table of events (default events)"),
    "whitelist": (
        parse_list_entry,
        "user, sender, @domain, client IP or network not counted in whitelist_hours (repeatable)",
    ),
    "blacklist": (parse_list_entry, "user, sender, @domain, client IP or network always held (repeatable)"),
    # policyd's own keys
    "database": (parse_database, f"database URL (default {DEFAULT_DATABASE})"),
    "socket": (parse_text, "also listen on this unix socket path"),
    "socket_mode": (parse_mode, "permissions of the unix socket (default 0660)"),
    "rejectquota": (
        lambda text: parse_int(text, 1),
        "recipients per window from which mail is rejected (default 2 x defaultquota)",
    ),
    "window": (parse_duration, "sliding window the quota applies to (default 24h)"),
    "limit": (
        parse_limit,
        "another limit, like 300/1h (HOLD from 300 per hour, REJECT from 600) or 300/1h reject 450 (repeatable)",
    ),
    "retention": (parse_duration, "how long events are kept (default 7d)"),
    "db_timeout": (parse_duration, "longest a request waits for its event to be recorded (default 0.5s)"),
    "db_retry": (
        parse_duration,
        "after a database failure, how long to spool events before trying again (default 2s)",
    ),
    "db_error_action": (
        parse_action,
        "answer for an unknown user while the window could not be read from the database (default DUNNO)",
    ),
    "spool": (parse_text, f"file keeping events while the database is down (default {DEFAULT_SPOOL})"),
    "spool_max_size": (parse_size, "largest the spool may grow (default 256M)"),
    "allowed_clients": (parse_networks, "networks allowed to connect (default 127.0.0.0/8, ::1)"),
    "max_connections": (
        lambda text: parse_int(text, 1, 100000),
        "most client connections at once (default 1000)",
    ),
    "count_rejected": (parse_bool, "count rejected messages toward the quota (default no)"),
    "whitelist_hours": (
        parse_hours,
        f"when whitelisted senders are not counted (default {DEFAULT_OFFICE_HOURS})",
    ),
    "unauthenticated_action": (parse_action, "answer for mail without sasl_username (default DUNNO)"),
    "strip_domain": (
        parse_bool,
        "count jdoe@univ.fr as jdoe, as go-policyd did (default no: the whole name)",
    ),
    "auto_migrate": (
        parse_bool,
        "create or upgrade the table at start (default yes; no: say what is needed and wait)",
    ),
    "log_level": (parse_log_level, "debug, info, warning or error (default info; debug: every decision)"),
    "syslog_socket": (parse_text, "the local syslog daemon's socket (default /dev/log)"),
    "http_listen": (
        parse_listen,
        "address:port of the HTTP listener for /metrics, /healthz and the status page (default off)",
    ),
    "http_allowed_clients": (
        parse_networks,
        "networks allowed to use the HTTP listener (default 127.0.0.0/8, ::1)",
    ),
    "http_user": (parse_user, "user name the HTTP listener asks for (basic auth; with http_password_hash)"),
    "http_password_hash": (
        parse_password_hash,
        "hash of that user's password, from `policyd hash-password` (never the password itself)",
    ),
    "alert_mail_to": (
        parse_addresses,
        "who gets a mail when a user crosses a limit (comma-separated; default none)",
    ),
    "alert_mail_from": (parse_address, "sender of those mails (default policyd@<this host>)"),
    "alert_smtp": (parse_listen, "SMTP server that takes those mails, host:port (default localhost:25)"),
    "alert_webhook": (
        parse_webhook,
        "URL that gets a JSON POST when a user crosses a limit (Slack, Mattermost...)",
    ),
}
REPEATABLE = frozenset({"whitelist", "blacklist", "limit"})
# In go-policyd's sample file (commented out there); accepted so an old file keeps working.
IGNORED_LEGACY_KEYS = frozenset({"usesyslog", "pidfile"})


def parse_lines(
    text: str, path: str
) -> tuple[dict[str, tuple[int, Any]], dict[str, list[Any]], list[str], list[str]]:
    """Parse the file's text: (single values with line numbers, lists, problems, warnings)."""
    values: dict[str, tuple[int, Any]] = {}
    lists: dict[str, list[Any]] = {name: [] for name in REPEATABLE}
    problems: list[str] = []
    warnings: list[str] = []
    # Lines end at \n only (an optional \r before it is stripped), as in go-policyd and
    # editors: str.splitlines() would also split at \f, \x1c, U+0085, U+2028 ... inside a
    # value and make the reported line numbers wrong.
    for number, raw_line in enumerate(text.split("\n"), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        key, separator, value = line.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not separator:
            # The line itself is not echoed: it may be a mistyped password line.
            problems.append(f"{where}: not 'key = value' (no '=' on this line)")
            continue
        if key in IGNORED_LEGACY_KEYS:
            warnings.append(f"{where}: {key} is ignored (policyd logs to syslog and needs no pid file)")
            continue
        if key not in KEYS:
            problems.append(f"{where}: unknown key {key!r}{_suggestion(key)}")
            continue
        if not value:
            problems.append(f"{where}: {key} has no value")
            continue
        parser, _ = KEYS[key]
        try:
            parsed = parser(value)
        except ValueError as error:
            problems.append(f"{where}: {key}: {error}")
            continue
        if key == "defaultquota" and value.startswith("0"):
            warnings.append(f"{where}: {key}: {_go_octal(value)}")
        if key in REPEATABLE:
            lists[key].append(parsed)
        elif key in values:
            problems.append(f"{where}: {key} is already set on line {values[key][0]}")
        else:
            values[key] = (number, parsed)
    return values, lists, problems, warnings


def _go_octal(text: str) -> str:
    """What go-policyd made of a number with a leading zero (Go's strconv.ParseInt base 0)."""
    decimal = int(text, 10)
    if re.fullmatch(r"0[0-7]*", text):
        return (
            f"{text} is read as {decimal}; go-policyd read it as octal ({int(text, 8)}): "
            f"write {decimal} (or {int(text, 8)} to keep go-policyd's quota)"
        )
    return (
        f"{text} is read as {decimal}; go-policyd could not read it (not octal) and used 0, "
        f"rejecting every message: write {decimal}"
    )


def _suggestion(key: str) -> str:
    import difflib

    close = difflib.get_close_matches(key, [*KEYS, *IGNORED_LEGACY_KEYS], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def legacy_mysql_url(values: dict[str, Any]) -> str:
    """go-policyd's dbuser/dbpass/dbhost/dbport/dbname keys, as a mysql:// URL."""
    user = quote(str(values.get("dbuser", "")), safe="")
    password = quote(str(values.get("dbpass", "")), safe="")
    credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host = values.get("dbhost", "localhost")
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 address
    port = values.get("dbport", 3306)
    return f"mysql://{credentials}{host}:{port}/{quote(str(values.get('dbname', 'policyd')), safe='')}"


def settings_from_text(text: str, path: str) -> Settings:
    line_values, lists, problems, warnings = parse_lines(text, path)
    values = {key: value for key, (_, value) in line_values.items()}
    legacy_db_keys = sorted(
        key for key in ("dbuser", "dbpass", "dbhost", "dbport", "dbname") if key in values
    )
    if "database" in values:
        database = values["database"]
        if legacy_db_keys:
            warnings.append(f"{path}: {', '.join(legacy_db_keys)} ignored because database is set")
    elif legacy_db_keys:
        database = legacy_mysql_url(values)
    else:
        database = DEFAULT_DATABASE
    quota = values.get("defaultquota", 1500)
    reject_quota = values.get("rejectquota", 2 * quota)
    if reject_quota < quota:
        line = line_values["rejectquota"][0]
        problems.append(f"{path}:{line}: rejectquota ({reject_quota}) is below defaultquota ({quota})")
    if ("http_user" in values) != ("http_password_hash" in values):
        given, missing = ("http_user", "http_password_hash")[:: 1 if "http_user" in values else -1]
        problems.append(f"{path}:{line_values[given][0]}: {given} needs {missing} too")
    window = values.get("window", Settings().rules.window)
    windows = {window: "window"}
    for limit in lists["limit"]:
        if limit.window in windows:
            problems.append(
                f"{path}: limit {format_limit(limit)}: another limit has the window "
                f"{format_duration(limit.window)} already ({windows[limit.window]})"
            )
        windows[limit.window] = f"limit {format_limit(limit)}"
    for name in sorted(lists["whitelist"]):
        if "@" in name:
            warnings.append(
                f"{path}: whitelist = {name} exempts any authenticated user who uses it as envelope "
                "sender (a phished account too); prefer `policyd allow SENDER --user USER`"
            )
    if problems:
        raise ConfigError(problems)
    if "http_listen" in values and "http_user" not in values and not _loopback(values["http_listen"][0]):
        warnings.append(
            f"{path}:{line_values['http_listen'][0]}: http_listen is not on loopback and no http_user is "
            "set: the status page shows user names to every host in http_allowed_clients"
        )
    defaults = Settings()
    rules = QuotaRules(
        quota=quota,
        reject_quota=reject_quota,
        window=values.get("window", defaults.rules.window),
        count_rejected=values.get("count_rejected", False),
        unauthenticated_action=values.get("unauthenticated_action", "DUNNO"),
        whitelist=frozenset(name.lower() for name in lists["whitelist"]),
        blacklist=frozenset(name.lower() for name in lists["blacklist"]),
        whitelist_hours=values.get("whitelist_hours", defaults.rules.whitelist_hours),
        extra_limits=tuple(lists["limit"]),
    )
    retention = values.get("retention", defaults.retention)
    longest = max(limit.window for limit in rules.limits)
    if retention < longest:
        # The daily purge would delete events the window still counts.
        where = f"{path}:{line_values['retention'][0]}" if "retention" in line_values else path
        given = "" if "retention" in line_values else "the default, "
        raise ConfigError(
            [
                f"{where}: retention ({given}{format_duration(retention)}) is shorter than the "
                f"window ({format_duration(longest)}): the daily purge would delete events the "
                f"quota still counts; set retention = {format_duration(longest)} or more"
            ]
        )
    return replace(
        defaults,
        path=path,
        bind=values.get("bind", defaults.bind),
        port=values.get("port", defaults.port),
        socket=values.get("socket"),
        socket_mode=values.get("socket_mode", defaults.socket_mode),
        database=database,
        table=values.get("policy_table", defaults.table),
        db_timeout=values["db_timeout"].total_seconds() if "db_timeout" in values else defaults.db_timeout,
        db_error_action=values.get("db_error_action", defaults.db_error_action),
        db_retry=values["db_retry"].total_seconds() if "db_retry" in values else defaults.db_retry,
        spool=values.get("spool", defaults.spool),
        spool_max_size=values.get("spool_max_size", defaults.spool_max_size),
        allowed_clients=values.get("allowed_clients", defaults.allowed_clients),
        max_connections=values.get("max_connections", defaults.max_connections),
        retention=retention,
        strip_domain=values.get("strip_domain", defaults.strip_domain),
        auto_migrate=values.get("auto_migrate", defaults.auto_migrate),
        log_level=values.get("log_level", defaults.log_level),
        syslog_socket=values.get("syslog_socket", defaults.syslog_socket),
        http_listen=values.get("http_listen"),
        http_allowed_clients=values.get("http_allowed_clients", defaults.http_allowed_clients),
        http_user=values.get("http_user"),
        http_password_hash=values.get("http_password_hash"),
        alert_mail_to=values.get("alert_mail_to", ()),
        alert_mail_from=values.get("alert_mail_from", ""),
        alert_smtp=values.get("alert_smtp", defaults.alert_smtp),
        alert_webhook=values.get("alert_webhook"),
        rules=rules,
        warnings=tuple(warnings),
    )


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read and check the file; raises ConfigError naming the file and line."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise ConfigError([f"{name}: cannot read: {error.strerror or error}"]) from None
    try:
        text = raw.decode("utf-8-sig")  # an editor's byte-order mark is not part of the first key
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError([f"{name}:{line}: not valid UTF-8 text"]) from None
    settings = settings_from_text(text, name)
    return replace(settings, warnings=settings.warnings + tuple(_permission_warnings(name, settings)))


def _permission_warnings(path: str, settings: Settings) -> list[str]:
    if mask_url(settings.database) == settings.database:
        return []  # no password in the file (dbpass ends up in the database URL)
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return []
    if mode & stat.S_IROTH:
        return [f"{path}: holds a database password but is readable by everyone (chmod o-r {path})"]
    return []


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _format_size(size: int) -> str:
    for unit, factor in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
        if size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


def format_duration(value: timedelta) -> str:
    """A duration as the file would give it: 24h, 7d, 90s."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        # "24h" reads better than "1d" for the window; days from two on.
        if seconds >= max(size, 2 * 86400 if unit == "d" else 0) and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
