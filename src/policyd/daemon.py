"""The process: builds the parts, runs the background tasks, starts and stops them in order.

Reads top-down like the life of the process: open the spool and count what a previous
run left in it, connect to the database and load the window from it, start the writer,
listen, then wait for a signal; at the end stop listening, let requests in flight
finish, flush the queued events, close storage.

A database that is down at start does not stop the daemon: it listens as soon as the
first attempt to connect has failed, decides from what it knows (a user it knows nothing
about gets `db_error_action`), spools events, and loads the window once it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import re
import secrets
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from policyd import __version__, systemd
from policyd.alerts.alerter import Alerter
from policyd.clock import to_ms, utc_now
from policyd.config import ConfigError, Settings, load_settings
from policyd.decider import Decider, window_spans
from policyd.logs import log, set_level
from policyd.maintenance import purge_every_day
from policyd.outage import INCIDENT_REMINDER_SECONDS, Outage
from policyd.server import ListenError, PolicyServer
from policyd.spool import Spool
from policyd.stats import Stats
from policyd.storage import Storage, StorageError, create_storage
from policyd.sync import WindowSync
from policyd.web.listener import WebListener
from policyd.window import Window
from policyd.writer import EventWriter

# At start, how long to wait for the first attempt to reach the database before
# listening anyway (requests are then answered from memory; it keeps trying).
CONNECT_WAIT_SECONDS = 30.0
# How often `systemctl status` gets fresh counters.
STATUS_INTERVAL_SECONDS = 10.0
# After SIGTERM, the longest the queued events get to reach the database or the spool.
FLUSH_SECONDS = 5.0


def new_origin() -> str:
    """This run's name in the `origin` column: the host, and random digits (a new run
    reads back the rows of the previous one)."""
    host = re.sub(r"[^A-Za-z0-9.-]", "", socket.gethostname().split(".", 1)[0])[:40] or "host"
    return f"{host}/{secrets.token_hex(6)}"


class Daemon:
    def __init__(
        self,
        settings: Settings,
        config_path: str | None,
        clock: Callable[[], datetime] = utc_now,
        own_process: bool = False,
    ) -> None:
        self.settings = settings
        # The daemon is the whole process (`policyd serve`), not a part of a test's: it
        # may tune the interpreter for itself (the collector, after the load).
        self.own_process = own_process
        self.config_path = config_path
        self.clock = clock
        self.origin = new_origin()
        self.stopping = asyncio.Event()
        self.stats = Stats()
        self.server: PolicyServer | None = None
        self.decider: Decider | None = None
        self.writer: EventWriter | None = None
        self.sync: WindowSync | None = None
        self.alerter: Alerter | None = None
        self.outage: Outage | None = None
        self.storage: Storage | None = None
        self.opened = False  # storage open and migrated (the status page may query it)
        self.web: WebListener | None = None  # http_listen: /metrics, /healthz, the status page
        self._tasks: list[asyncio.Task[None]] = []
        self.connect_hint: str | None = None  # why the database cannot be opened, if permanent

    async def run(self, ready: Callable[[Daemon], None] | None = None) -> None:
        settings = self.settings
        storage = self.storage = create_storage(settings.database, settings.table)
        spool = Spool(settings.spool, settings.spool_max_size)
        stats = self.stats
        outage = self.outage = Outage(settings.db_retry, stats, str(spool.path))
        window = Window(window_spans(settings.rules))
        writer = self.writer = EventWriter(
            storage=storage,
            spool=spool,
            outage=outage,
            stats=stats,
            settings=settings,
            origin=self.origin,
            held=lambda before: window.held(before - window.longest, before),
        )
        outage.spool_empty = writer.caught_up_now  # an outage ends once its backlog is written
        decider = self.decider = Decider(
            settings=settings, window=window, writer=writer, outage=outage, stats=stats, clock=self.clock
        )
        sync = self.sync = WindowSync(
            storage=storage,
            window=window,
            decider=decider,
            outage=outage,
            stats=stats,
            origin=self.origin,
            clock=self.clock,
        )
        decider.catch_up = sync.catch_up
        decider.others_active = sync.others_active
        alerter = self.alerter = Alerter(settings, storage, self.origin, self.clock)
        decider.alerts = alerter.observe
        sync.on_reset = alerter.reset
        server = self.server = PolicyServer(settings, decider, stats)
        decider.adopt(await writer.open_spool())
        first_attempt, opened = asyncio.Event(), asyncio.Event()
        self._spawn(self._connect(storage, first_attempt, opened), "policyd-connect")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_WAIT_SECONDS):
                await first_attempt.wait()
        if opened.is_set():
            try:
                await sync.load()
            except (StorageError, TimeoutError) as error:
                outage.failed(error, "load")  # listen anyway; sync.run() tries again
        # What is here now lives as long as the daemon (modules, the window's users): out of
        # the collector's sight, a full collection no longer walks it all (tens of ms, the
        # answers waiting meanwhile).
        if self.own_process:
            gc.collect()
            gc.freeze()
        writer.start()
        self._spawn(self._once_open(opened, sync.run), "policyd-sync")
        self._spawn(alerter.run(), "policyd-alerts")
        self._spawn(
            self._once_open(opened, lambda: purge_every_day(storage, lambda: self.settings.retention)),
            "policyd-purge",
        )
        try:
            await server.start()
            if settings.http_listen is not None:
                self.web = WebListener(self)
                await self.web.start()
            self._install_signal_handlers()
            log.info(
                "policyd %s started: listening on %s, storage %s, quota %d/%s (reject from %d)",
                __version__,
                ", ".join(server.addresses + (self.web.addresses if self.web else [])),
                storage.description,
                settings.rules.quota,
                _window_text(settings.rules.window.total_seconds()),
                settings.rules.reject_quota,
            )
            systemd.ready(self.status_line())
            self._spawn(self._report_to_systemd(), "policyd-systemd")
            if ready is not None:
                ready(self)
            await self.stopping.wait()
            systemd.stopping()
            log.info(
                "stopping: %d requests answered, %d events counted",
                sum(stats.requests.values()),
                stats.events_counted,
            )
        finally:
            if self.web is not None:
                await self.web.stop()
            await server.stop()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await writer.close(timeout=max(FLUSH_SECONDS, settings.db_timeout))
            outage.settle_now()
            await storage.close()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        self._tasks.append(asyncio.create_task(work, name=name))

    @staticmethod
    async def _once_open(opened: asyncio.Event, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        await opened.wait()
        await work()

    def status_line(self) -> str:
        """One line of live counters, shown by `systemctl status policyd`."""
        if self.server is None or self.writer is None or self.outage is None:
            return "starting"
        stats = self.stats
        hint = self.outage.hint or self.connect_hint
        if hint:
            database = f"database unavailable, deciding from memory; needs the admin: {hint}"
        elif self.outage.active:
            database = "database unavailable, deciding from memory"
        else:
            database = "database ok"
        return (
            f"{sum(stats.requests.values())} requests: {stats.outcome_count('DUNNO')} dunno, "
            f"{stats.outcome_count('HOLD')} held, {stats.outcome_count('REJECT')} rejected; "
            f"{len(self.server.connections)} connections; {database}; "
            f"spool {self.writer.backlog_bytes} bytes behind"
        )

    async def _report_to_systemd(self) -> None:
        """Watchdog pings (when systemd asks for them) and the status line, while running."""
        interval = systemd.watchdog_interval() or STATUS_INTERVAL_SECONDS
        while True:
            systemd.watchdog_ping()
            systemd.status(self.status_line())
            await asyncio.sleep(min(interval, STATUS_INTERVAL_SECONDS))

    async def _connect(self, storage: Storage, first_attempt: asyncio.Event, opened: asyncio.Event) -> None:
        """Open storage and bring its schema up to date, retrying until it works.

        `first_attempt` is set after the first attempt, whatever came of it; `opened`
        once storage is open and migrated.
        """
        failures = 0
        first_failure = last_log = 0.0
        while True:
            try:
                await storage.open()
                await self._bring_schema_up_to_date(storage)
            except StorageError as error:
                failures += 1
                now = time.monotonic()
                needs = f"; this will not pass by itself: {error.hint}" if error.hint else ""
                self.connect_hint = error.hint  # shown by systemd STATUS
                if failures == 1:
                    first_failure = last_log = now
                    log.error(
                        "cannot open the database (%s)%s; retrying every %gs",
                        error,
                        needs,
                        self.settings.db_retry,
                    )
                elif now - last_log >= INCIDENT_REMINDER_SECONDS:
                    last_log = now
                    log.error(
                        "still cannot open the database after %.0fs (%s)%s", now - first_failure, error, needs
                    )
                await storage.close()
                first_attempt.set()
                await asyncio.sleep(self.settings.db_retry)
                continue
            self.connect_hint = None
            if failures:
                log.warning("database opened after %d failed attempts", failures)
            self.opened = True
            opened.set()
            first_attempt.set()
            return

    async def _bring_schema_up_to_date(self, storage: Storage) -> None:
        """Migrate (auto_migrate = yes), or say what is needed and how, as a permanent error:
        the daemon then runs as while the database is down (from memory, spooling) and
        looks again every db_retry until someone has run `policyd migrate`."""
        if self.settings.auto_migrate:
            for step in await storage.migrate():
                log.info("schema: %s", step)
            return
        pending = await storage.pending_migrations()
        if pending:
            raise StorageError(
                f"{storage.description}: the schema needs changes: {'; '.join(pending)}",
                hint=(
                    "auto_migrate = no: back up the table, then run `policyd migrate` "
                    "(`policyd migrate --dry-run` shows the steps and the rows); policyd carries on "
                    "by itself once it is done"
                ),
            )

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
            loop.add_signal_handler(signal.SIGINT, self.stopping.set)
            loop.add_signal_handler(signal.SIGHUP, self.reload)

    def reload(self) -> None:
        """SIGHUP: re-read the config file; a bad file keeps the old settings."""
        if self.config_path is None or self.decider is None:
            return
        try:
            new = load_settings(self.config_path)
        except ConfigError as error:
            log.error("reload refused, keeping the old settings: %s", "; ".join(error.problems))
            return
        self.apply(new)
        log.info(
            "reloaded %s: quota %d, reject from %d", self.config_path, new.rules.quota, new.rules.reject_quota
        )

    def apply(self, new: Settings) -> None:
        """Take new settings at run time (what can change without a restart)."""
        assert self.decider is not None and self.writer is not None and self.outage is not None
        old = self.settings
        for key, reason in (
            ("database", "database"),
            ("table", "policy_table"),
            ("bind", "bind"),
            ("port", "port"),
            ("socket", "socket"),
            ("spool", "spool"),
            ("spool_max_size", "spool_max_size"),
            ("http_listen", "http_listen"),
        ):
            if getattr(new, key) != getattr(old, key):
                log.warning("reload: %s changed, it takes effect only after a restart", reason)
        self.settings = new
        if self.alerter is not None:
            self.alerter.settings = new  # alert_* keys apply at once
        held_from = to_ms(self.clock()) - self.decider.window.longest
        if self.decider.reload(new) and self.sync is not None:
            # A longer window than was held: read the part before it from the database.
            self._spawn(self._load_older(held_from), "policyd-load-older")
        self.writer.settings = new
        self.outage.retry_seconds = new.db_retry
        if self.server is not None:
            self.server.settings = new  # allowed_clients, max_connections
        set_level(new.log_level)
        for warning in new.warnings:
            log.warning("%s", warning)

    async def _load_older(self, before_ms: int) -> None:
        assert self.sync is not None
        try:
            await self.sync.load_older(before_ms)
        except (StorageError, TimeoutError) as error:
            log.error("reload: could not read the longer window from the database: %s", error)


def _window_text(seconds: float) -> str:
    return f"{seconds / 3600:g}h"


def run_daemon(settings: Settings, config_path: str | None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    daemon = Daemon(settings, config_path, own_process=True)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(daemon.run())
    except StorageError as error:
        log.error("cannot start: %s", error)
        return 1
    except ListenError as error:
        log.error("%s", error)
        return 1
    except ValueError as error:  # a bad database URL (the command line checks it first)
        log.error("cannot start: %s", error)
        return 2
    finally:
        log.info("stopped")
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
