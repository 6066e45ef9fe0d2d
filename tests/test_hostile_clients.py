"""Hostile or broken clients against the real daemon over real sockets.

The daemon runs in a background thread with its own event loop, so that hypothesis
(synchronous) can drive it with blocking sockets, example after example.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from ipaddress import ip_network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policyd.daemon import Daemon
from tests.conftest import encode_request, make_settings


class BugCollector(logging.Handler):
    """Log records that carry a traceback: an exception the daemon did not expect."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(self.format(record))


class ThreadedDaemon:
    """The daemon in a thread; records anything that escaped a handler or was logged as a bug."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.loop = asyncio.new_event_loop()
        self.escaped: list[str] = []
        self.loop.set_exception_handler(lambda _, context: self.escaped.append(str(context)))
        self.bugs = BugCollector()
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.daemon.run(ready=lambda _: self.started.set()))
        except BaseException as error:  # reported by start()
            self.error = error
            self.started.set()

    def start(self) -> None:
        logging.getLogger("policyd").addHandler(self.bugs)
        self.thread.start()
        assert self.started.wait(15), "daemon did not start"
        if self.error:
            raise self.error

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.daemon.stopping.set)
        self.thread.join(20)
        logging.getLogger("policyd").removeHandler(self.bugs)
        assert not self.thread.is_alive(), "daemon did not stop"
        assert self.escaped == [], self.escaped
        assert self.bugs.records == [], self.bugs.records

    @property
    def port(self) -> int:
        assert self.daemon.server is not None
        return int(self.daemon.server.addresses[0].rsplit(":", 1)[1])


@contextlib.contextmanager
def threaded_daemon(tmp_path: Path, **changes: object) -> Iterator[ThreadedDaemon]:
    settings = make_settings(f"sqlite://{tmp_path}/policyd.sqlite", **changes)
    running = ThreadedDaemon(Daemon(settings, config_path=None))
    running.start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedDaemon]:
    with threaded_daemon(tmp_path_factory.mktemp("hostile"), max_connections=5000) as running:
        yield running


def ask(port: int, payload: bytes | None = None, timeout: float = 5.0, **attributes: object) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload if payload is not None else encode_request(**attributes))
        return read_reply(sock)


def read_reply(sock: socket.socket) -> str:
    """One reply, read byte by byte so that nothing of the next one is consumed."""
    reply = b""
    while not reply.endswith(b"\n\n"):
        byte = sock.recv(1)
        assert byte, f"connection closed after {reply!r}"
        reply += byte
    text = reply.decode()
    assert text.startswith("action="), text
    return text[len("action=") : -2]


def send_and_drain(port: int, garbage: bytes) -> bytes:
    """Send bytes, half-close, and read whatever comes back until the daemon closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        with contextlib.suppress(OSError):  # the daemon may close before all is sent
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
        received = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                received += chunk
        return received


# ---------------------------------------------------------------------------
# fuzzing: whatever arrives, no exception escapes, no hang, the next client is served
# ---------------------------------------------------------------------------

ATTRIBUTE_NAMES = st.sampled_from(
    ["request", "protocol_state", "sasl_username", "sender", "recipient_count", "client_address", "x"]
)
LINE = st.one_of(
    st.binary(max_size=80),
    st.tuples(ATTRIBUTE_NAMES, st.binary(max_size=40)).map(lambda pair: pair[0].encode() + b"=" + pair[1]),
)
GARBAGE = st.one_of(
    st.binary(max_size=2000),
    st.lists(LINE, max_size=20).map(lambda lines: b"\n".join(lines) + b"\n\n"),
    st.lists(LINE, max_size=20).map(b"\n".join),  # half a request
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=GARBAGE)
def test_garbage_never_breaks_the_daemon(daemon: ThreadedDaemon, garbage: bytes) -> None:
    received = send_and_drain(daemon.port, garbage)
    # Whatever came back is only well-formed replies (a garbage request that happens to be
    # valid gets a real answer).
    for reply in filter(None, received.split(b"\n\n")):
        assert reply.startswith(b"action="), received
    assert ask(daemon.port, sasl_username="") == "DUNNO"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cuts=st.lists(st.integers(min_value=1, max_value=400), min_size=1, max_size=12),
    user=st.text(
        alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=30
    ),
)
def test_valid_requests_in_any_slicing_are_answered(
    daemon: ThreadedDaemon, cuts: list[int], user: str
) -> None:
    payload = encode_request(sasl_username=user.strip() or "x", recipient_count=0) * 3
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        position = 0
        for cut in cuts:
            sock.sendall(payload[position : position + cut])
            position += cut
            time.sleep(0.001)
        sock.sendall(payload[position:])
        answers = [read_reply(sock) for _ in range(3)]
    assert answers == ["DUNNO"] * 3


