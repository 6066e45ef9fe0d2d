"""sd_notify: the exact datagrams systemd would read, on real unix sockets."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest

from policyd import systemd


class Listener:
    """What systemd does: a unix datagram socket whose address goes into NOTIFY_SOCKET."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def receive(self) -> str:
        return self.sock.recv(65536).decode()

    def assert_nothing_received(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(65536)
        finally:
            self.sock.setblocking(True)


@pytest.fixture
def path_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    # A short private dir: pytest's tmp_path can exceed the 108-byte limit of unix socket paths.
    directory = tempfile.mkdtemp(prefix="policyd-notify-")
    path = os.path.join(directory, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        try:
            yield Listener(sock, path)
        finally:
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def abstract_listener(monkeypatch: pytest.MonkeyPatch) -> Iterator[Listener]:
    name = f"policyd-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield Listener(sock, "@" + name)


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest) -> Listener:
    found: Listener = request.getfixturevalue(f"{request.param}_listener")
    return found


def test_ready_with_status(listener: Listener) -> None:
    assert systemd.ready("listening on 127.0.0.1:9093") is True
    assert listener.receive() == "READY=1\nSTATUS=listening on 127.0.0.1:9093"


def test_ready_without_status(listener: Listener) -> None:
    assert systemd.ready() is True
    assert listener.receive() == "READY=1"


def test_each_helper_sends_exactly_its_message(listener: Listener) -> None:
    assert systemd.status("12 requests answered") is True
    assert listener.receive() == "STATUS=12 requests answered"
    assert systemd.watchdog_ping() is True
    assert listener.receive() == "WATCHDOG=1"
    assert systemd.stopping() is True
    assert listener.receive() == "STOPPING=1"
    assert systemd.notify("STATUS=a", "ERRNO=5") is True
    assert listener.receive() == "STATUS=a\nERRNO=5"
    listener.assert_nothing_received()


def test_reloading_carries_the_monotonic_clock(listener: Listener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, stamp = listener.receive().split("\n")
    assert reloading == "RELOADING=1"
    key, value = stamp.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_stays_one_line(listener: Listener) -> None:
    # A newline would start a new KEY=value line: a status text must not smuggle one in.
    assert systemd.status("first\nREADY=1\0x") is True
    assert listener.receive() == "STATUS=first READY=1 x"


def test_non_ascii_is_sent_as_utf8(listener: Listener) -> None:
    assert systemd.status("quota für müller") is True
    assert listener.receive() == "STATUS=quota für müller"


@pytest.mark.parametrize("value", [None, "", "@", "vsock:2:1234", "relative/path"])
def test_no_op_without_a_usable_notify_socket(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False
    assert systemd.stopping() is False
    assert systemd.status("x") is False
    assert systemd.watchdog_ping() is False
    assert systemd.reloading() is False


def test_no_lines_sends_nothing(path_listener: Listener) -> None:
    assert systemd.notify() is False
    path_listener.assert_nothing_received()


def test_socket_errors_return_false(monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tempfile.mkdtemp(prefix="policyd-notify-")
    try:
        # nobody listening at that path (systemd gone): ENOENT
        monkeypatch.setenv("NOTIFY_SOCKET", os.path.join(directory, "gone"))
        assert systemd.ready() is False
        # a path that exists but is a directory: ECONNREFUSED
        monkeypatch.setenv("NOTIFY_SOCKET", directory)
        assert systemd.ready() is False
        # a stream socket, not a datagram one: EPROTOTYPE
        stream_path = os.path.join(directory, "stream")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stream:
            stream.bind(stream_path)
            stream.listen()
            monkeypatch.setenv("NOTIFY_SOCKET", stream_path)
            assert systemd.ready() is False
        # a path longer than a unix socket address can hold
        monkeypatch.setenv("NOTIFY_SOCKET", "/" + "x" * 200)
        assert systemd.ready() is False
        # an abstract name nobody bound
        monkeypatch.setenv("NOTIFY_SOCKET", f"@policyd-test-nobody-{os.getpid()}-{time.monotonic_ns()}")
        assert systemd.ready() is False
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_oversized_message_returns_false(path_listener: Listener) -> None:
    assert systemd.status("x" * 10_000_000) is False
    path_listener.assert_nothing_received()


# ---------------------------------------------------------------------------
# watchdog_interval: sd_watchdog_enabled(3)
# ---------------------------------------------------------------------------


@pytest.fixture
def watchdog_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return monkeypatch


def test_watchdog_disabled_when_unset(watchdog_env: pytest.MonkeyPatch) -> None:
    assert systemd.watchdog_interval() is None


def test_watchdog_half_the_interval(watchdog_env: pytest.MonkeyPatch) -> None:
    watchdog_env.setenv("WATCHDOG_USEC", "30000000")  # WatchdogSec=30
    assert systemd.watchdog_interval() == 15.0
    watchdog_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    watchdog_env.setenv("WATCHDOG_USEC", "1")
    assert systemd.watchdog_interval() == 0.0000005


def test_watchdog_for_another_pid(watchdog_env: pytest.MonkeyPatch) -> None:
    # e.g. a shell wrapper that got the watchdog and then started us: not ours to ping
    watchdog_env.setenv("WATCHDOG_USEC", "30000000")
    watchdog_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None


@pytest.mark.parametrize(
    ("usec", "pid"),
    [
        ("", None),
        ("0", None),
        ("-5", None),
        ("abc", None),
        ("30s", None),
        ("30000000", ""),
        ("30000000", "x"),
    ],
)
def test_watchdog_bad_values(watchdog_env: pytest.MonkeyPatch, usec: str, pid: str | None) -> None:
    watchdog_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        watchdog_env.setenv("WATCHDOG_PID", pid)
    assert systemd.watchdog_interval() is None
