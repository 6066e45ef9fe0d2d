"""The policy listener: sockets, connections, their limits, and answering in order.

Each connection reads requests, hands each to the decider and writes the answers back
in order.  Everything else about the process (storage, the window, background tasks,
signals) is daemon.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import stat
import time
from collections import deque
from typing import cast

from policyd.config import Settings
from policyd.decider import Decider
from policyd.logs import log
from policyd.placement import PlacementWarnings
from policyd.protocol import ProtocolError, RequestParser, format_reply
from policyd.quota import RequestValueError, Verdict
from policyd.stats import Stats

# Connection limits, each with its reason.
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
# After SIGTERM, how long requests in flight get to finish.
SHUTDOWN_GRACE_SECONDS = 10.0
# Requests of one connection waiting for their answers at most; a client pipelining
# further is not read from until it has been answered (Postfix sends one at a time).
MAX_REQUESTS_IN_FLIGHT = 64


class Connection(asyncio.Protocol):
    """One client connection: requests in as they arrive, answers out in the same order.

    A protocol, not a stream reader in a task: `data_received` parses what arrived and
    hands each request to the decider, which calls back once the answer may go out (at
    once, or once the event is recorded); answers are written in request order.  No task
    and no future per request.
    """

    def __init__(self, server: PolicyServer) -> None:
        self.server = server
        self.parser = RequestParser()
        self.transport: asyncio.Transport | None = None
        self.peer = "unix-socket"
        self.replies: deque[_Reply] = deque()  # answers not sent yet, in request order
        self.answered = 0
        self.refused = False  # closed at once by the server (allowed_clients, max_connections)
        self.finishing = False  # no more requests read: close once the replies are out
        self.reading = True
        self.write_blocked_since: float | None = None  # the client stopped reading
        # The reaper (PolicyServer._reap) ends the connection past this (monotonic) time,
        # saying why: one check a fraction of a second for all, not a timer per read.
        self.deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
        self.in_request = False  # the deadline is the request's, not the idle one

    @property
    def busy(self) -> bool:
        """Requests in flight: shutdown lets them finish."""
        return bool(self.replies)

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's are not registered as asyncio.Transport subclasses).
        transport = self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        sock = transport.get_extra_info("socket")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.peer = f"{peer[0]}:{peer[1]}"
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not self.server.allowed(peer[0]):
                self._refuse(f"connection from {peer[0]} refused: not in allowed_clients")
                return
        server = self.server
        if len(server.connections) >= server.settings.max_connections:
            self._refuse(
                f"connection refused: {len(server.connections)} open, "
                f"max_connections is {server.settings.max_connections}"
            )
            return
        if server.closing:
            self._refuse("connection refused: shutting down")
            return
        server.stats.connections_accepted += 1
        server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        if self.finishing:
            return
        had_pending = self.parser.pending_bytes > 0
        try:
            requests = self.parser.feed(data)
        except ProtocolError as error:
            log.warning("client %s: %s; closing the connection", self.peer, error)
            self._finish()
            return
        decider = self.server.decider
        arrived = time.monotonic() if requests else 0.0  # one clock read for what arrived together
        placement = self.server.placement
        for request in requests:
            placement.check(request, self.peer)
            reply = _Reply(self, arrived)
            self.replies.append(reply)
            try:
                decider.submit(request, reply.fill)
            except RequestValueError as error:
                self.replies.pop()
                log.warning("client %s: bad request: %s; closing the connection", self.peer, error)
                self._finish()
                return
            except Exception:
                # A bug: say so with the traceback, close this connection, serve the others.
                self.replies.pop()
                log.exception("client %s: unexpected error; closing the connection", self.peer)
                self._finish()
                return
        if self.parser.pending_bytes:
            if requests or not had_pending:
                self.deadline = time.monotonic() + REQUEST_TIMEOUT_SECONDS
                self.in_request = True
        elif requests or had_pending:
            self.deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
            self.in_request = False
        if len(self.replies) >= MAX_REQUESTS_IN_FLIGHT and self.reading and self.transport is not None:
            # A client pipelining far ahead: stop reading until it is answered.
            self.reading = False
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.parser.pending_bytes:
            log.warning(
                "client %s: closed the connection in the middle of a request (%d bytes)",
                self.peer,
                self.parser.pending_bytes,
            )
        # Half-closed (`nc -q1` does that): the answers still go out, then we close.
        self._finish()
        return True

    def pause_writing(self) -> None:
        self.write_blocked_since = time.monotonic()

    def resume_writing(self) -> None:
        self.write_blocked_since = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if exc is not None and not self.refused:
            log.info("client %s: connection lost: %s", self.peer, exc)
        self.replies.clear()

    # -- answers -------------------------------------------------------------------

    def send_ready(self) -> None:
        """Write the answers that are ready, in order (a later one waits for an earlier)."""
        transport = self.transport
        replies = self.replies
        if transport is None or transport.is_closing():
            replies.clear()
            return
        sent = 0
        while replies and replies[0].action is not None:
            transport.write(format_reply(replies.popleft().action or ""))
            sent += 1
        if not sent:
            return
        self.answered += sent
        self.server.requests += sent
        if (self.finishing and not replies) or (self.server.closing and not replies):
            transport.close()
        elif self.answered >= MAX_REQUESTS_PER_CONNECTION and not replies:
            log.warning(
                "client %s: %d requests on one connection, the limit; closing it", self.peer, self.answered
            )
            transport.close()
        elif not self.reading and len(replies) < MAX_REQUESTS_IN_FLIGHT // 2:
            self.reading = True
            transport.resume_reading()

    def _finish(self) -> None:
        """Read no more; close once the answers already due are out."""
        self.finishing = True
        if self.transport is None:
            return
        if self.reading:
            self.reading = False
            with contextlib.suppress(RuntimeError):  # already closing
                self.transport.pause_reading()
        if not self.replies:
            self.transport.close()

    def _refuse(self, reason: str) -> None:
        self.refused = True
        self.server.refused(reason)
        assert self.transport is not None
        self.transport.close()

    def expire(self, now: float) -> None:
        """Called by the reaper: end the connection if it is past its deadline."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.write_blocked_since is not None and now - self.write_blocked_since > WRITE_TIMEOUT_SECONDS:
            log.warning("client %s: does not read its replies; closing the connection", self.peer)
            transport.abort()
        elif not self.replies and now > self.deadline:
            waited = (
                f"request not complete within {REQUEST_TIMEOUT_SECONDS:g}s"
                if self.in_request
                else f"idle for {IDLE_TIMEOUT_SECONDS:g}s"
            )
            log.info("client %s: %s; closing the connection", self.peer, waited)
            transport.close()


