"""The `policyd` command: serve, top, purge, migrate, check-config, hash-password."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar

import click

from policyd import __version__
from policyd.config import (
    DEFAULT_CONFIG_PATH,
    KEYS,
    ConfigError,
    Settings,
    format_duration,
    load_settings,
    parse_duration,
)
from policyd.held import HeldMessage, PostfixError, held_messages, postsuper
from policyd.logs import log, printable, setup_logging
from policyd.quota import strip_login_domain
from policyd.storage import SchemaMissing, SenderStats, Storage, StorageError, create_storage
from policyd.storage.sqlite import SQLiteStorage

T = TypeVar("T")

HELP = """policyd limits how many recipients each SASL-authenticated user can send.

\b
Postfix asks it about every message (main.cf):
  smtpd_end_of_data_restrictions =
      check_policy_service { inet:127.0.0.1:9093, default_action=DUNNO }

Below the quota (defaultquota, 1500 recipients per 24h) the answer is DUNNO;
from the quota on, HOLD (the message waits in Postfix's hold queue); from twice
the quota, REJECT.  Settings come from /etc/postfix/policyd.cfg (-c to change).

\b
Start here:
  policyd check-config     is my configuration file right?
  policyd serve -f         run in the foreground, logging to the terminal
  policyd top              who sent the most in the last 24 hours?
"""


def config_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-c",
        "--config",
        "config_path",
        default=DEFAULT_CONFIG_PATH,
        show_default=True,
        envvar="POLICYD_CONFIG",
        metavar="PATH",
        help="Configuration file (go-policyd's format).",
    )(function)


def load_or_exit(config_path: str, echo_warnings: bool = True) -> Settings:
    try:
        settings = load_settings(config_path)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(f"policyd: {problem}", err=True)
        sys.exit(2)
    for warning in settings.warnings if echo_warnings else ():
        click.echo(f"policyd: warning: {warning}", err=True)
    try:
        create_storage(settings.database, settings.table)  # the URL, checked (nothing opened)
    except ValueError as error:
        click.echo(f"policyd: {error}", err=True)
        sys.exit(2)
    return settings


def with_storage(settings: Settings, action: Callable[[Storage], Awaitable[T]]) -> T:
    """Open the configured storage, run `action` on it, close it; exit 1 on a storage error."""

    async def run() -> T:
        storage = create_storage(settings.database, settings.table)
        await storage.open()
        try:
            return await action(storage)
        finally:
            await storage.close()

    try:
        return asyncio.run(run())
    except StorageError as error:
        click.echo(f"policyd: {error}", err=True)
        click.echo(
            "policyd: (is the database reachable, and the schema created? see: policyd migrate)", err=True
        )
        sys.exit(1)
    except ValueError as error:
        click.echo(f"policyd: {error}", err=True)
        sys.exit(1)


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="policyd")
def main() -> None:
    pass


@main.command()
@config_option
@click.option("-f", "--foreground", is_flag=True, help="Log to the terminal (stderr) instead of syslog.")
def serve(config_path: str, foreground: bool) -> None:
    """Run the policy daemon (until SIGTERM; SIGHUP reloads the configuration)."""
    from policyd.daemon import run_daemon

    settings = load_or_exit(config_path, echo_warnings=False)
    setup_logging(foreground, settings.log_level, settings.syslog_socket)
    for warning in settings.warnings:  # in the log, where the admin looks after a start
        log.warning("%s", warning)
    sys.exit(run_daemon(settings, config_path))


@main.command("check-config")
@config_option
@click.option(
    "--connect",
    is_flag=True,
    help="Also try the database (read, the schema, a test row written and rolled back) and the spool, for real.",
)
@click.option(
    "--as-user",
    metavar="USER",
    help="Make the --connect checks as this user (the service's, e.g. policyd): root only.",
)
def check_config(config_path: str, connect: bool, as_user: str | None) -> None:
    """Check the configuration file and print the effective settings (password masked)."""
    if as_user is not None:
        sys.exit(_as_user(as_user, ["check-config", "--connect", "-c", config_path]))
    settings = load_or_exit(config_path)
    width = max(len(key) for key, _ in settings.describe())
    for key, value in settings.describe():
        click.echo(f"{key:<{width}}  {value}")
    _warn_about_short_names(settings)
    click.echo("configuration OK")
    if connect:
        from policyd.checks import check_database, check_spool

        results = [asyncio.run(check_database(settings)), check_spool(settings.spool)]
        for line, _ in results:
            click.echo(line)
        if not all(ok for _, ok in results):
            sys.exit(1)


def _as_user(name: str, arguments: list[str]) -> int:
    """Run this policyd command as user `name` (its groups too); its exit status."""
    import pwd
    import subprocess

    try:
        user = pwd.getpwnam(name)
    except KeyError:
        click.echo(f"policyd: no user {name!r} on this system", err=True)
        return 2
    if os.geteuid() != 0:
        click.echo("policyd: --as-user needs root", err=True)
        return 2
    try:
        return subprocess.run(
            [sys.executable, "-m", "policyd", *arguments],
            user=user.pw_uid,
            group=user.pw_gid,
            extra_groups=os.getgrouplist(name, user.pw_gid),
            env={**os.environ, "HOME": user.pw_dir},
            check=False,
        ).returncode
    except OSError as error:
        # E.g. this Python lives where that user may not go (a virtualenv under /root).
        click.echo(f"policyd: cannot run {sys.executable} as {name}: {error.strerror or error}", err=True)
        return 2


@main.command()
@config_option
@click.argument("user", required=False)
@click.option(
    "-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 100000), help="How many users."
)
@click.option("-w", "--window", default="24h", show_default=True, help="How far back (e.g. 1h, 24h, 7d).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def top(config_path: str, user: str | None, limit: int, window: str, as_json: bool) -> None:
    """Show the users who sent to the most recipients recently (or only USER).

    \b
    counted     what the quota counts: sent and held mail (rejected too with
                count_rejected), nothing before a reset; the users are in this order
    recipients  every message's recipients, rejected ones included
    ips         distinct client addresses
    """
    from policyd.clock import from_ms, to_ms, utc_now
    from policyd.quota import counted_outcomes

    settings = load_or_exit(config_path)
    span = _duration_or_exit(window)
    now = utc_now()
    since = now - span
    name = None if user is None else user.strip().lower()
    outcomes = counted_outcomes(settings.rules)

    async def read(storage: Storage) -> list[SenderStats]:
        stats = await storage.top_senders(since, limit, name, outcomes)
        # A reset inside the window: only what came after it counts.
        try:
            resets = (await storage.load_rules(to_ms(since))).resets
        except SchemaMissing:
            resets = []  # no rules tables yet (policyd migrate makes them): no reset either
        latest: dict[str, int] = {}
        for item in resets:
            latest[item.sasl_username] = max(latest.get(item.sasl_username, 0), item.before_ms)
        adjusted = []
        for found in stats:
            before = latest.get(found.sasl_username)
            if before is not None:
                counted = await storage.recipients_since(found.sasl_username, from_ms(before), outcomes)
                found = replace(found, counted=counted)  # noqa: PLW2901
            adjusted.append(found)
        adjusted.sort(key=lambda entry: (-entry.counted, -entry.recipients, entry.sasl_username))
        return adjusted

    stats = with_storage(settings, read)
    if as_json:
        _echo_json(
            [
                {
                    "user": entry.sasl_username,
                    "counted": entry.counted,
                    "recipients": entry.recipients,
                    "messages": entry.messages,
                    "held": entry.held,
                    "rejected": entry.rejected,
                    "client_addresses": entry.client_addresses,
                    "last_seen": entry.last_seen.isoformat(),
                }
                for entry in stats
            ]
        )
        return
    if not stats:
        click.echo(f"no messages recorded in the last {window}")
        return
    names = [printable(entry.sasl_username) for entry in stats]  # a name may hold escapes
    width = max(8, *(len(name) for name in names))
    click.echo(
        f"{'user':<{width}}  {'counted':>8}  {'recipients':>10}  {'messages':>8}  {'held':>6}  "
        f"{'rejected':>8}  {'ips':>4}  last seen (UTC)"
    )
    for name, entry in zip(names, stats, strict=True):
        click.echo(
            f"{name:<{width}}  {entry.counted:>8}  {entry.recipients:>10}  {entry.messages:>8}  "
            f"{entry.held:>6}  {entry.rejected:>8}  {entry.client_addresses:>4}  "
            f"{entry.last_seen:%Y-%m-%d %H:%M:%S}"
        )


@main.command()
@config_option
@click.option(
    "--older-than", default=None, help="Age of events to delete (default: retention from the config)."
)
@click.option("--dry-run", is_flag=True, help="Only count the events that would be deleted.")
@click.option("--force", is_flag=True, help="Delete even events the quota still counts (inside the window).")
def purge(config_path: str, older_than: str | None, dry_run: bool, force: bool) -> None:
    """Delete old events now (the daemon also does it every day)."""
    from policyd.clock import utc_now
    from policyd.maintenance import purge_old_events

    settings = load_or_exit(config_path)
    retention = _duration_or_exit(older_than) if older_than else settings.retention
    longest = max(limit.window for limit in settings.rules.limits)
    inside = retention < longest and not force
    problem = (
        f"--older-than {older_than} is shorter than the window ({format_duration(longest)}): it would "
        "delete events the quota still counts, letting users over quota send again"
    )
    if dry_run:
        before = utc_now() - retention
        count = with_storage(settings, lambda storage: storage.count_events(before))
        click.echo(f"would delete {count} events older than {before:%Y-%m-%d %H:%M:%S} UTC")
        if inside:
            click.echo(f"policyd: {problem}; without --dry-run it needs --force", err=True)
        return
    if inside:
        click.echo(f"policyd: {problem}; --dry-run counts them, --force deletes them anyway", err=True)
        sys.exit(2)
    deleted = with_storage(settings, lambda storage: purge_old_events(storage, retention))
    click.echo(f"deleted {deleted} events")


@main.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Only show what would change.")
def migrate(config_path: str, dry_run: bool) -> None:
    """Create or upgrade the events table in place (the daemon also does it at start)."""
    settings = load_or_exit(config_path)
    _warn_about_short_names(settings)

    async def run(storage: Storage) -> tuple[list[str], int | None]:
        if not dry_run:
            return await storage.migrate(), None
        steps = await storage.pending_migrations()
        try:
            rows = await storage.count_events() if steps else None
        except SchemaMissing:
            rows = None  # no table yet: nothing to keep
        return steps, rows

    steps, rows = with_storage(settings, run)
    if not steps:
        click.echo("schema is up to date")
    if rows is not None:
        click.echo(f"table {settings.table}: {rows} rows, each kept (changed in place)")
    for step in steps:
        click.echo(f"{'would ' if dry_run else ''}{step}")
    if rows:
        storage = create_storage(settings.database, settings.table)
        click.echo(f"back up the table first: {storage.backup_command()}")
        click.echo(
            "then stop what writes to it, and run `policyd migrate` (or start policyd with "
            "auto_migrate = yes); on a big table the change takes a while and locks it"
        )


@main.command("hash-password")
def hash_password() -> None:
    """Make the http_password_hash line for the HTTP listener's basic auth.

    Reads the password from standard input (asked twice on a terminal) and prints a
    line to put in the configuration file: the hash, never the password.
    """
    from policyd.web.auth import hash_password as make_hash

    if sys.stdin.isatty():
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        click.echo("policyd: an empty password is not a password", err=True)
        sys.exit(2)
    click.echo(f"http_password_hash = {make_hash(password)}")


@main.command("config-keys")
def config_keys() -> None:
    """List every configuration key with what it does."""
    width = max(len(key) for key in KEYS)
    for key, (_, description) in KEYS.items():
        click.echo(f"{key:<{width}}  {description}")


def _warn_about_short_names(settings: Settings) -> None:
    """go-policyd cut @domain off logins: a table of short names only, with strip_domain
    not set, means users who log in as user@domain would be counted afresh."""
    if settings.strip_domain is not None:
        return  # the admin chose
    from policyd.clock import utc_now

    longest = max(limit.window for limit in settings.rules.limits)
    storage = create_storage(settings.database, settings.table)
    if isinstance(storage, SQLiteStorage) and not os.path.exists(storage.path):
        return  # nothing recorded (and check-config does not create the file)

    async def read() -> list[str]:
        async with asyncio.timeout(10):
            await storage.open()
            try:
                # The biggest senders of the window: enough to tell the names' form.
                top = await storage.top_senders(utc_now() - longest, 1000)
            finally:
                await storage.close()
        return [entry.sasl_username for entry in top]

    try:
        users = asyncio.run(read())
    except (StorageError, TimeoutError, ValueError):
        return  # no table, or the database is down: nothing to tell from it
    if users and not any("@" in user for user in users):
        click.echo(
            f"policyd: warning: table {settings.table} holds only short user names in the last "
            f"{format_duration(longest)} (like {printable(users[0])!r}), as go-policyd wrote them: it cut "
            "@domain off logins. If users log in as user@domain, set strip_domain = yes, or they are "
            "counted afresh and list entries without @domain stop matching them; if they log in "
            "without a domain, set strip_domain = no to say so",
            err=True,
        )


def _duration_or_exit(text: str) -> timedelta:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise click.BadParameter(str(error)) from None


# -- held mail ------------------------------------------------------------------------

_postfix_config_option = click.option(
    "--postfix-config",
    "postfix_config",
    metavar="DIR",
    envvar="POLICYD_POSTFIX_CONFIG",
    help="Postfix's configuration directory, for postqueue and postsuper -c (default: Postfix's own).",
)


def _held_of(settings: Settings, user: str, postfix_config: str | None) -> list[HeldMessage]:
    """The user's messages in the hold queue: recorded by policyd (within `retention`)
    and confirmed by postqueue."""
    from policyd.clock import utc_now

    user = _user_name(user, settings)
    recorded = with_storage(settings, lambda storage: storage.queue_ids(user, utc_now() - settings.retention))
    try:
        return held_messages(recorded, postfix_config)
    except PostfixError as error:
        click.echo(f"policyd: {error}", err=True)
        sys.exit(1)


@main.command()
@config_option
@_postfix_config_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per message.")
@click.argument("user")
def held(config_path: str, postfix_config: str | None, as_json: bool, user: str) -> None:
    """List USER's messages in Postfix's hold queue (sender, recipients, time)."""
    settings = load_or_exit(config_path)
    messages = _held_of(settings, user, postfix_config)
    if as_json:
        for message in messages:
            click.echo(json.dumps(message.as_json()))
        return
    if not messages:
        click.echo(f"no held mail of {printable(user)}")
        return
    click.echo(f"{'queue id':<16}  {'arrived (UTC)':<19}  {'recipients':>10}  sender")
    for message in messages:
        arrived = f"{message.arrived:%Y-%m-%d %H:%M:%S}" if message.arrived else "?"
        click.echo(
            f"{message.queue_id:<16}  {arrived:<19}  {message.recipients:>10}  {printable(message.sender)}"
        )
    click.echo(f"{len(messages)} held messages, {sum(m.recipients for m in messages)} recipients")


def _act_on_held(
    *,
    config_path: str,
    postfix_config: str | None,
    user: str,
    queue_ids: tuple[str, ...],
    every: bool,
    dry_run: bool,
    option: str,
    verb: str,
) -> None:
    if every == bool(queue_ids):
        raise click.UsageError("give either --all or the queue ids (see: policyd held USER)")
    settings = load_or_exit(config_path)
    messages = _held_of(settings, user, postfix_config)
    theirs = {message.queue_id for message in messages}
    chosen = sorted(theirs) if every else list(dict.fromkeys(queue_ids))
    foreign = [queue_id for queue_id in chosen if queue_id not in theirs]
    if foreign:
        click.echo(
            f"policyd: not held mail of {printable(user)}, nothing done: {', '.join(map(printable, foreign))} "
            "(see: policyd held USER)",
            err=True,
        )
        sys.exit(2)
    if not chosen:
        click.echo(f"no held mail of {printable(user)}")
        return
    if dry_run:
        click.echo(f"would {verb} {len(chosen)} held messages of {printable(user)}: {' '.join(chosen)}")
        return
    try:
        said = postsuper(option, chosen, postfix_config)
    except PostfixError as error:
        click.echo(f"policyd: {error}", err=True)
        sys.exit(1)
    setup_logging(foreground=False, level="info", syslog_socket=settings.syslog_socket)
    log_line = (
        f"{verb}d {len(chosen)} held messages of {printable(user)} (postsuper {option}): {' '.join(chosen)}"
    )
    logging.getLogger("policyd").warning("%s", log_line)
    click.echo(said or log_line)


# ---------------------------------------------------------------------------
# run-time rules: quota overrides, allow / block entries, resets, one user
# (stored in the database: every daemon sharing it applies them within a second)
# ---------------------------------------------------------------------------

JSON_HELP = "Print JSON instead of a table."
# `policyd user` reads at most this many of the user's events in the window.
USER_VIEW_EVENTS = 100_000


def _until_ms(text: str | None) -> int | None:
    """--until: a duration from now (7d, 12h) or a date / time (2026-12-31, 2026-12-31T18:00,
    UTC unless it names its zone)."""
    from datetime import UTC, datetime

    from policyd.clock import to_ms, utc_now

    if text is None:
        return None
    try:
        return to_ms(utc_now() + parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither a duration (7d, 12h) nor a date (2026-12-31 or 2026-12-31T18:00)",
            param_hint="--until",
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    until = to_ms(moment)
    if until <= to_ms(utc_now()):
        raise click.BadParameter(f"{text!r} is in the past", param_hint="--until")
    return until


def _ms_text(milliseconds: int | None) -> str:
    from policyd.clock import from_ms

    return "never" if milliseconds is None else f"{from_ms(milliseconds):%Y-%m-%d %H:%M:%S} UTC"


def _ms_iso(milliseconds: int | None) -> str | None:
    from policyd.clock import from_ms

    return None if milliseconds is None else from_ms(milliseconds).isoformat()


def _user_name(text: str, settings: Settings | None = None) -> str:
    """A SASL name as the daemon counts it: in lower case (quota.Message), and without
    its @domain when strip_domain is set."""
    name = text.strip().lower()
    if not name:
        raise click.BadParameter("a user name is needed")
    if settings is not None and settings.strip_domain:
        name = strip_login_domain(name)
    return name


def _echo_json(value: object) -> None:
    import json

    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _limit_window(settings: Settings, window: str | None) -> timedelta:
    """The window of a configured limit (--window), the primary one by default."""
    from policyd.config import format_limit

    windows = [limit.window for limit in settings.rules.limits]
    if window is None:
        return windows[0]
    span = _duration_or_exit(window)
    if span not in windows:
        configured = ", ".join(format_limit(limit) for limit in settings.rules.limits)
        raise click.BadParameter(
            f"no configured limit has the window {window} (configured: {configured})", param_hint="--window"
        )
    return span


@main.group()
def quota() -> None:
    """Per-user thresholds, in place of the configured ones (stored in the database)."""


@quota.command("set")
@config_option
@click.argument("user")
@click.argument("hold", type=click.IntRange(1, 2**31 - 1))
@click.option("--reject", type=click.IntRange(1, 2**31 - 1), help="REJECT from this many (default 2 x HOLD).")
@click.option("--window", help="Which limit, by its window (default: the primary limit, `window`).")
@click.option("--until", help="Until when (7d, or 2026-12-31T18:00 UTC); default: no end.")
@click.option("--reason", default="", help="Why (shown by policyd quota show and policyd user).")
def quota_set(
    *,
    config_path: str,
    user: str,
    hold: int,
    reject: int | None,
    window: str | None,
    until: str | None,
    reason: str,
) -> None:
    """Give USER HOLD recipients per window (and REJECT from --reject)."""
    from policyd.clock import MILLISECOND, to_ms, utc_now
    from policyd.rules import Override

    settings = load_or_exit(config_path)
    name = _user_name(user, settings)
    span = _limit_window(settings, window)
    reject_from = reject if reject is not None else min(2 * hold, 2**31 - 1)
    if reject_from < hold:
        raise click.BadParameter(f"--reject {reject_from} is below HOLD {hold}")
    override = Override(
        name, span // MILLISECOND, hold, reject_from, _until_ms(until), reason, to_ms(utc_now())
    )
    with_storage(settings, lambda storage: storage.set_override(override))
    click.echo(
        f"quota of {printable(name)}: HOLD from {hold}, REJECT from {reject_from} per "
        f"{_duration_text(span)}, until {_ms_text(override.until_ms)}"
    )


@quota.command("unset")
@config_option
@click.argument("user")
@click.option("--window", help="Only the override of this limit (default: all of the user's).")
def quota_unset(config_path: str, user: str, window: str | None) -> None:
    """Give USER the configured limits again."""
    from policyd.clock import MILLISECOND

    settings = load_or_exit(config_path)
    name = _user_name(user, settings)
    window_ms = None if window is None else _limit_window(settings, window) // MILLISECOND
    removed = with_storage(settings, lambda storage: storage.remove_overrides(name, window_ms))
    click.echo(f"removed {removed} overrides of {printable(name)}")
    if not removed:
        sys.exit(1)


@quota.command("show")
@config_option
@click.argument("user", required=False)
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def quota_show(config_path: str, user: str | None, as_json: bool) -> None:
    """The overrides (of USER, or everyone's) and the limits that apply."""
    from policyd.clock import to_ms, utc_now
    from policyd.config import format_limit
    from policyd.rules import apply_overrides

    settings = load_or_exit(config_path)
    name = _user_name(user, settings) if user is not None else None
    stored = with_storage(settings, lambda storage: storage.load_rules(2**62))
    now_ms = to_ms(utc_now())
    overrides = [item for item in stored.overrides if name is None or item.sasl_username == name]
    windows = {limit.window // timedelta(milliseconds=1) for limit in settings.rules.limits}
    rows = [
        {
            "user": item.sasl_username,
            "window": _duration_text(timedelta(milliseconds=item.window_ms)),
            "hold": item.hold,
            "reject": item.reject,
            "until": _ms_iso(item.until_ms),
            "reason": item.reason,
            "active": item.active(now_ms),
            "applies": item.window_ms in windows,
        }
        for item in overrides
    ]
    if name is not None:
        effective = apply_overrides(settings.rules, overrides, now_ms)
        limits = [format_limit(limit) for limit in effective.limits]
    if as_json:
        payload: dict[str, Any] = {"overrides": rows}
        if name is not None:
            payload["limits"] = limits
        _echo_json(payload)
        return
    if not rows:
        click.echo("no overrides" + (f" for {printable(name)}" if name else ""))
    for row, item in zip(rows, overrides, strict=True):
        notes = [] if row["active"] else ["expired"]
        if not row["applies"]:
            notes.append("no configured limit has this window: not applied")
        click.echo(
            f"{printable(item.sasl_username)}  {item.hold}/{row['window']} reject {item.reject}  "
            f"until {_ms_text(item.until_ms)}  {printable(item.reason)}"
            + (f"  ({'; '.join(notes)})" if notes else "")
        )
    if name is not None:
        click.echo(f"limits of {printable(name)}: {'; '.join(limits)}")


def _duration_text(span: timedelta) -> str:
    from policyd.config import format_duration

    return format_duration(span)


def _add_entry(
    *, config_path: str, kind: str, target: str, user: str | None, action: str, until: str | None, reason: str
) -> None:
    from policyd.clock import to_ms, utc_now
    from policyd.rules import EntryError, make_entry

    settings = load_or_exit(config_path)
    try:
        entry = make_entry(
            kind,
            target,
            user=user or "",
            action=action,
            until_ms=_until_ms(until),
            reason=reason,
            created_ms=to_ms(utc_now()),
        )
    except EntryError as error:
        raise click.BadParameter(str(error)) from None
    with_storage(settings, lambda storage: storage.add_list_entry(entry))
    click.echo(f"{printable(entry.describe())}, until {_ms_text(entry.until_ms)}")


_TARGET_HELP = "USER, SENDER, client IP, CIDR (192.0.2.0/24, 2001:db8::/32) or @DOMAIN."


@main.command()
@config_option
@click.argument("target")
@click.option("--user", help="Only for this SASL user (needed for a sender or @domain).")
@click.option("--until", help="Until when (7d, or 2026-12-31T18:00 UTC); default: no end.")
@click.option("--reason", default="", help="Why (shown by policyd lists).")
def allow(config_path: str, target: str, user: str | None, until: str | None, reason: str) -> None:
    """Let TARGET's mail through uncounted (a block wins over an allow).

    TARGET is a USER, SENDER, client IP, CIDR (192.0.2.0/24, 2001:db8::/32) or @DOMAIN.
    A SENDER or @DOMAIN is matched only together with --user: any user may pick any
    envelope sender, so it alone would let a phished account dodge its quota.
    """
    _add_entry(
        config_path=config_path,
        kind="allow",
        target=target,
        user=user,
        action="HOLD",
        until=until,
        reason=reason,
    )


@main.command()
@config_option
@click.argument("target")
@click.option("--user", help="Only for this SASL user.")
@click.option(
    "--action",
    type=click.Choice(["HOLD", "REJECT"], case_sensitive=False),
    default="HOLD",
    show_default=True,
    help="What a blocked message gets (HOLD: the hold queue, as go-policyd's blacklist).",
)
@click.option("--until", help="Until when (7d, or 2026-12-31T18:00 UTC); default: no end.")
@click.option("--reason", default="", help="Why (shown by policyd lists).")
def block(
    *, config_path: str, target: str, user: str | None, action: str, until: str | None, reason: str
) -> None:
    """HOLD (or REJECT) every message of TARGET.

    TARGET is a USER, SENDER, client IP, CIDR (192.0.2.0/24, 2001:db8::/32) or @DOMAIN.
    """
    _add_entry(
        config_path=config_path,
        kind="block",
        target=target,
        user=user,
        action=action,
        until=until,
        reason=reason,
    )


@main.command()
@config_option
@click.argument("target")
@click.option("--user", help="Only the entry for this SASL user (default: every entry for TARGET).")
def unlist(config_path: str, target: str, user: str | None) -> None:
    """Remove the allow or block entries of TARGET (entries in the config file stay)."""
    from policyd.rules import EntryError, parse_target

    settings = load_or_exit(config_path)
    try:
        normal = parse_target(target).text
    except EntryError as error:
        raise click.BadParameter(str(error)) from None
    name = None if user is None else _user_name(user, settings)
    removed = with_storage(settings, lambda storage: storage.remove_list_entries(normal, name))
    click.echo(f"removed {removed} entries for {printable(normal)}")
    config_has = normal in settings.rules.whitelist or normal in settings.rules.blacklist
    if config_has:
        click.echo(f"policyd: {printable(normal)} is also in {settings.path}: remove it there", err=True)
    if not removed:
        sys.exit(1)


def _entry_row(entry: Any, now_ms: int) -> dict[str, Any]:
    return {
        "kind": entry.kind,
        "target": entry.target,
        "user": entry.user or None,
        "action": entry.action if entry.kind == "block" else "DUNNO",
        "until": _ms_iso(entry.until_ms),
        "reason": entry.reason,
        "source": entry.source,
        "active": entry.active(now_ms),
    }


@main.command("lists")
@config_option
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def lists_command(config_path: str, as_json: bool) -> None:
    """Every allow and block entry: the database's and the config file's."""
    from policyd.clock import to_ms, utc_now
    from policyd.rules import config_entries

    settings = load_or_exit(config_path)
    stored = with_storage(settings, lambda storage: storage.load_rules(2**62))
    now_ms = to_ms(utc_now())
    entries = config_entries(settings.rules.whitelist, settings.rules.blacklist) + stored.entries
    rows = [_entry_row(entry, now_ms) for entry in entries]
    if as_json:
        _echo_json(rows)
        return
    if not rows:
        click.echo("no allow or block entries")
        return
    for entry, row in zip(entries, rows, strict=True):
        if row["source"] != "config":
            source = "database"
        elif row["kind"] == "allow":
            source = f"config file (whitelist, in whitelist_hours {settings.rules.whitelist_hours.spec})"
        else:
            source = "config file (blacklist)"
        click.echo(
            f"{row['kind']:<5}  {printable(row['target'])}"
            + (f"  user {printable(row['user'])}" if row["user"] else "")
            + f"  {row['action']}  until {_ms_text(entry.until_ms)}"
            + f"  {source}"
            + (f"  {printable(row['reason'])}" if row["reason"] else "")
            + ("" if row["active"] else "  (expired)")
        )


def _held_command(name: str, option: str, summary: str) -> None:
    """`policyd release` / `policyd delete`: postsuper OPTION on USER's held mail."""

    @main.command(name, help=summary)
    @config_option
    @_postfix_config_option
    @click.option("--all", "every", is_flag=True, help="Every held message of USER.")
    @click.option("--dry-run", is_flag=True, help=f"Only show what would be {name}d.")
    @click.argument("user")
    @click.argument("queue_ids", nargs=-1)
    def command(
        *,
        config_path: str,
        postfix_config: str | None,
        every: bool,
        dry_run: bool,
        user: str,
        queue_ids: tuple[str, ...],
    ) -> None:
        _act_on_held(
            config_path=config_path,
            postfix_config=postfix_config,
            user=user,
            queue_ids=queue_ids,
            every=every,
            dry_run=dry_run,
            option=option,
            verb=name,
        )


_held_command("release", "-H", "Release USER's held mail (postsuper -H): --all, or the QUEUE_IDS given.")
_held_command("delete", "-d", "Delete USER's held mail (postsuper -d): --all, or the QUEUE_IDS given.")


@main.command()
@config_option
@click.argument("user")
@click.option("--reason", required=True, help="Why (logged by every daemon, kept in the database).")
def reset(config_path: str, user: str, reason: str) -> None:
    """Forget USER's counted recipients, on every daemon sharing the database.

    The events stay in the table: the reset is recorded beside them, and everything
    before it is no longer counted (policyd user shows them as reset).
    """
    from policyd.clock import to_ms, utc_now
    from policyd.rules import Reset

    settings = load_or_exit(config_path)
    name = _user_name(user, settings)
    now_ms = to_ms(utc_now())
    with_storage(settings, lambda storage: storage.add_reset(Reset(0, name, now_ms, reason, now_ms)))
    click.echo(f"reset {printable(name)}: recipients before {_ms_text(now_ms)} are no longer counted")


@main.command("user")
@config_option
@click.argument("user")
@click.option("-n", "--events", "recent", default=20, show_default=True, type=click.IntRange(0, 100000))
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def user_command(config_path: str, user: str, recent: int, as_json: bool) -> None:
    """One user: totals per limit, state, the rules that apply, senders, client IPs, events."""
    from policyd.clock import to_ms, utc_now
    from policyd.config import format_limit
    from policyd.rules import Matcher, RuntimeRules, config_entries
    from policyd.storage.base import StoredRules
    from policyd.userview import user_view, window_of

    settings = load_or_exit(config_path)
    name = _user_name(user, settings)
    now = utc_now()
    now_ms = to_ms(now)
    longest = window_of(settings.rules)

    async def read(storage: Storage) -> tuple[StoredRules, list[Any]]:
        stored = await storage.load_rules(now_ms - longest // timedelta(milliseconds=1))
        newest_first = await storage.user_events(name, now - longest, USER_VIEW_EVENTS)
        return stored, newest_first[::-1]

    stored, events = with_storage(settings, read)
    runtime = RuntimeRules.build(stored.overrides, stored.entries, stored.resets)
    rules = runtime.rules_for(name, settings.rules, now_ms)
    seen = {(event.sender, event.client_address) for event in events} or {("", "")}
    candidates = config_entries(settings.rules.whitelist, settings.rules.blacklist) + stored.entries
    applying = [
        entry
        for entry in candidates
        if entry.active(now_ms) and any(Matcher([entry]).match(name, s, a) for s, a in seen)
    ]
    view = user_view(
        name,
        events,
        rules=rules,
        overrides=stored.overrides,
        entries=applying,
        resets=stored.resets,
        now=now,
        recent=recent,
    )
    if as_json:
        _echo_json(
            {
                "user": name,
                "state": view.state,
                "limits": [
                    {
                        "limit": format_limit(item.limit),
                        "window_seconds": item.limit.window.total_seconds(),
                        "hold": item.limit.hold,
                        "reject": item.limit.reject,
                        "total": item.total,
                        "state": item.state,
                        "back_under": None if item.back_under is None else item.back_under.isoformat(),
                    }
                    for item in view.limits
                ],
                "overrides": [
                    {
                        "window_seconds": item.window_ms / 1000,
                        "hold": item.hold,
                        "reject": item.reject,
                        "until": _ms_iso(item.until_ms),
                        "reason": item.reason,
                    }
                    for item in view.overrides
                ],
                "entries": [_entry_row(entry, now_ms) for entry in view.entries],
                "reset": None
                if view.reset is None
                else {"before": _ms_iso(view.reset.before_ms), "reason": view.reset.reason},
                "senders": [{"sender": sender, "recipients": count} for sender, count in view.senders],
                "client_addresses": [
                    {"client_address": address, "recipients": count}
                    for address, count in view.client_addresses
                ],
                "events": [
                    {
                        "ts": event.ts.isoformat(),
                        "sender": event.sender,
                        "client_address": event.client_address,
                        "recipients": event.recipient_count,
                        "action": str(event.outcome),
                        "counted": counted,
                        "queue_id": event.queue_id or None,
                    }
                    for event, counted in view.events
                ],
            }
        )
        return
    click.echo(f"user {printable(name)}: {view.state}")
    for item in view.limits:
        back = (
            "" if item.back_under is None else f", back under it at {item.back_under:%Y-%m-%d %H:%M:%S} UTC"
        )
        click.echo(f"  limit {format_limit(item.limit)}: {item.total} counted, {item.state}{back}")
    for override in view.overrides:
        click.echo(
            f"  override: {override.hold}/{_duration_text(timedelta(milliseconds=override.window_ms))} "
            f"reject {override.reject} until {_ms_text(override.until_ms)} {printable(override.reason)}"
        )
    for entry in view.entries:
        click.echo(
            f"  list: {printable(entry.describe())} until {_ms_text(entry.until_ms)} {printable(entry.reason)}"
        )
    if view.reset is not None:
        click.echo(f"  reset at {_ms_text(view.reset.before_ms)}: {printable(view.reset.reason)}")
    click.echo(f"  senders in the last {_duration_text(longest)}:")
    for sender, count in view.senders:
        click.echo(f"    {printable(sender) or '<>'}  {count}")
    click.echo("  client addresses:")
    for address, count in view.client_addresses:
        click.echo(f"    {printable(address)}  {count}")
    if view.events:
        click.echo("  recent events (UTC):")
    for event, counted in view.events:
        click.echo(
            f"    {event.ts:%Y-%m-%d %H:%M:%S}  {event.recipient_count:>6}  {event.outcome!s:<6}  "
            f"{printable(event.sender) or '<>'}  {printable(event.client_address)}"
            + (f"  queue id {printable(event.queue_id)}" if event.queue_id else "")
            + ("" if counted else "  (not counted)")
        )
