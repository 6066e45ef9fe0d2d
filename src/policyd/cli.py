"""The `policyd` command: serve, top, purge, migrate, check-config, hash-password."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from policyd import __version__
from policyd.config import DEFAULT_CONFIG_PATH, KEYS, ConfigError, Settings, load_settings, parse_duration
from policyd.held import HeldMessage, PostfixError, held_messages, postsuper
from policyd.logs import printable, setup_logging
from policyd.storage import Storage, StorageError, create_storage

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


def load_or_exit(config_path: str) -> Settings:
    try:
        settings = load_settings(config_path)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(f"policyd: {problem}", err=True)
        sys.exit(2)
    for warning in settings.warnings:
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

    settings = load_or_exit(config_path)
    setup_logging(foreground, settings.log_level, settings.syslog_socket)
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
@click.option(
    "-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 100000), help="How many users."
)
@click.option("-w", "--window", default="24h", show_default=True, help="How far back (e.g. 1h, 24h, 7d).")
def top(config_path: str, limit: int, window: str) -> None:
    """Show the users who sent to the most recipients recently."""
    from policyd.clock import utc_now

    settings = load_or_exit(config_path)
    span = _duration_or_exit(window)
    since = utc_now() - span
    stats = with_storage(settings, lambda storage: storage.top_senders(since, limit))
    if not stats:
        click.echo(f"no messages recorded in the last {window}")
        return
    names = [printable(entry.sasl_username) for entry in stats]  # a name may hold escapes
    width = max(8, *(len(name) for name in names))
    click.echo(
        f"{'user':<{width}}  {'recipients':>10}  {'messages':>8}  {'held':>6}  {'rejected':>8}  last seen (UTC)"
    )
    for name, entry in zip(names, stats, strict=True):
        click.echo(
            f"{name:<{width}}  {entry.recipients:>10}  {entry.messages:>8}  "
            f"{entry.held:>6}  {entry.rejected:>8}  {entry.last_seen:%Y-%m-%d %H:%M:%S}"
        )


@main.command()
@config_option
@click.option(
    "--older-than", default=None, help="Age of events to delete (default: retention from the config)."
)
def purge(config_path: str, older_than: str | None) -> None:
    """Delete old events now (the daemon also does it every day)."""
    from policyd.maintenance import purge_old_events

    settings = load_or_exit(config_path)
    retention = _duration_or_exit(older_than) if older_than else settings.retention
    deleted = with_storage(settings, lambda storage: purge_old_events(storage, retention))
    click.echo(f"deleted {deleted} events")


@main.command()
@config_option
@click.option("--dry-run", is_flag=True, help="Only show what would change.")
def migrate(config_path: str, dry_run: bool) -> None:
    """Create or upgrade the events table in place (the daemon also does it at start)."""
    settings = load_or_exit(config_path)

    async def run(storage: Storage) -> list[str]:
        return await (storage.pending_migrations() if dry_run else storage.migrate())

    steps = with_storage(settings, run)
    if not steps:
        click.echo("schema is up to date")
    for step in steps:
        click.echo(f"{'would ' if dry_run else ''}{step}")


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

    user = user.lower()
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


@main.command()
@config_option
@_postfix_config_option
@click.option("--all", "every", is_flag=True, help="Every held message of USER.")
@click.option("--dry-run", is_flag=True, help="Only show what would be released.")
@click.argument("user")
@click.argument("queue_ids", nargs=-1)
def release(
    *,
    config_path: str,
    postfix_config: str | None,
    every: bool,
    dry_run: bool,
    user: str,
    queue_ids: tuple[str, ...],
) -> None:
    """Release USER's held mail (postsuper -H): --all, or the QUEUE_IDS given."""
    _act_on_held(
        config_path=config_path,
        postfix_config=postfix_config,
        user=user,
        queue_ids=queue_ids,
        every=every,
        dry_run=dry_run,
        option="-H",
        verb="release",
    )


@main.command()
@config_option
@_postfix_config_option
@click.option("--all", "every", is_flag=True, help="Every held message of USER.")
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted.")
@click.argument("user")
@click.argument("queue_ids", nargs=-1)
def delete(
    *,
    config_path: str,
    postfix_config: str | None,
    every: bool,
    dry_run: bool,
    user: str,
    queue_ids: tuple[str, ...],
) -> None:
    """Delete USER's held mail (postsuper -d): --all, or the QUEUE_IDS given."""
    _act_on_held(
        config_path=config_path,
        postfix_config=postfix_config,
        user=user,
        queue_ids=queue_ids,
        every=every,
        dry_run=dry_run,
        option="-d",
        verb="delete",
    )
