"""Alerts against real receivers: an SMTP server (the e2e rig's sink) and an HTTP server
on loopback.  Told once per incident, at HOLD and once more at REJECT, with what the
admin needs; with two daemons on one database, told by one of them only."""

from __future__ import annotations

import contextlib
import email
import email.policy
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

import policyd.alerts.alerter
from tests.conftest import PolicyClient, encode_request, make_settings, run_daemon
from tests.e2e.postfix_rig import BackgroundLoop, SmtpSink


@pytest.fixture(autouse=True)
def quick_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policyd.alerts.alerter, "BATCH_SECONDS", 0.3)
    monkeypatch.setattr(policyd.alerts.alerter, "RETRY_SECONDS", 0.2)


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    loop = BackgroundLoop()
    sink = SmtpSink(loop)
    sink.start()
    try:
        yield sink
    finally:
        sink.stop()
        loop.close()


class Hook:
    """An HTTP server taking JSON POSTs (a Slack/Mattermost incoming webhook's part)."""

    def __init__(self) -> None:
        self.posts: list[dict[str, Any]] = []
        self.failures_left = 0
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if hook.failures_left:
                    hook.failures_left -= 1
                    self.send_response(503)
                else:
                    hook.posts.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/s3cr3t-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hook() -> Iterator[Hook]:
    server = Hook()
    try:
        yield server
    finally:
        server.close()


async def send(client: PolicyClient, recipients: int, queue_id: str, user: str = "alice") -> str:
    client.writer.write(
        encode_request(
            sasl_username=user,
            recipient_count=recipients,
            queue_id=queue_id,
            sender=f"{user}-{queue_id}@example.org" if queue_id.endswith("X") else f"{user}@example.org",
            client_address="203.0.113.9" if queue_id.endswith("X") else "192.0.2.10",
        )
    )
    return await client.read_reply()


async def wait_for(condition: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        await _sleep(0.05)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def mails(sink: SmtpSink) -> list[email.message.EmailMessage]:
    return [
        email.message_from_bytes(message.data, policy=email.policy.default)  # type: ignore[misc]
        for message in sink.messages
    ]


async def test_a_mail_at_hold_and_one_at_reject_with_what_to_do(smtp_sink: SmtpSink, tmp_path: Path) -> None:
    settings = make_settings(
        f"sqlite://{tmp_path}/policyd.sqlite",
        quota=10,
        reject_quota=20,
        alert_mail_to=("postmaster@example.org",),
        alert_mail_from="policyd@relay.example.org",
        alert_smtp=("127.0.0.1", smtp_sink.port),
        http_listen=("127.0.0.1", 0),
    )
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        assert await send(client, 6, "Q1") == "DUNNO"
        assert await send(client, 3, "Q2X") == "DUNNO"  # 9: another sender, another address
        assert await send(client, 2, "Q3") == "HOLD quota exceeded"  # 11: the incident starts
        assert await send(client, 1, "Q4") == "HOLD quota exceeded"  # 12: the same incident
        await wait_for(lambda: len(smtp_sink.messages) == 1)
        assert await send(client, 9, "Q5") == "REJECT max quota exceeded"  # 21: raised once
        await wait_for(lambda: len(smtp_sink.messages) == 2)
        assert await send(client, 1, "Q6") == "HOLD quota exceeded"
        await _sleep(1.0)
        await client.close()
    hold, reject = mails(smtp_sink)
    assert len(smtp_sink.messages) == 2, "told once at HOLD and once at REJECT, nothing more"
    assert hold["To"] == "postmaster@example.org"
    assert hold["From"] == "policyd@relay.example.org"
    assert "alice over " in hold["Subject"] and "(HOLD)" in hold["Subject"]
    assert "(REJECT)" in reject["Subject"]
    text = hold.get_content()  # what was recorded when it was written (12 by then)
    assert "reached HOLD of" in text and ": 11 recipients" in text
    assert "senders: alice@example.org (9), alice-Q2X@example.org (3)" in text
    assert "client addresses: 192.0.2.10 (9), 203.0.113.9 (3)" in text
    assert "held so far: 2 messages: Q3 Q4" in text
    assert "status page: http://127.0.0.1:0/user?name=alice" in text
    for command in ("policyd user alice", "policyd held alice", "policyd block alice", "policyd reset alice"):
        assert command in text


async def test_a_webhook_gets_json_and_a_failing_one_is_retried(hook: Hook, tmp_path: Path) -> None:
    hook.failures_left = 1
    settings = make_settings(
        f"sqlite://{tmp_path}/policyd.sqlite", quota=5, reject_quota=50, alert_webhook=hook.url
    )
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        assert await send(client, 7, "W1", user="bob") == "HOLD quota exceeded"
        await wait_for(lambda: len(hook.posts) == 1)
        await client.close()
        described = dict(daemon.daemon.settings.describe())
    [post] = hook.posts
    assert post["text"].startswith("policyd on ") and "bob over " in post["text"]
    [user] = post["users"]
    assert user["user"] == "bob"
    assert user["crossings"][0]["level"] == "HOLD" and user["crossings"][0]["total"] == 7
    assert user["held_queue_ids"] == ["W1"]
    assert described["alert_webhook"] == "http://127.0.0.1 (path hidden)"  # the token is a secret


async def test_a_storm_is_one_notice(smtp_sink: SmtpSink, tmp_path: Path) -> None:
    settings = make_settings(
        f"sqlite://{tmp_path}/policyd.sqlite",
        quota=5,
        reject_quota=50,
        alert_mail_to=("postmaster@example.org",),
        alert_smtp=("127.0.0.1", smtp_sink.port),
    )
    async with run_daemon(settings) as daemon:
        client = await daemon.client()
        for number in range(30):
            assert await send(client, 6, f"S{number}", user=f"user{number}") == "HOLD quota exceeded"
        await wait_for(lambda: len(smtp_sink.messages) >= 1)
        await _sleep(0.8)
        await client.close()
    [notice] = mails(smtp_sink)
    assert notice["Subject"].endswith("30 users over a limit")
    assert "... and 10 more:" in notice.get_content()


async def test_two_daemons_on_one_database_tell_once(smtp_sink: SmtpSink, tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/policyd.sqlite"
    common: dict[str, Any] = {
        "quota": 10,
        "reject_quota": 100,
        "alert_mail_to": ("postmaster@example.org",),
        "alert_smtp": ("127.0.0.1", smtp_sink.port),
    }
    async with contextlib.AsyncExitStack() as stack:
        daemons = [
            await stack.enter_async_context(
                run_daemon(make_settings(url, spool=f"{tmp_path}/spool{n}", **common))
            )
            for n in range(2)
        ]
        clients = [await daemon.client() for daemon in daemons]
        assert await send(clients[0], 11, "D1") == "HOLD quota exceeded"
        await _sleep(0.6)  # the other daemon's tail has the row: it is over the limit too
        assert await send(clients[1], 1, "D2") == "HOLD quota exceeded"
        await wait_for(lambda: len(smtp_sink.messages) >= 1)
        await _sleep(1.0)
        for client in clients:
            await client.close()
    assert len(smtp_sink.messages) == 1, [m["Subject"] for m in mails(smtp_sink)]
