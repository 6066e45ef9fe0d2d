"""The configuration file: go-policyd's format read strictly, its quirks fixed."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from policyd.config import (
    DEFAULT_DATABASE,
    KEYS,
    ConfigError,
    Settings,
    legacy_mysql_url,
    load_settings,
    parse_action,
    parse_bool,
    parse_duration,
    parse_int,
    settings_from_text,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "policyd.cfg"
GO_POLICYD = Path(__file__).resolve().parent / "fixtures" / "go-policyd.cfg"
GO_POLICYD_TEXT = (
    "port=9093\n"
    "bind=127.0.0.1\n"
    "defaultquota=1500\n"
    "dbuser=policyd_daemon\n"
    "dbpass=WhateverYouWantAsPassword\n"
    "dbhost=smtps.uvsq.fr\n"
    "dbport=3306\n"
    "dbname=policyd\n"
    "policy_table=events\n"
    "# usesyslog=yes\n"
    "# pidfile = /var/run/policyd.pid\n"
    "whitelist=thisloginiswhitelisted\n"
)
GO_POLICYD_URL = "mysql://policyd_daemon:WhateverYouWantAsPassword@smtps.uvsq.fr:3306/policyd"


def write(directory: Path, content: str | bytes, mode: int = 0o600, name: str = "policyd.cfg") -> Path:
    """The file exactly as given (no newline translation), with these permissions."""
    path = directory / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(mode)
    return path


def load(directory: Path, content: str | bytes, mode: int = 0o600) -> Settings:
    return load_settings(write(directory, content, mode))


def problems_of(directory: Path, content: str | bytes) -> tuple[Path, list[str]]:
    path = write(directory, content)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    return path, caught.value.problems


def one_problem(directory: Path, content: str | bytes) -> tuple[Path, str]:
    path, problems = problems_of(directory, content)
    assert len(problems) == 1, problems
    return path, problems[0]


# ---------------------------------------------------------------------------
# the shipped files
# ---------------------------------------------------------------------------


def test_shipped_example_loads_with_the_values_it_states() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.path == str(EXAMPLE)
    assert settings.bind == "127.0.0.1"
    assert settings.port == 9093
    assert settings.rules.quota == 1500
    assert settings.rules.reject_quota == 3000  # commented out: twice defaultquota
    assert settings.rules.window == timedelta(hours=24)
    assert settings.database == "sqlite://var/policyd.sqlite"
    assert settings.db_error_action == "DUNNO"
    assert settings.retention == timedelta(days=7)
    assert settings.rules.whitelist_hours.spec == "Mon-Fri 07:00-20:00"
    assert settings.rules.whitelist == frozenset()
    assert settings.rules.blacklist == frozenset()
    assert settings.socket is None
    # No password in it, so no permission warning whatever its mode; no legacy keys.
    assert settings.warnings == ()


def test_shipped_example_uses_only_known_keys() -> None:
    keys = [
        line.partition("=")[0].strip()
        for line in EXAMPLE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert keys, "the example sets nothing"
    assert set(keys) <= set(KEYS)
    assert len(keys) == len(set(keys))


def test_go_policyd_fixture_is_the_shipped_file_verbatim() -> None:
    assert GO_POLICYD.read_bytes() == GO_POLICYD_TEXT.encode()


def test_go_policyd_file_loads_unchanged_and_means_mariadb(tmp_path: Path) -> None:
    path = tmp_path / "policyd.cfg"
    shutil.copyfile(GO_POLICYD, path)
    path.chmod(0o600)
    settings = load_settings(path)
    assert settings.database == GO_POLICYD_URL
    parts = urlsplit(settings.database)
    assert (parts.scheme, parts.hostname, parts.port, parts.path) == (
        "mysql",
        "smtps.uvsq.fr",
        3306,
        "/policyd",
    )
    assert (parts.username, parts.password) == ("policyd_daemon", "WhateverYouWantAsPassword")
    assert settings.table == "events"
    assert settings.rules.whitelist == frozenset({"thisloginiswhitelisted"})
    assert settings.rules.quota == 1500
    assert settings.rules.reject_quota == 3000
    assert (settings.bind, settings.port) == ("127.0.0.1", 9093)
    assert settings.warnings == ()  # 0600, and usesyslog/pidfile are commented out


def test_go_policyd_whitelist_entries_are_lower_cased(tmp_path: Path) -> None:
    text = GO_POLICYD_TEXT.replace("thisloginiswhitelisted", "ThisLoginIsWhiteListed")
    text += "whitelist = Second@Example.ORG\nblacklist = Phished.User\n"
    settings = load(tmp_path, text)
    assert settings.rules.whitelist == frozenset({"thisloginiswhitelisted", "second@example.org"})
    assert settings.rules.blacklist == frozenset({"phished.user"})


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "")
    assert load_settings(path) == Settings(path=str(path))
    assert Settings().database == DEFAULT_DATABASE


# ---------------------------------------------------------------------------
# go-policyd's quirks, fixed
# ---------------------------------------------------------------------------


def test_comments_and_blank_lines_are_skipped(tmp_path: Path) -> None:
    text = "# a comment\n\n   # an indented comment\n \t \nport=2525\n#port=1\n"
    assert load(tmp_path, text).port == 2525


def test_spaces_and_tabs_around_equals_are_ignored(tmp_path: Path) -> None:
    text = "port   =   2525\n\tdefaultquota\t=\t10  \n  bind=  10.0.0.1\n"
    settings = load(tmp_path, text)
    assert (settings.port, settings.rules.quota, settings.bind) == (2525, 10, "10.0.0.1")


def test_last_line_without_newline_is_read(tmp_path: Path) -> None:
    settings = load(tmp_path, GO_POLICYD_TEXT.rstrip("\n"))
    assert settings.rules.whitelist == frozenset({"thisloginiswhitelisted"})
    assert load(tmp_path, "port=2525").port == 2525


def test_crlf_line_endings_read_like_lf(tmp_path: Path) -> None:
    crlf = load(tmp_path, GO_POLICYD_TEXT.replace("\n", "\r\n"))
    lf = load(tmp_path, GO_POLICYD_TEXT)
    assert crlf == lf
    assert urlsplit(crlf.database).password == "WhateverYouWantAsPassword"  # no stray \r


def test_crlf_file_errors_keep_their_line_numbers(tmp_path: Path) -> None:
    path, problem = one_problem(tmp_path, "port=9093\r\n\r\nport=25\r\n")
    assert problem == f"{path}:3: port is already set on line 1"


def test_numbers_with_leading_zeros_are_decimal(tmp_path: Path) -> None:
    # go-policyd read "0100" as octal (64).
    settings = load(tmp_path, "defaultquota=0100\nrejectquota=0200\nport=0025\ndbport=03306\n")
    assert settings.rules.quota == 100
    assert settings.rules.reject_quota == 200
    assert settings.port == 25
    assert urlsplit(settings.database).port == 3306


def test_hash_inside_a_value_is_kept(tmp_path: Path) -> None:
    settings = load(tmp_path, "dbpass=se#cret # not a comment\nwhitelist = user#1\n")
    assert unquote(urlsplit(settings.database).password or "") == "se#cret # not a comment"
    assert settings.rules.whitelist == frozenset({"user#1"})


def test_equals_inside_a_value_is_kept(tmp_path: Path) -> None:
    settings = load(tmp_path, "dbpass = a=b==\n")
    assert unquote(urlsplit(settings.database).password or "") == "a=b=="


def test_keys_are_case_insensitive(tmp_path: Path) -> None:
    settings = load(tmp_path, "PORT=2525\nDefaultQuota=7\n")
    assert (settings.port, settings.rules.quota) == (2525, 7)


def test_only_newline_ends_a_line(tmp_path: Path) -> None:
    # Form feed and U+2028 inside a value stay in it, and do not shift line numbers.
    settings = load(tmp_path, "dbpass=a\x0cb\u2028c\nport=2525\n")
    assert unquote(urlsplit(settings.database).password or "") == "a\x0cb\u2028c"
    assert settings.port == 2525
    path, problem = one_problem(tmp_path, "dbpass=a\u2028b\nport=x\n")
    assert problem.startswith(f"{path}:2: port: ")


# ---------------------------------------------------------------------------
# bad files: refused with the file name, the line number and what is wrong
# ---------------------------------------------------------------------------


def test_unknown_key_suggests_the_right_one(tmp_path: Path) -> None:
    path, problem = one_problem(tmp_path, "port=9093\ndefaultqouta=10\n")
    assert problem == f"{path}:2: unknown key 'defaultqouta' (did you mean 'defaultquota'?)"


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    path, problem = one_problem(tmp_path, "frobnicate=1\n")
    assert problem == f"{path}:1: unknown key 'frobnicate'"


def test_duplicate_key_names_the_first_line(tmp_path: Path) -> None:
    path, problem = one_problem(tmp_path, "port=9093\n# again:\ndefaultquota=5\nport=9094\n")
    assert problem == f"{path}:4: port is already set on line 1"


def test_whitelist_and_blacklist_may_repeat(tmp_path: Path) -> None:
    settings = load(tmp_path, "whitelist=a\nwhitelist=b\nblacklist=c\nblacklist=d\n")
    assert settings.rules.whitelist == frozenset({"a", "b"})
    assert settings.rules.blacklist == frozenset({"c", "d"})


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ("defaultquota=15OO", "defaultquota: '15OO' is not a whole decimal number"),
        ("defaultquota=-5", "defaultquota: '-5' is not a whole decimal number"),
        ("defaultquota=1 500", "defaultquota: '1 500' is not a whole decimal number"),
        ("defaultquota=0", "defaultquota: 0 is out of range (1..2147483647)"),
        ("port=0", "port: 0 is out of range (1..65535)"),
        ("port=70000", "port: 70000 is out of range (1..65535)"),
        ("dbport=-3306", "dbport: '-3306' is not a whole decimal number"),
        ("count_rejected=maybe", "count_rejected: 'maybe' is not yes or no"),
        ("window=24 hours", "window: '24 hours' is not a duration"),
        ("retention=-7d", "retention: '-7d' is not a duration"),
        ("window=0", "window: a duration must be more than zero"),
        ("retention=999999d", "retention: '999999d' is too long (at most 36500d)"),
        ("db_error_action=ACCEPT", "db_error_action: 'ACCEPT' is not a Postfix action"),
        ("whitelist_hours=Mon-Fri 7-20", "whitelist_hours: 'mon-fri 7-20' is not like 'Mon-Fri 07:00-20:00'"),
        ("whitelist_hours=Mon-Fry 07:00-20:00", "whitelist_hours: unknown day 'fry'"),
        ("whitelist_hours=Mon-Fri 20:00-07:00", "the end is not after the start"),
        ("policy_table=events; drop table x", "policy_table: table name 'events; drop table x' must be"),
        ("bind=not a host!", "bind: 'not a host!' is not an IP address or host name"),
        ("database=/var/lib/policyd.sqlite", "database: '/var/lib/policyd.sqlite' is not a URL"),
        ("socket_mode=0999", "socket_mode: '0999' is not an octal file mode"),
        ("log_level=verbose", "log_level: 'verbose' is not one of debug, info, warning, error"),
    ],
)
def test_bad_value_names_file_line_and_problem(tmp_path: Path, line: str, what: str) -> None:
    path, problem = one_problem(tmp_path, f"# policyd\nport=9093\n{line}\n")
    assert problem.startswith(f"{path}:3: ")
    assert what in problem


def test_rejectquota_below_defaultquota(tmp_path: Path) -> None:
    path, problem = one_problem(tmp_path, "defaultquota=100\nbind=127.0.0.1\nrejectquota=50\n")
    assert problem == f"{path}:3: rejectquota (50) is below defaultquota (100)"
    assert load(tmp_path, "defaultquota=100\nrejectquota=100\n").rules.reject_quota == 100


def test_line_without_equals(tmp_path: Path) -> None:
    path, problem = one_problem(tmp_path, "port=9093\nbind 127.0.0.1\n")
    assert problem == f"{path}:2: not 'key = value' (no '=' on this line)"
    assert "127.0.0.1" not in problem  # the line is not echoed: it may hold a password


def test_empty_value(tmp_path: Path) -> None:
    path, problem = one_problem(tmp_path, "dbhost=\n")
    assert problem == f"{path}:1: dbhost has no value"
    path, problem = one_problem(tmp_path, "port = 9093\nwhitelist =   \n")
    assert problem == f"{path}:2: whitelist has no value"


def test_every_error_in_a_file_is_reported_in_order(tmp_path: Path) -> None:
    text = (
        "port=9093\n"  # 1
        "prot=9094\n"  # 2 unknown
        "defaultquota=abc\n"  # 3 bad number
        "# fine\n"  # 4
        "port=9095\n"  # 5 duplicate
        "count_rejected=perhaps\n"  # 6 bad bool
        "window\n"  # 7 no '='
        "dbname=\n"  # 8 empty
    )
    path, problems = problems_of(tmp_path, text)
    assert [problem.split(": ", 1)[0] for problem in problems] == [
        f"{path}:{line}" for line in (2, 3, 5, 6, 7, 8)
    ]
    assert "unknown key 'prot' (did you mean 'port'?)" in problems[0]
    assert "'abc' is not a whole decimal number" in problems[1]
    assert "port is already set on line 1" in problems[2]
    assert "'perhaps' is not yes or no" in problems[3]
    assert "not 'key = value'" in problems[4]
    assert "dbname has no value" in problems[5]


def test_config_error_message_is_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "a=1\nb=2\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert str(caught.value) == f"{path}:1: unknown key 'a'\n{path}:2: unknown key 'b'"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.cfg"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [f"{path}: cannot read: No such file or directory"]


def test_directory_instead_of_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(tmp_path)
    assert caught.value.problems == [f"{tmp_path}: cannot read: Is a directory"]


def test_path_through_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port=9093\n") / "policyd.cfg"
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [f"{path}: cannot read: Not a directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "port=9093\n", mode=0o000)
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    assert caught.value.problems == [f"{path}: cannot read: Permission denied"]


def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path, problem = one_problem(tmp_path, b"port=9093\n\ndbpass=caf\xe9\n")
    assert problem == f"{path}:3: not valid UTF-8 text"


def test_utf8_values_are_fine(tmp_path: Path) -> None:
    settings = load(tmp_path, "dbpass=café\nwhitelist=Jérôme\n")
    assert unquote(urlsplit(settings.database).password or "") == "café"
    assert settings.rules.whitelist == frozenset({"jérôme"})


# ---------------------------------------------------------------------------
# legacy keys
# ---------------------------------------------------------------------------


def test_ignored_legacy_keys_are_warnings_not_errors(tmp_path: Path) -> None:
    text = GO_POLICYD_TEXT.replace("# usesyslog", "usesyslog").replace("# pidfile", "pidfile")
    path = write(tmp_path, text)
    settings = load_settings(path)
    assert settings.database == GO_POLICYD_URL
    assert settings.warnings == (
        f"{path}:10: usesyslog is ignored (policyd logs to syslog and needs no pid file)",
        f"{path}:11: pidfile is ignored (policyd logs to syslog and needs no pid file)",
    )


def test_misspelt_legacy_key_is_an_error(tmp_path: Path) -> None:
    path, problem = one_problem(tmp_path, "usesylog=yes\n")
    assert problem == f"{path}:1: unknown key 'usesylog' (did you mean 'usesyslog'?)"


def test_database_key_beats_legacy_db_keys(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/x.sqlite"
    path = write(tmp_path, f"dbuser=bob\ndbpass=secret\ndbhost=db.example.org\ndatabase = {url}\n")
    settings = load_settings(path)
    assert settings.database == url
    assert f"{path}: dbhost, dbpass, dbuser ignored because database is set" in settings.warnings


@pytest.mark.parametrize(
    ("text", "url"),
    [
        ("dbname=mail\n", "mysql://localhost:3306/mail"),
        ("dbuser=bob\n", "mysql://bob@localhost:3306/policyd"),
        ("dbhost=10.0.0.5\ndbport=3307\n", "mysql://10.0.0.5:3307/policyd"),
        ("dbuser=bob\ndbpass=pw\ndbhost=db\n", "mysql://bob:pw@db:3306/policyd"),
    ],
)
def test_legacy_db_keys_default_the_rest(tmp_path: Path, text: str, url: str) -> None:
    assert load(tmp_path, text).database == url


def test_special_characters_in_dbuser_and_dbpass_are_url_escaped(tmp_path: Path) -> None:
    user, password = "pol@cy:d", "p@ss:w/rd#?% &+"
    settings = load(tmp_path, f"dbuser={user}\ndbpass={password}\ndbhost=db.example.org\ndbname=my db\n")
    parts = urlsplit(settings.database)
    assert parts.hostname == "db.example.org"
    assert parts.port == 3306
    assert unquote(parts.username or "") == user
    assert unquote(parts.password or "") == password
    assert unquote(parts.path) == "/my db"
    assert settings.database == (
        "mysql://pol%40cy%3Ad:p%40ss%3Aw%2Frd%23%3F%25%20%26%2B@db.example.org:3306/my%20db"
    )


def test_legacy_mysql_url_directly() -> None:
    assert legacy_mysql_url({}) == "mysql://localhost:3306/policyd"
    assert (
        legacy_mysql_url({"dbuser": "u", "dbpass": "p/q", "dbhost": "h", "dbport": 1, "dbname": "d"})
        == "mysql://u:p%2Fq@h:1/d"
    )


# ---------------------------------------------------------------------------
# the permission warning
# ---------------------------------------------------------------------------


def _permission_warnings(settings: Settings) -> list[str]:
    return [warning for warning in settings.warnings if "readable by everyone" in warning]


def test_world_readable_file_with_dbpass_is_warned_about(tmp_path: Path) -> None:
    path = write(tmp_path, GO_POLICYD_TEXT, mode=0o644)
    warnings = _permission_warnings(load_settings(path))
    assert warnings == [f"{path}: holds a database password but is readable by everyone (chmod o-r {path})"]
    assert all("WhateverYouWantAsPassword" not in warning for warning in warnings)


def test_world_readable_file_with_password_in_database_url_is_warned_about(tmp_path: Path) -> None:
    path = write(tmp_path, "database = mysql://u:pw@db/policyd\n", mode=0o604)
    assert len(_permission_warnings(load_settings(path))) == 1


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o400])
def test_no_permission_warning_when_others_cannot_read(tmp_path: Path, mode: int) -> None:
    assert load(tmp_path, GO_POLICYD_TEXT, mode=mode).warnings == ()


def test_no_permission_warning_without_a_password(tmp_path: Path) -> None:
    text = f"dbuser=bob\ndbhost=db\ndatabase = sqlite://{tmp_path}/x.sqlite\n"
    settings = load(tmp_path, text, mode=0o644)
    assert _permission_warnings(settings) == []
    assert load(tmp_path, "port=9093\n", mode=0o666).warnings == ()


# ---------------------------------------------------------------------------
# describe (check-config's output)
# ---------------------------------------------------------------------------


def test_describe_masks_the_password(tmp_path: Path) -> None:
    described = dict(load(tmp_path, GO_POLICYD_TEXT).describe())
    assert described["database"] == "mysql://policyd_daemon:***@smtps.uvsq.fr:3306/policyd"
    assert not any("WhateverYouWantAsPassword" in value for value in described.values())


def test_describe_masks_an_escaped_password(tmp_path: Path) -> None:
    password = "p@ss:w/rd#1"
    described = dict(load(tmp_path, f"dbuser=u\ndbpass={password}\ndbhost=db\n").describe())
    assert described["database"] == "mysql://u:***@db:3306/policyd"
    text = repr(described)
    assert password not in text
    assert "p%40ss" not in text


def test_describe_shows_every_effective_value(tmp_path: Path) -> None:
    text = (
        "bind = ::1\n"
        "port = 10031\n"
        "socket = /run/policyd/policyd.sock\n"
        "socket_mode = 0600\n"
        f"database = sqlite://{tmp_path}/x.sqlite\n"
        "policy_table = mail_events\n"
        "db_timeout = 250ms\n"
        "db_error_action = defer_if_permit Service unavailable\n"
        "db_retry = 5s\n"
        "spool = /var/spool/policyd/spool\n"
        "spool_max_size = 10M\n"
        "allowed_clients = 127.0.0.1, 192.0.2.0/24 ::1\n"
        "max_connections = 300\n"
        "defaultquota = 200\n"
        "rejectquota = 300\n"
        "window = 36h\n"
        "count_rejected = yes\n"
        "unauthenticated_action = reject Authenticate first\n"
        "whitelist = Zed\n"
        "whitelist = alice\n"
        "blacklist = 192.0.2.66\n"
        "whitelist_hours = Mon-Fri 08:00-18:00; Sat 09:00-12:00\n"
        "retention = 30d\n"
        "log_level = DEBUG\n"
    )
    path = write(tmp_path, text)
    settings = load_settings(path)
    assert settings.socket == "/run/policyd/policyd.sock"
    assert settings.socket_mode == 0o600
    assert settings.db_timeout == 0.25
    assert settings.rules.count_rejected is True
    assert settings.rules.window == timedelta(hours=36)
    assert settings.rules.whitelist_hours.spec == "Mon-Fri 08:00-18:00; Sat 09:00-12:00"
    assert settings.describe() == [
        ("config file", str(path)),
        ("bind", "::1"),
        ("port", "10031"),
        ("socket", "/run/policyd/policyd.sock"),
        ("socket_mode", "0600"),
        ("database", f"sqlite://{tmp_path}/x.sqlite"),
        ("policy_table", "mail_events"),
        ("db_timeout", "0.25s"),
        ("db_retry", "5s"),
        ("db_error_action", "DEFER_IF_PERMIT Service unavailable"),
        ("spool", "/var/spool/policyd/spool"),
        ("spool_max_size", "10M"),
        ("allowed_clients", "127.0.0.1/32, 192.0.2.0/24, ::1/128"),
        ("max_connections", "300"),
        ("defaultquota", "200"),
        ("rejectquota", "300"),
        ("window", "36h"),
        ("limit", "(none)"),
        ("count_rejected", "yes"),
        ("unauthenticated_action", "REJECT Authenticate first"),
        ("whitelist", "alice, zed"),
        ("blacklist", "192.0.2.66"),
        ("whitelist_hours", "Mon-Fri 08:00-18:00; Sat 09:00-12:00"),
        ("retention", "30d"),
        ("strip_domain", "no (default)"),
        ("auto_migrate", "yes"),
        ("log_level", "debug"),
        ("syslog_socket", "/dev/log"),
        ("http_listen", "(off)"),
        ("http_allowed_clients", "127.0.0.0/8, ::1/128"),
        ("http_user", "(none: no password asked)"),
        ("http_password_hash", "(none)"),
        ("alert_mail_to", "(none)"),
        ("alert_mail_from", "policyd@<this host>"),
        ("alert_smtp", "localhost:25"),
        ("alert_webhook", "(none)"),
    ]


def test_settings_from_text_uses_the_given_name() -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_text("port=x\n", "<text>")
    assert caught.value.problems == ["<text>:1: port: 'x' is not a whole decimal number"]


def test_keys_include_go_policyd_and_new_keys() -> None:
    go_keys = "port bind defaultquota dbuser dbpass dbhost dbport dbname policy_table whitelist blacklist"
    new_keys = "database socket rejectquota window retention db_error_action count_rejected whitelist_hours"
    assert set(go_keys.split()) | set(new_keys.split()) <= set(KEYS)
    assert all(description for _, description in KEYS.values())


# ---------------------------------------------------------------------------
# value parsers
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("15m", 900),
        ("24h", 86400),
        ("7d", 604800),
        ("2w", 1209600),
        ("1.5h", 5400),
        ("90", 90),
        ("500ms", 0.5),
        (" 24H ", 86400),
        ("24 h", 86400),
        ("36500d", 36500 * 86400),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    "text", ["", "abc", "-5m", "0", "0s", "0.0000001s", "24 hours", "1e3", "5y", "h", "1.h", "99999999999d"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_parse_duration_too_long_is_a_value_error_not_an_overflow() -> None:
    with pytest.raises(ValueError, match="too long"):
        parse_duration("9" * 400)


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("dunno", "DUNNO"),
        ("DUNNO", "DUNNO"),
        ("hold", "HOLD"),
        ("defer_if_permit Service unavailable", "DEFER_IF_PERMIT Service unavailable"),
        ("reject Too much mail", "REJECT Too much mail"),
        ("451 4.7.1 try later", "451 4.7.1 try later"),
        ("554 5.7.1 no", "554 5.7.1 no"),
        ("ok", "OK"),
    ],
)
def test_parse_action(text: str, action: str) -> None:
    assert parse_action(text) == action


@pytest.mark.parametrize("text", ["ACCEPT", "", "   ", "600 no", "45 try", "permit"])
def test_parse_action_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a Postfix action"):
        parse_action(text)


@pytest.mark.parametrize(("text", "value"), [("0100", 100), ("0", 0), ("1500", 1500), ("007", 7)])
def test_parse_int_is_always_decimal(text: str, value: int) -> None:
    assert parse_int(text) == value


@pytest.mark.parametrize("text", ["0x10", "+5", "-1", "1_000", "1.0", "１２", ""])
def test_parse_int_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not a whole decimal number"):
        parse_int(text)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("yes", True),
        ("True", True),
        ("ON", True),
        ("1", True),
        ("no", False),
        ("false", False),
        ("off", False),
        ("0", False),
    ],
)
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool(text) is value


@pytest.mark.parametrize("text", ["y", "maybe", "2", ""])
def test_parse_bool_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="is not yes or no"):
        parse_bool(text)
