"""The policy listener: sockets, connections, their limits, and answering in order.

Each connection reads requests, hands each to the decider and writes the answers back
in order.  Everything else about the process (storage, the window, background tasks,
signals) is daemon.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import stat
import time

from policyd.config import Settings
from policyd.decider import Decider
from policyd.logs import log
from policyd.protocol import ProtocolError, RequestParser, format_reply
from policyd.quota import RequestValueError
from policyd.stats import Stats

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
# After SIGTERM, how long requests in flight get to finish.
SHUTDOWN_GRACE_SECONDS = 10.0


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
        decider = self.server.decider
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
                        verdict = await decider.decide(request)
                        writer.write(format_reply(verdict.action))
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

    def __init__(self, settings: Settings, decider: Decider, stats: Stats) -> None:
        self.settings = settings
        self.decider = decider
        self.stats = stats
        self.listeners: list[asyncio.Server] = []
        self.connections: dict[asyncio.Task[None], Connection] = {}
        self.requests = 0
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
        self.stats.connections_accepted += 1
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
        self.stats.connections_refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log > 10:
            self._last_refusal_log = now
            log.warning("%s (%d refused so far)", reason, self.stats.connections_refused)
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