# ---------------------------------------------------------------------------
# many and slow clients: the others keep normal latency
# ---------------------------------------------------------------------------


def latency_of_one_request(port: int) -> float:
    started = time.monotonic()
    assert ask(port, sasl_username="") == "DUNNO"
    return time.monotonic() - started


def test_thousands_of_idle_connections(daemon: ThreadedDaemon) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2000
    if soft < wanted + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted + 500), hard))
    idle = []
    try:
        for _ in range(wanted):
            idle.append(socket.create_connection(("127.0.0.1", daemon.port), timeout=5))
        time.sleep(0.3)
        worst = max(latency_of_one_request(daemon.port) for _ in range(20))
    finally:
        for sock in idle:
            sock.close()
    assert worst < 0.5, f"a request took {worst:.3f}s beside {wanted} idle connections"


def test_slow_and_vanishing_clients_do_not_slow_others(daemon: ThreadedDaemon) -> None:
    slow = [socket.create_connection(("127.0.0.1", daemon.port), timeout=5) for _ in range(50)]
    try:
        request = encode_request()
        worst = 0.0
        for position in range(20):  # each slow client sends one more byte, many times a second
            for sock in slow:
                sock.sendall(request[position : position + 1])
            worst = max(worst, latency_of_one_request(daemon.port))
        # Half of them vanish mid-request with a reset, the rest with a plain close.
        for index, sock in enumerate(slow):
            if index % 2:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        worst = max(worst, *(latency_of_one_request(daemon.port) for _ in range(10)))
    finally:
        for sock in slow:
            sock.close()
    assert worst < 0.5, f"a request took {worst:.3f}s beside slow clients"


def test_oversized_input_is_refused_without_buffering_it(daemon: ThreadedDaemon) -> None:
    # 8 MB with no newline: refused as soon as the first line passes its limit.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
        sent = 0
        with contextlib.suppress(OSError):
            while sent < 8 * 1024 * 1024:
                sock.sendall(b"a" * 65536)
                sent += 65536
        assert sent < 8 * 1024 * 1024, "the daemon kept reading an endless line"
    assert latency_of_one_request(daemon.port) < 0.5


# ---------------------------------------------------------------------------
# who may connect, and how many
# ---------------------------------------------------------------------------


def test_clients_outside_allowed_networks_are_closed_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    with threaded_daemon(tmp_path, allowed_clients=(ip_network("127.0.0.2/32"),)) as running:
        # 127.0.0.1 is not allowed: closed without an answer.
        assert send_and_drain(running.port, encode_request()) == b""
        with socket.socket() as sock:
            sock.bind(("127.0.0.2", 0))
            sock.settimeout(5)
            sock.connect(("127.0.0.1", running.port))
            sock.sendall(encode_request())
            assert read_reply(sock) == "DUNNO"
    assert "connection from 127.0.0.1 refused: not in allowed_clients" in caplog.text


def test_connections_beyond_max_connections_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    with threaded_daemon(tmp_path, max_connections=5) as running:
        held = [socket.create_connection(("127.0.0.1", running.port), timeout=5) for _ in range(5)]
        try:
            held[0].sendall(encode_request())
            assert read_reply(held[0]) == "DUNNO"
            assert send_and_drain(running.port, encode_request()) == b""
        finally:
            for sock in held:
                sock.close()
        time.sleep(0.2)
        assert ask(running.port) == "DUNNO"  # room again once they are gone
    assert "max_connections is 5" in caplog.text


def test_database_password_never_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "policyd")
    closed_port = socket.socket()
    closed_port.bind(("127.0.0.1", 0))
    port = closed_port.getsockname()[1]
    closed_port.close()  # nothing listens there: the database is "down"
    settings = make_settings(f"postgresql://policyd:s3cret-PW@127.0.0.1:{port}/policyd", db_timeout=0.3)
    settings = replace(settings, spool=str(tmp_path / "spool"))
    running = ThreadedDaemon(Daemon(settings, config_path=None))
    running.start()
    try:
        assert ask(running.port) == "DUNNO"  # unknown user, database down: db_error_action
    finally:
        running.stop()
    assert "cannot open the database" in caplog.text
    assert "s3cret-PW" not in caplog.text
