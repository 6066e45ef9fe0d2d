"""The Postfix rig itself works: mail flows through a real Postfix to the sink,
and the policy answers (DUNNO, HOLD, REJECT, none at all) have the effects
policyd relies on. Uses a tiny in-test policy server, not policyd.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

try:
    from tests.e2e.postfix_rig import BackgroundLoop, PostfixRig, free_port
except ImportError:  # tests/e2e is not a package: pytest put tests/e2e on sys.path
    from postfix_rig import BackgroundLoop, PostfixRig, free_port  # type: ignore[no-redef,import-not-found]

pytestmark = pytest.mark.postfix

USERS = {"alice": "alice-pw", "held": "held-pw", "rejected": "rejected-pw"}
ACTIONS = {"held": "HOLD over quota (test)", "rejected": "REJECT over quota (test)"}
RigFactory = Callable[..., PostfixRig]


class PolicyServer:
    """Answers ``action=<ACTIONS[sasl_username]>`` (default DUNNO) and records
    every request and connection. Listens on 127.0.0.1 or on a unix socket."""

    def __init__(self, bg: BackgroundLoop, unix_path: str | None = None) -> None:
        self.bg = bg
        self.requests: list[dict[str, str]] = []
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        if unix_path:
            self.server = bg.run(asyncio.start_unix_server(self._handle, unix_path))
            os.chmod(unix_path, 0o666)  # smtpd runs as the postfix user
            self.target = f"unix:{unix_path}"
        else:
            self.server = bg.run(asyncio.start_server(self._handle, "127.0.0.1", 0))
            self.target = f"inet:127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            request: dict[str, str] = {}
            while line := await reader.readline():
                if line.strip():
                    name, _, value = line.decode().rstrip("\n").partition("=")
                    request[name] = value
                    continue
                self.requests.append(request)
                action = ACTIONS.get(request.get("sasl_username", ""), "DUNNO")
                writer.write(f"action={action}\n\n".encode())
                await writer.drain()
                request = {}
        finally:
            self._writers.discard(writer)
            writer.close()

    def close(self) -> None:
        async def _close() -> None:
            self.server.close()
            for w in list(self._writers):
                w.close()
            await self.server.wait_closed()

        self.bg.run(_close())


@pytest.fixture(scope="module")
def bg() -> Iterator[BackgroundLoop]:
    loop = BackgroundLoop()
    yield loop
    loop.close()


@pytest.fixture
def policy(bg: BackgroundLoop) -> Iterator[PolicyServer]:
    server = PolicyServer(bg)
    yield server
    server.close()


def test_authenticated_mail_is_delivered(postfix_rig: RigFactory, policy: PolicyServer) -> None:
    rig = postfix_rig(policy.target, users=USERS)
    result = rig.send("alice", "alice-pw", "alice@example.test", ["bob@example.org", "carol@example.net"])
    assert result.accepted, result
    assert result.queue_id

    (msg,) = rig.wait_delivered(1)
    assert sorted(msg.recipients) == ["bob@example.org", "carol@example.net"]
    assert msg.sender == "alice@example.test"
    (req,) = policy.requests
    assert req["request"] == "smtpd_access_policy"
    assert req["protocol_state"] == "END-OF-MESSAGE"
    assert req["sasl_username"] == "alice"
    assert req["recipient_count"] == "2"
    assert req["queue_id"] == result.queue_id


def test_auth_is_required_on_submission(postfix_rig: RigFactory, policy: PolicyServer) -> None:
    rig = postfix_rig(policy.target, users=USERS)
    no_auth = rig.send(None, None, "x@example.test", ["bob@example.org"])
    assert (no_auth.stage, no_auth.code) == ("rcpt", 554), no_auth
    bad_password = rig.send("alice", "wrong", "alice@example.test", ["bob@example.org"])
    assert (bad_password.stage, bad_password.code) == ("auth", 535), bad_password
    rig.add_user("dave", "dave-pw")  # live: Dovecot re-reads its passwd-file
    assert rig.send("dave", "dave-pw", "dave@example.test", ["bob@example.org"]).accepted
    rig.wait_delivered(1)


def test_hold_goes_to_hold_queue_until_released(postfix_rig: RigFactory, policy: PolicyServer) -> None:
    rig = postfix_rig(policy.target, users=USERS)
    result = rig.send("held", "held-pw", "held@example.test", ["bob@example.org"])
    assert result.accepted, result  # HOLD still answers 250: the message is queued
    (queued,) = rig.held()
    assert queued.queue_id == result.queue_id
    assert queued.recipients == ("bob@example.org",)
    rig.wait_log(rf"{result.queue_id}: hold: .*over quota \(test\)")
    time.sleep(0.5)
    assert rig.delivered == []

    rig.release_held()
    rig.flush()
    (msg,) = rig.wait_delivered(1)
    assert msg.recipients == ("bob@example.org",)
    rig.wait_queue(lambda q: q == [])


def test_reject_reaches_the_client_with_policy_text(postfix_rig: RigFactory, policy: PolicyServer) -> None:
    rig = postfix_rig(policy.target, users=USERS)
    result = rig.send("rejected", "rejected-pw", "r@example.test", ["bob@example.org"])
    assert not result.accepted
    assert result.stage == "end-of-data"
    assert 500 <= result.code < 600, result
    assert "over quota (test)" in result.text
    assert rig.queue() == []
    assert rig.delivered == []


def test_data_stage_restriction(postfix_rig: RigFactory, policy: PolicyServer) -> None:
    rig = postfix_rig(policy.target, users=USERS, stage="smtpd_data_restrictions")
    result = rig.send("rejected", "rejected-pw", "r@example.test", ["bob@example.org"])
    assert (result.stage, result.code) == ("data", 554), result
    assert "over quota (test)" in result.text
    assert rig.send("alice", "alice-pw", "alice@example.test", ["bob@example.org"]).accepted
    rig.wait_delivered(1)
    assert [r["protocol_state"] for r in policy.requests] == ["DATA", "DATA"]


def test_unauthenticated_port_relays_without_sasl_username(
    postfix_rig: RigFactory, policy: PolicyServer
) -> None:
    rig = postfix_rig(policy.target, users=USERS)
    result = rig.send(None, None, "app@example.test", ["bob@example.org"], port="plain")
    assert result.accepted, result
    rig.wait_delivered(1)
    (req,) = policy.requests
    assert req["sasl_username"] == ""
    assert req["client_address"] == "127.0.0.1"


def test_policy_down_gives_451(postfix_rig: RigFactory) -> None:
    rig = postfix_rig(f"inet:127.0.0.1:{free_port()}", users=USERS)  # nothing listens there
    result = rig.send("alice", "alice-pw", "alice@example.test", ["bob@example.org"])
    assert (result.code, result.stage) == (451, "end-of-data"), result
    assert result.text.startswith("4.3.5")
    assert rig.queue() == []


def test_policy_down_with_default_action_dunno_lets_mail_through(postfix_rig: RigFactory) -> None:
    dead = f"inet:127.0.0.1:{free_port()}"
    rig = postfix_rig(restriction=f"check_policy_service {{ {dead}, default_action=DUNNO }}", users=USERS)
    assert rig.send("alice", "alice-pw", "alice@example.test", ["bob@example.org"]).accepted
    rig.wait_delivered(1)


def test_policy_connection_is_reused(postfix_rig: RigFactory, policy: PolicyServer) -> None:
    rig = postfix_rig(policy.target, users=USERS)
    with rig.connect("alice", "alice-pw") as client:
        for i in range(3):
            assert client.send("alice@example.test", [f"r{i}@example.org"]).accepted
    assert (len(policy.requests), policy.connections) == (3, 1)
    # Later sessions land on the same (idle) smtpd, which keeps its policy connection.
    for i in range(3):
        assert rig.send("alice", "alice-pw", "alice@example.test", [f"s{i}@example.org"]).accepted
    assert len(policy.requests) == 6
    assert policy.connections < 3, policy.connections
    rig.wait_delivered(6)


def test_unix_socket_policy(postfix_rig: RigFactory, bg: BackgroundLoop) -> None:
    with tempfile.TemporaryDirectory(prefix="pfpol-") as tmp:
        os.chmod(tmp, 0o755)
        server = PolicyServer(bg, unix_path=f"{tmp}/policy.sock")
        try:
            rig = postfix_rig(server.target, users=USERS)
            assert rig.send("alice", "alice-pw", "a@example.test", ["bob@example.org"]).accepted
            assert not rig.send("rejected", "rejected-pw", "r@example.test", ["bob@example.org"]).accepted
            assert [r["sasl_username"] for r in server.requests] == ["alice", "rejected"]
        finally:
            server.close()


def test_reference_policy_server(postfix_rig: RigFactory) -> None:
    """shared/tools/policy-reference-server (answers DUNNO), as a real process."""
    tool = Path(__file__).resolve().parents[3] / "shared" / "tools" / "policy-reference-server"
    if not tool.exists():
        pytest.skip(f"{tool} not found")
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(tool), "--listen", f"127.0.0.1:{port}"])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "reference server did not start"
                time.sleep(0.05)
        rig = postfix_rig(f"inet:127.0.0.1:{port}", users=USERS)
        assert rig.send("alice", "alice-pw", "a@example.test", ["bob@example.org"]).accepted
        rig.wait_delivered(1)
    finally:
        proc.terminate()
        proc.wait(10)


def test_stop_leaves_nothing_behind(postfix_rig: RigFactory) -> None:
    rig = postfix_rig(users=USERS)  # no policy check at all
    assert rig.send("alice", "alice-pw", "a@example.test", ["bob@example.org"]).accepted
    rig.wait_delivered(1)
    assert len(rig.processes()) >= 5  # master, qmgr, pickup, smtpd, ..., dovecot, auth
    root = rig.dir
    rig.stop()
    assert rig.processes() == []
    assert not root.exists()