class _Reply:
    """One answer to send, once the decider has it."""

    __slots__ = ("action", "arrived", "connection")

    def __init__(self, connection: Connection, arrived: float) -> None:
        self.connection = connection
        self.arrived = arrived  # monotonic: when its request was read
        self.action: str | None = None

    def fill(self, verdict: Verdict) -> None:
        self.action = verdict.action
        connection = self.connection
        connection.server.stats.request_seconds.observe(time.monotonic() - self.arrived)
        connection.send_ready()


class PolicyServer:
    """Listeners and the connections they accepted."""

    def __init__(self, settings: Settings, decider: Decider, stats: Stats) -> None:
        self.settings = settings
        self.decider = decider
        self.stats = stats
        self.placement = PlacementWarnings()  # requests that tell the check is misplaced
        self.listeners: list[asyncio.Server] = []
        self.connections: set[Connection] = set()
        self.requests = 0
        self.closing = False
        self._drained = asyncio.Event()  # shutting down and nothing left to answer
        self._reaper: asyncio.Task[None] | None = None
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
        loop = asyncio.get_running_loop()
        self._reaper = asyncio.create_task(self._reap(), name="policyd-reaper")
        settings = self.settings
        where = (
            f"[{settings.bind}]:{settings.port}"
            if ":" in settings.bind
            else f"{settings.bind}:{settings.port}"
        )
        try:
            self.listeners.append(
                await loop.create_server(
                    lambda: Connection(self), settings.bind, settings.port, reuse_address=True, backlog=1024
                )
            )
            if settings.socket:
                where = settings.socket
                _remove_stale_socket(settings.socket)
                self.listeners.append(
                    await loop.create_unix_server(lambda: Connection(self), settings.socket)
                )
                os.chmod(settings.socket, settings.socket_mode)
        except OSError as error:
            raise ListenError(f"cannot listen on {where}: {_reason(error, where)}") from None

    def allowed(self, peer_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.settings.allowed_clients)

    def refused(self, reason: str) -> None:
        """Count a refused connection; log the first and then at most one line per 10s."""
        self.stats.connections_refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log > 10:
            self._last_refusal_log = now
            log.warning("%s (%d refused so far)", reason, self.stats.connections_refused)

    def answered_all(self) -> None:
        """While shutting down: note when no connection has anything left to answer."""
        if self.closing and not any(connection.busy for connection in self.connections):
            self._drained.set()

    async def _reap(self) -> None:
        """End connections idle (or in the middle of a request, or not reading) too long."""
        while True:
            await asyncio.sleep(min(1.0, REQUEST_TIMEOUT_SECONDS / 4))
            now = time.monotonic()
            for connection in list(self.connections):
                connection.expire(now)

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        """Stop accepting, let requests in flight finish (bounded), close the rest."""
        if self._reaper is not None:
            self._reaper.cancel()
        for listener in self.listeners:
            listener.close()
        self.closing = True
        for connection in list(self.connections):
            if not connection.busy and connection.transport is not None:
                connection.transport.close()  # idle: it ends quietly
        self.answered_all()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await self._drained.wait()  # each busy one closes itself after its answers
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        await asyncio.sleep(0)  # let connection_lost run
        if self.settings.socket:
            _remove_stale_socket(self.settings.socket)


class ListenError(Exception):
    """The policy listener could not be opened; the message says where and why."""


def _reason(error: OSError, where: str) -> str:
    # Not error.strerror: asyncio puts the address in it, which the message has already.
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno == errno.ENOENT and where.startswith("/"):
        return f"{reason} (does {os.path.dirname(where) or '/'} exist?)"
    if error.errno == errno.EADDRINUSE:
        return f"{reason} (is another policyd or go-policyd running? see: ss -ltnp)"
    if error.errno == errno.EACCES and not where.startswith("/"):
        return f"{reason} (ports below 1024 need root or CAP_NET_BIND_SERVICE)"
    if error.errno == errno.EADDRNOTAVAIL:
        return f"{reason} (no interface of this host has that address: check bind)"
    return reason


def _remove_stale_socket(path: str) -> None:
    """Remove a unix socket left by a previous run (never a regular file)."""
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)
