"""The daemon: listening sockets, connections, and the process lifecycle.

Reads top-down like the life of the process: ``run_daemon`` opens storage, starts the
listeners, waits for a signal, then shuts down in order (stop accepting, let requests
in flight finish, flush pending writes, close storage).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import stat
import time
from collections.abc import Callable
from datetime import timedelta

from policyd import __version__, systemd
from policyd.accounting import Accountant, describe_error, utc_now
from policyd.config import ConfigError, Settings, load_settings
from policyd.logs import log, set_level
from policyd.protocol import ProtocolError, RequestParser, format_reply
from policyd.quota import RequestValueError
from policyd.storage import Storage, StorageError, create_storage

# Connection limits, each with its reason.
READ_CHUNK_BYTES = 64 * 1024
# Postfix closes an idle policy connection after smtpd_policy_service_max_idle (300s);
# waiting longer than that means we never drop a connection Postfix still counts on.
IDLE_TIMEOUT_SECONDS = 600.0
# Postfix writes a whole request at once; one that takes this long to arrive is not Postfix.
REQUEST_TIMEOUT_SECONDS = 30.0
# A client that does not read its replies must not pin buffers forever.
WRITE_TIMEOUT_SECONDS = 30.0
# A Postfix smtpd process serves at most max_use (100) SMTP sessions before it exits,
# so no real connection comes near this; it only bounds what one client can make us do.
MAX_REQUESTS_PER_CONNECTION = 1_000_000
# After SIGTERM, how long requests in flight and queued writes get to finish.
SHUTDOWN_GRACE_SECONDS = 10.0
# At start, how long to wait for the database before listening anyway (a schema
# migration of a big table may take longer; requests are answered from memory meanwhile).
CONNECT_WAIT_SECONDS = 30.0
# How often `systemctl status` gets fresh counters.
STATUS_INTERVAL_SECONDS = 10.0
# How often old events are purged (and once at start).
PURGE_INTERVAL = timedelta(days=1)


class Connection:
    """One client connection: reads requests, answers them in order."""

    def __init__(
        self, server: PolicyServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.busy = False  # answering a request right now (shutdown lets it finish)
        self.answered = 0
        self.peer = _peer_name(writer)

    async def serve(self) -> None:
        parser = RequestParser()
        accountant = self.server.accountant
        reader, writer = self.reader, self.writer
        request_deadline = 0.0
        try:
            while True:
                if parser.pending_bytes:
                    timeout = request_deadline - time.monotonic()
                    expired = f"request not complete within {REQUEST_TIMEOUT_SECONDS:g}s"
                else:
                    timeout = IDLE_TIMEOUT_SECONDS
                    expired = f"idle for {IDLE_TIMEOUT_SECONDS:g}s"
                try:
                    async with asyncio.timeout(max(timeout, 0.0)):
                        data = await reader.read(READ_CHUNK_BYTES)
                except TimeoutError:
                    log.info("client %s: %s; closing the connection", self.peer, expired)
                    return
                if not data:
                    if parser.pending_bytes:
                        log.warning(
                            "client %s: closed the connection in the middle of a request (%d bytes)",
                            self.peer,
                            parser.pending_bytes,
                        )
                    return
                had_pending = parser.pending_bytes > 0
                requests = parser.feed(data)
                if requests:
                    self.busy = True
                    for request in requests:
                        action = await accountant.decide(request)
                        writer.write(format_reply(action))
                    async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
                        await writer.drain()
                    self.busy = False
                    self.server.requests += len(requests)
                    self.answered += len(requests)
                    if self.server.closing:
                        return
                    if self.answered >= MAX_REQUESTS_PER_CONNECTION:
                        log.warning(
                            "client %s: %d requests on one connection, the limit; closing it",
                            self.peer,
                            self.answered,
                        )
                        return
                if parser.pending_bytes and (requests or not had_pending):
                    request_deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS
        except ProtocolError as error:
            log.warning("client %s: %s; closing the connection", self.peer, error)
        except RequestValueError as error:
            log.warning("client %s: bad request: %s; closing the connection", self.peer, error)
        except TimeoutError:
            log.warning("client %s: does not read its replies; closing the connection", self.peer)
        except (ConnectionError, OSError) as error:
            log.info("client %s: connection lost: %s", self.peer, error)
        except Exception:
            # A bug: say so with the traceback, close this connection, serve the others.
            log.exception("client %s: unexpected error; closing the connection", self.peer)
        finally:
            self.busy = False
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def _peer_name(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "unix-socket"


class PolicyServer:
    """Listeners and the connections they accepted."""

    def __init__(self, settings: Settings, accountant: Accountant) -> None:
        self.settings = settings
        self.accountant = accountant
        self.listeners: list[asyncio.Server] = []
        self.connections: dict[asyncio.Task[None], Connection] = {}
        self.requests = 0
        self.refused_connections = 0
        self.closing = False
        self._last_refusal_log = 0.0

    @property
    def addresses(self) -> list[str]:
        names = []
        for listener in self.listeners:
            for sock in listener.sockets:
                address = sock.getsockname()
                names.append(
                    f"{address[0]}:{address[1]}" if isinstance(address, tuple) else f"unix:{address}"
                )
        return names

    async def start(self) -> None:
        settings = self.settings
        self.listeners.append(
            await asyncio.start_server(
                self._accept,
                settings.bind,
                settings.port,
                reuse_address=True,
                backlog=1024,
                limit=READ_CHUNK_BYTES,
            )
        )
        if settings.socket:
            _remove_stale_socket(settings.socket)
            self.listeners.append(
                await asyncio.start_unix_server(self._accept, settings.socket, limit=READ_CHUNK_BYTES)
            )
            os.chmod(settings.socket, settings.socket_mode)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer_ip = writer.get_extra_info("peername")[0]
            if not self._allowed(peer_ip):
                self._refuse(writer, f"connection from {peer_ip} refused: not in allowed_clients")
                return
        if len(self.connections) >= self.settings.max_connections:
            self._refuse(
                writer,
                f"connection refused: {len(self.connections)} open, max_connections is {self.settings.max_connections}",
            )
            return
        connection = Connection(self, reader, writer)
        task = asyncio.current_task()
        assert task is not None
        self.connections[task] = connection
        try:
            await connection.serve()
        except asyncio.CancelledError:
            # Cancelled at shutdown.  Ending normally keeps asyncio's stream machinery
            # from logging a traceback for every connection (Python 3.11).
            pass
        finally:
            self.connections.pop(task, None)

    def _allowed(self, peer_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.settings.allowed_clients)

    def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        """Close at once; log the first refusal and then at most one line per 10s."""
        self.refused_connections += 1
        now = time.monotonic()
        if now - self._last_refusal_log > 10:
            self._last_refusal_log = now
            log.warning("%s (%d refused so far)", reason, self.refused_connections)
        writer.close()

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, let requests in flight finish (bounded), close the rest."""
        for listener in self.listeners:
            listener.close()
        self.closing = True
        busy = []
        for task, connection in list(self.connections.items()):
            if connection.busy:
                busy.append(task)  # ends by itself after its answer (it sees `closing`)
            else:
                connection.writer.close()  # its read returns at once; it ends quietly
        if busy:
            await asyncio.wait(busy, timeout=grace)
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=1.0)
        if self.settings.socket:
            _remove_stale_socket(self.settings.socket)


