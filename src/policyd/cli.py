"""The `policyd` command: serve, top, purge, migrate, check-config, hash-password."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import click

from policyd import __version__
from policyd.config import DEFAULT_CONFIG_PATH, KEYS, ConfigError, Settings, load_settings, parse_duration
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
def check_config(config_path: str) -> None:
    """Check the configuration file and print the effective settings (password masked)."""
    settings = load_or_exit(config_path)
    width = max(len(key) for key, _ in settings.describe())
    for key, value in settings.describe():
        click.echo(f"{key:<{width}}  {value}")
    click.echo("configuration OK")


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
