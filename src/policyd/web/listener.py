"""The HTTP listener: a small HTTP/1.1 server on the daemon's event loop, GET and HEAD only.

Small on purpose (no framework): it serves four read-only routes to a few admins and a
Prometheus.  Its limits, like the policy listener's, keep a client from making the
daemon do much: a few connections at once, a short request head and no body, a deadline
for each request and each answer, one password check at a time in a thread of its own.
Everything it shows is computed by web/state.py in bounded steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

from policyd.logs import log
from policyd.server import ListenError
from policyd.web import auth

if TYPE_CHECKING:
    from policyd.daemon import Daemon

# Limits, each with its reason.
# A browser opens up to 6 connections to a host, Prometheus one; a few admins at once.
MAX_CONNECTIONS = 16
# The request line and headers: a browser's are well under 2 KiB (cookies aside, and
# the listener sets none).
MAX_HEAD_BYTES = 8192
# A request must arrive whole within this (a slow client holds a connection at most this long).
REQUEST_TIMEOUT_SECONDS = 10.0
# An idle keep-alive connection is closed after this.
IDLE_TIMEOUT_SECONDS = 5.0
# A client that does not read the answer is dropped after this.
WRITE_TIMEOUT_SECONDS = 10.0
# Requests on one connection (keep-alive) at most.
MAX_REQUESTS_PER_CONNECTION = 100
# Pages built at once (each may read the database); the others wait their turn.
PAGES_AT_ONCE = 2
# After a wrong password, the answer waits this long (on top of the hash's own cost).
FAILED_AUTH_DELAY_SECONDS = 0.5

REASONS = {
    200: "OK",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
# No script at all on these pages: even a name that slipped past escaping could not run.
SECURITY_HEADERS = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'; form-action 'self'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # names lowercased

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)


def text_response(status: int, text: str) -> Response:
    return Response(status, text.encode())


Handler = Callable[[Request], Awaitable[Response]]


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class WebListener:
    """The listener and its routes; the pages themselves are in pages.py, metrics.py, health.py."""

    def __init__(self, daemon: Daemon) -> None:
        from policyd.web.health import health_response
        from policyd.web.pages import Pages

        try:
            from policyd.web.metrics import MetricsEndpoint
        except ImportError as error:
            raise ListenError(
                f"http_listen needs prometheus_client ({error}): pip install 'policyd[web]'"
            ) from None
        from policyd.web.state import DatabaseViews, DecisionHistory, WindowScan

        self.daemon = daemon
        self.scan = WindowScan(daemon)
        self.history = DecisionHistory(daemon)
        self.views = DatabaseViews(daemon)
        self.metrics = MetricsEndpoint(daemon, self)
        pages = Pages(daemon, self)
        self.routes: dict[str, Handler] = {
            "/": pages.overview,
            "/user": pages.user,
            "/metrics": self.metrics.handle,
            "/healthz": lambda request: health_response(daemon),
        }
        self.started = time.time()
        self.listener: asyncio.Server | None = None
        self.connections: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.refused = 0
        self._history_task: asyncio.Task[None] | None = None
        self._remembered = auth.Remembered()
        self._remembered_for: tuple[str | None, str | None] = (None, None)
        # Password checks: one at a time, off the event loop.
        self._hasher = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="policyd-web-auth"
        )
        self._last_refusal_log = 0.0
        self._pages = asyncio.Semaphore(PAGES_AT_ONCE)

    @property
    def addresses(self) -> list[str]:
        if self.listener is None:
            return []
        names = []
        for sock in self.listener.sockets:
            host, port = sock.getsockname()[:2]
            names.append(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
        return names

    async def start(self) -> None:
        listen = self.daemon.settings.http_listen
        assert listen is not None
        host, port = listen
        try:
            self.listener = await asyncio.start_server(
                self._serve, host, port, reuse_address=True, limit=MAX_HEAD_BYTES, backlog=64
            )
        except OSError as error:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise ListenError(f"cannot listen on {where} (http_listen): {reason}") from None
        self._history_task = asyncio.create_task(self.history.run(), name="policyd-web-history")

    async def stop(self) -> None:
        if self._history_task is not None:
            self._history_task.cancel()
        if self.listener is not None:
            self.listener.close()
        for task in list(self.connections):
            task.cancel()
        await asyncio.gather(
            *self.connections, *(t for t in [self._history_task] if t), return_exceptions=True
        )
        self._hasher.shutdown(wait=False, cancel_futures=True)

    # -- connections ---------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        peer_ip = peer[0] if isinstance(peer, tuple) else ""
        if not self._allowed(peer_ip):
            self._refuse(writer, f"http: connection from {peer_ip} refused: not in http_allowed_clients")
            return
        if len(self.connections) >= MAX_CONNECTIONS:
            self._refuse(writer, f"http: connection refused: {MAX_CONNECTIONS} open already")
            return
        self.connections.add(task)
        try:
            for number in range(MAX_REQUESTS_PER_CONNECTION):
                keep_open = await self._one_request(reader, writer, first=number == 0)
                if not keep_open:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _allowed(self, peer_ip: str) -> bool:
        try:
            address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.daemon.settings.http_allowed_clients)

    def _refuse(self, writer: asyncio.StreamWriter, reason: str) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log > 10:
            self._last_refusal_log = now
            log.warning("%s (%d refused so far)", reason, self.refused)
        writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool
    ) -> bool:
        """Read one request and answer it; whether the connection stays open."""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS if first else IDLE_TIMEOUT_SECONDS):
                head_start = await reader.read(1) if not first else b""
                if not first and not head_start:
                    return False  # the client closed an idle connection
            async with asyncio.timeout(REQUEST_TIMEOUT_SECONDS):
                head = head_start + await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._send(writer, "GET", text_response(431, "request head too large\n"), keep_open=False)
            return False
        except asyncio.IncompleteReadError:
            return False
        except TimeoutError:
            if first:
                with contextlib.suppress(Exception):
                    await self._send(
                        writer, "GET", text_response(408, "request not complete in time\n"), False
                    )
            return False
        try:
            request = parse_head(head)
        except _Refused as refused:
            await self._send(writer, "GET", text_response(refused.status, f"{refused}\n"), keep_open=False)
            return False
        keep_open = request.headers.get("connection", "").lower() != "close"
        response = await self._answer(request)
        self.requests += 1
        await self._send(writer, request.method, response, keep_open)
        return keep_open

    async def _answer(self, request: Request) -> Response:
        if not await self._authorized(request):
            return Response(
                401,
                b"this policyd asks for a user name and password (http_user)\n",
                headers=[("WWW-Authenticate", 'Basic realm="policyd", charset="UTF-8"')],
            )
        handler = self.routes.get(request.path)
        if handler is None:
            return text_response(404, "not found: try / (status), /metrics or /healthz\n")
        try:
            if request.path in {"/", "/user"}:
                async with self._pages:  # a page reads the database: a few at a time
                    return await handler(request)
            return await handler(request)
        except Exception:
            log.exception("http: %s %s failed", request.method, request.path[:200])
            return text_response(500, "internal error (see the log)\n")

    async def _authorized(self, request: Request) -> bool:
        settings = self.daemon.settings
        if settings.http_user is None or settings.http_password_hash is None:
            return True
        header = request.headers.get("authorization", "")
        if not header:
            return False
        if self._remembered_for != (settings.http_user, settings.http_password_hash):
            # Another user or password since (a reload): what was right is forgotten.
            self._remembered = auth.Remembered()
            self._remembered_for = (settings.http_user, settings.http_password_hash)
        if header in self._remembered:
            return True
        credentials = auth.basic_credentials(header)
        right = False
        if credentials is not None and credentials[0] == settings.http_user:
            loop = asyncio.get_running_loop()
            right = await loop.run_in_executor(
                self._hasher, auth.check_password, credentials[1], settings.http_password_hash
            )
        if right:
            self._remembered.add(header)
            return True
        await asyncio.sleep(FAILED_AUTH_DELAY_SECONDS)
        return False

    async def _send(
        self, writer: asyncio.StreamWriter, method: str, response: Response, keep_open: bool
    ) -> None:
        status = response.status
        lines = [
            f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            f"Connection: {'keep-alive' if keep_open else 'close'}",
            *(f"{name}: {value}" for name, value in (*SECURITY_HEADERS, *response.headers)),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(response.body)
        async with asyncio.timeout(WRITE_TIMEOUT_SECONDS):
            await writer.drain()


def parse_head(head: bytes) -> Request:
    """The request line and headers (raises _Refused with the status to answer)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise _Refused(400, "bad request") from None
    request_line, *header_lines = text[:-4].split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _Refused(400, "bad request line")
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in header_lines:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise _Refused(400, "bad header line")
        headers[name.lower()] = value.strip()
    if method not in {"GET", "HEAD"}:
        raise _Refused(405, "read-only: GET and HEAD only")
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        raise _Refused(413, "no request body is taken")
    if not target.startswith("/"):
        raise _Refused(400, "bad request target")
    split = urlsplit(target)
    try:
        query = parse_qs(split.query, max_num_fields=10)
    except ValueError:
        raise _Refused(400, "too many query fields") from None
    return Request(method, split.path, query, headers)