def _remove_stale_socket(path: str) -> None:
    """Remove a unix socket left by a previous run (never a regular file)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)


async def purge_old_events(storage: Storage, retention: timedelta) -> int:
    """Delete events older than `retention`; returns how many."""
    before = utc_now() - retention
    started = time.monotonic()
    deleted = await storage.purge(before)
    log.info(
        "purged %d events older than %s in %.1fs",
        deleted,
        before.strftime("%Y-%m-%d %H:%M:%S UTC"),
        time.monotonic() - started,
    )
    return deleted


async def _purge_every_day(storage: Storage, accountant: Accountant, connected: asyncio.Task[None]) -> None:
    await connected
    while True:
        try:
            await purge_old_events(storage, accountant.settings.retention)
        except StorageError as error:
            log.error("purge failed: %s (will try again in %s)", describe_error(error), PURGE_INTERVAL)
        await asyncio.sleep(PURGE_INTERVAL.total_seconds())


class Daemon:
    """The whole process: storage, accountant, listeners, signals."""

    def __init__(self, settings: Settings, config_path: str | None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.stopping = asyncio.Event()
        self.server: PolicyServer | None = None
        self.accountant: Accountant | None = None

    async def run(self, ready: Callable[[Daemon], None] | None = None) -> None:
        storage = create_storage(self.settings.database, self.settings.table)
        first_attempt = asyncio.Event()
        connect_task = asyncio.create_task(self._connect(storage, first_attempt), name="policyd-connect")
        # A database that is down at start does not stop the daemon: it answers from the
        # spool and memory until the database is reachable (connect() keeps trying).  It
        # starts listening as soon as the first attempt to connect has succeeded or failed.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CONNECT_WAIT_SECONDS):
                await first_attempt.wait()
        accountant = self.accountant = Accountant(storage, self.settings)
        await accountant.start()
        purge_task = asyncio.create_task(
            _purge_every_day(storage, accountant, connect_task), name="policyd-purge"
        )
        server = self.server = PolicyServer(self.settings, accountant)
        watchdog_task: asyncio.Task[None] | None = None
        try:
            await server.start()
            self._install_signal_handlers()
            log.info(
                "policyd %s started: listening on %s, storage %s, quota %d/%s (reject from %d)",
                __version__,
                ", ".join(server.addresses),
                storage.description,
                self.settings.rules.quota,
                _window_text(self.settings.rules.window),
                self.settings.rules.reject_quota,
            )
            systemd.ready(self.status_line())
            watchdog_task = asyncio.create_task(self._report_to_systemd(), name="policyd-systemd")
            if ready is not None:
                ready(self)
            await self.stopping.wait()
            systemd.stopping()
            log.info("stopping: %d requests answered", server.requests)
        finally:
            await server.stop()
            purge_task.cancel()
            if watchdog_task is not None:
                watchdog_task.cancel()
            connect_task.cancel()
            await accountant.close()
            await storage.close()
            log.info("stopped")

    def status_line(self) -> str:
        """One line of live counters, shown by `systemctl status policyd`."""
        if self.server is None or self.accountant is None:
            return "starting"
        decisions = self.accountant.decisions
        outage = self.accountant.outage
        database = "database unavailable, deciding from memory" if outage.active else "database ok"
        return (
            f"{self.server.requests} requests: {decisions['DUNNO']} dunno, {decisions['HOLD']} held, "
            f"{decisions['REJECT']} rejected; {len(self.server.connections)} connections; {database}; "
            f"spool {self.accountant.writer.spool.pending_bytes} bytes"
        )

    async def _report_to_systemd(self) -> None:
        """Watchdog pings (when systemd asks for them) and the status line, while running."""
        interval = systemd.watchdog_interval() or STATUS_INTERVAL_SECONDS
        while True:
            systemd.watchdog_ping()
            systemd.status(self.status_line())
            await asyncio.sleep(min(interval, STATUS_INTERVAL_SECONDS))

    async def _connect(self, storage: Storage, first_attempt: asyncio.Event) -> None:
        """Open storage and bring its schema up to date, retrying until it works."""
        failures = 0
        while True:
            try:
                await storage.open()
                for step in await storage.migrate():
                    log.info("schema: %s", step)
            except StorageError as error:
                first_attempt.set()
                failures += 1
                if failures == 1:
                    log.error(
                        "cannot open the database (%s); retrying every %gs", error, self.settings.db_retry
                    )
                await storage.close()
                await asyncio.sleep(self.settings.db_retry)
                continue
            first_attempt.set()
            if failures:
                log.warning("database opened after %d failed attempts", failures)
            return

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
            loop.add_signal_handler(signal.SIGINT, self.stopping.set)
            loop.add_signal_handler(signal.SIGHUP, self.reload)

    def reload(self) -> None:
        """SIGHUP: re-read the config file; a bad file keeps the old settings."""
        if self.config_path is None or self.accountant is None:
            return
        try:
            new = load_settings(self.config_path)
        except ConfigError as error:
            log.error("reload refused, keeping the old settings: %s", "; ".join(error.problems))
            return
        old = self.settings
        for key, reason in (
            ("database", "database"),
            ("table", "policy_table"),
            ("bind", "bind"),
            ("port", "port"),
            ("socket", "socket"),
            ("spool", "spool"),
            ("spool_max_size", "spool_max_size"),
        ):
            if getattr(new, key) != getattr(old, key):
                log.warning("reload: %s changed, it takes effect only after a restart", reason)
        self.settings = new
        self.accountant.reload(new)
        if self.server is not None:
            self.server.settings = new  # allowed_clients, max_connections
        set_level(new.log_level)
        for warning in new.warnings:
            log.warning("%s", warning)
        log.info(
            "reloaded %s: quota %d, reject from %d", self.config_path, new.rules.quota, new.rules.reject_quota
        )


def _window_text(window: timedelta) -> str:
    hours = window.total_seconds() / 3600
    return f"{hours:g}h"


def run_daemon(settings: Settings, config_path: str | None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    daemon = Daemon(settings, config_path)
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(daemon.run())
    except StorageError as error:
        log.error("cannot start: %s", error)
        return 1
    except OSError as error:
        log.error("cannot listen: %s", error)
        return 1
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
