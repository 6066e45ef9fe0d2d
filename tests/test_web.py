"""The HTTP listener (web/): /metrics, /healthz, the pages' HTML, its limits, auth, config keys.

Every test runs the real daemon (SQLite) with http_listen on an ephemeral port and talks
to it over real sockets.  The browser's view of the pages is tests/test_web_browser.py.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import platform
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from policyd import __version__
from policyd.cli import main
from policyd.clock import to_ms
from policyd.config import ConfigError, Settings, settings_from_text
from policyd.quota import Outcome, QuotaRules
from policyd.storage import create_storage
from policyd.web import auth, listener
from policyd.web.pages import back_under_quota
from tests.conftest import FakeClock, RunningDaemon, count_rows, http_get, make_settings, run_daemon

LOOPBACK_ANY_PORT = ("127.0.0.1", 0)


def web_settings(tmp_path: Path, **changes: Any) -> Settings:
    changes.setdefault("http_listen", LOOPBACK_ANY_PORT)
    return make_settings(f"sqlite://{tmp_path}/policyd.sqlite", quota=10, reject_quota=20, **changes)


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[RunningDaemon]:
    async with run_daemon(web_settings(tmp_path)) as running:
        yield running


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_off_by_default(tmp_path: Path) -> None:
    assert Settings().http_listen is None
    async with run_daemon(make_settings(f"sqlite://{tmp_path}/p.sqlite")) as running:
        assert running.daemon.web is None


async def test_metrics_count_what_the_daemon_did(daemon: RunningDaemon, tmp_path: Path) -> None:
    client = await daemon.client()
    answers = [await client.ask(sasl_username="alice", recipient_count=4) for _ in range(6)]
    # 4, 8, 12, 16 counted; 20 and 20 again rejected (not counted: count_rejected = no)
    assert [answer.split()[0] for answer in answers] == ["DUNNO", "DUNNO", "HOLD", "HOLD", "REJECT", "REJECT"]
    await client.ask(sasl_username="bob", recipient_count=1)
    await client.ask(protocol_state="RCPT", sasl_username="bob")
    await client.close()
    assert daemon.daemon.writer is not None
    await asyncio.wait_for(daemon.daemon.writer.caught_up.wait(), 5)
    for _ in range(50):  # the writer counts a batch once it is committed
        if daemon.daemon.stats.events_written == 7:
            break
        await asyncio.sleep(0.02)

    answer = await http_get(daemon.web_url + "/metrics")
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    values = samples(answer.text)
    limit = "10/24h"
    # DUNNO: 2 alice, 1 bob, and bob's RCPT request (not a counting stage)
    assert values["policyd_decisions_total", (("action", "DUNNO"), ("limit", ""))] == 4
    assert values["policyd_decisions_total", (("action", "HOLD"), ("limit", limit))] == 2
    assert values["policyd_decisions_total", (("action", "REJECT"), ("limit", limit))] == 2
    assert values["policyd_requests_total", (("protocol_state", "END-OF-MESSAGE"),)] == 7
    assert values["policyd_requests_total", (("protocol_state", "RCPT"),)] == 1
    assert values["policyd_request_duration_seconds_count", ()] == 8
    assert values["policyd_request_duration_seconds_bucket", (("le", "+Inf"),)] == 8
    written = await count_rows(f"sqlite://{tmp_path}/policyd.sqlite")
    assert written == 7
    assert values["policyd_events_written_total", ()] == written
    assert values["policyd_database_write_batch_events_sum", ()] == written
    assert values["policyd_events_dropped_total", ()] == 0
    assert values["policyd_users_over_limit", (("state", "rejected"),)] == 1  # alice: rejected in the window
    assert values["policyd_users_over_limit", (("state", "held"),)] == 0
    assert values["policyd_window_users", ()] == 2
    assert values["policyd_connections_open", ()] == 0
    assert values["policyd_database_up", ()] == 1
    assert values["policyd_outage", ()] == 0
    assert values["policyd_healthy", ()] == 1
    assert (
        values["policyd_build_info", (("python", platform.python_version()), ("version", __version__))] == 1
    )
    assert values["policyd_limit_recipients", (("limit", limit), ("threshold", "hold"))] == 10


async def test_counters_only_grow_between_scrapes(daemon: RunningDaemon) -> None:
    client = await daemon.client()
    first = samples((await http_get(daemon.web_url + "/metrics")).text)
    await client.ask(sasl_username="carol")
    await client.close()
    second = samples((await http_get(daemon.web_url + "/metrics")).text)
    for key, value in first.items():
        if key[0].endswith(("_total", "_count", "_bucket", "_sum")):
            assert second[key] >= value, key
    assert second["policyd_requests_total", (("protocol_state", "END-OF-MESSAGE"),)] == 1


async def test_healthz_ok(daemon: RunningDaemon) -> None:
    answer = await http_get(daemon.web_url + "/healthz")
    assert answer.status == 200
    assert answer.text.splitlines()[:2] == ["ok", "database: ok"]


async def test_healthz_database_down_but_spool_takes_events(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    settings = replace(
        web_settings(tmp_path, spool=str(tmp_path / "spool")),
        database=f"sqlite://{tmp_path}/a-file/policyd.sqlite",  # cannot be made
    )
    async with run_daemon(settings) as running:
        client = await running.client()
        assert await client.ask(sasl_username="dave") == "DUNNO"  # db_error_action
        await client.close()
        answer = await http_get(running.web_url + "/healthz")
        assert answer.status == 200, answer.text
        assert answer.text.startswith("degraded: the database is unavailable; events are kept in the spool")
        values = samples((await http_get(running.web_url + "/metrics")).text)
        assert values["policyd_database_up", ()] == 0
        assert values["policyd_healthy", ()] == 1
        assert values["policyd_window_loaded", ()] == 0


async def test_healthz_503_when_nothing_takes_events(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    settings = replace(
        web_settings(tmp_path, spool=str(tmp_path / "a-file" / "spool")),
        database=f"sqlite://{tmp_path}/a-file/policyd.sqlite",
    )
    async with run_daemon(settings) as running:
        answer = await http_get(running.web_url + "/healthz")
        assert answer.status == 503
        assert answer.text.startswith("failing: neither the database nor the spool takes events")
        assert "spool: refusing events" in answer.text


async def test_pages_escape_a_hostile_name(daemon: RunningDaemon) -> None:
    name = "<img src=x onerror=alert(1)>\"&'<script>"
    client = await daemon.client()
    await client.ask(sasl_username=name, recipient_count=15, sender="<b>x</b>@example.org")
    await client.close()
    overview = await http_get(daemon.web_url + "/")
    assert overview.status == 200
    assert overview.headers["content-type"] == "text/html; charset=utf-8"
    assert "script-src" not in overview.headers["content-security-policy"]  # default-src 'none': no script
    assert "<img" not in overview.text and "<script" not in overview.text
    assert "&lt;img src=x onerror=alert(1)&gt;&quot;&amp;&#x27;&lt;script&gt;" in overview.text
    link = "/user?name=%3Cimg%20src%3Dx%20onerror%3Dalert%281%29%3E%22%26%27%3Cscript%3E"
    assert f'href="{link}"' in overview.text
    page = await http_get(daemon.web_url + link)
    assert page.status == 200
    assert "<img" not in page.text and "<script" not in page.text and "<b>" not in page.text
    assert "&lt;b&gt;x&lt;/b&gt;@example.org" in page.text


async def test_user_page_says_when_the_user_is_back_under_quota(tmp_path: Path) -> None:
    clock = FakeClock()
    async with run_daemon(web_settings(tmp_path), clock=clock) as running:
        client = await running.client()
        await client.ask(sasl_username="erin", recipient_count=6)
        first = clock.now
        clock.advance(hours=1)
        assert (await client.ask(sasl_username="erin", recipient_count=6)).startswith("HOLD")
        await client.close()
        page = (await http_get(running.web_url + "/user?name=erin")).text
        back = first + timedelta(hours=24, milliseconds=1)
        assert f'<span id="back-at">{back:%Y-%m-%d %H:%M:%S} UTC</span>' in page
        assert "(in 23h" in page
        assert page.count('<td class="num recipients">6</td>') == 2  # the recent events, from the database


def test_back_under_quota_walks_the_oldest_events_out() -> None:
    rules = QuotaRules(quota=10, reject_quota=20)
    hour = 3_600_000
    now = 100 * hour
    held = [
        (now - 20 * hour, 6, Outcome.DUNNO),
        (now - 10 * hour, 3, Outcome.DUNNO),
        (now - hour, 4, Outcome.HOLD),
    ]
    # 13 counted: 6 leaves at now+4h (7 left, under 10)
    assert back_under_quota(rules, held, now) == now - 20 * hour + 24 * hour + 1
    assert back_under_quota(rules, held[1:], now) is None
    rejected = [*held, (now, 30, Outcome.REJECT)]
    assert back_under_quota(rules, rejected, now) == now + 4 * hour + 1  # rejected ones do not count
    assert (
        back_under_quota(replace(rules, count_rejected=True), rejected, now) == now + 24 * hour + 1
    )  # the 30 must leave


async def test_allowed_clients_refuses_others(tmp_path: Path) -> None:
    settings = web_settings(tmp_path, http_allowed_clients=(ipaddress.ip_network("192.0.2.0/24"),))
    async with run_daemon(settings) as running:
        with pytest.raises((ConnectionError, IndexError, ValueError)):
            await http_get(running.web_url + "/metrics")
        assert running.daemon.web is not None and running.daemon.web.refused == 1


async def test_basic_auth(tmp_path: Path) -> None:
    hashed = auth.hash_password("s3cret: with colon", iterations=1000)
    settings = web_settings(tmp_path, http_user="admin", http_password_hash=hashed)
    async with run_daemon(settings) as running:
        url = running.web_url + "/healthz"
        refused = await http_get(url)
        assert refused.status == 401
        assert refused.headers["www-authenticate"].startswith('Basic realm="policyd"')

        def basic(user: str, password: str) -> dict[str, str]:
            return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

        assert (await http_get(url, basic("admin", "wrong"))).status == 401
        assert (await http_get(url, basic("root", "s3cret: with colon"))).status == 401
        assert (await http_get(url, {"Authorization": "Bearer x"})).status == 401
        assert (await http_get(url, basic("admin", "s3cret: with colon"))).status == 200
        assert (await http_get(running.web_url + "/", basic("admin", "s3cret: with colon"))).status == 200


def test_password_hash_round_trip_and_cli() -> None:
    hashed = auth.hash_password("pw", iterations=1000)
    assert auth.check_password("pw", hashed) and not auth.check_password("pW", hashed)
    result = CliRunner().invoke(main, ["hash-password"], input="correct horse\n")
    assert result.exit_code == 0, result.output
    key, _, value = result.output.strip().partition(" = ")
    assert key == "http_password_hash" and value.startswith("pbkdf2_sha256$600000$")
    assert auth.check_password("correct horse", value)
    assert "correct horse" not in result.output


async def test_request_limits(daemon: RunningDaemon) -> None:
    host, port = daemon.web_url.removeprefix("http://").split(":")

    async def raw(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    assert (await raw(b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")).startswith(b"HTTP/1.1 405")
    assert (await raw(b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n")).startswith(b"HTTP/1.1 431")
    assert (await raw(b"nonsense\r\n\r\n")).startswith(b"HTTP/1.1 400")
    assert (await raw(b"GET /nowhere HTTP/1.1\r\nConnection: close\r\n\r\n")).startswith(b"HTTP/1.1 404")
    assert (await raw(b"GET /user HTTP/1.1\r\nConnection: close\r\n\r\n")).startswith(b"HTTP/1.1 400")
    # keep-alive: two requests on one connection
    both = await raw(b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert both.count(b"HTTP/1.1 200") == 2


async def test_connections_are_bounded_and_policy_answers_go_on(
    daemon: RunningDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "REQUEST_TIMEOUT_SECONDS", 1.0)
    host, port = daemon.web_url.removeprefix("http://").split(":")
    held = [await asyncio.open_connection(host, int(port)) for _ in range(listener.MAX_CONNECTIONS)]
    for _, writer in held:
        writer.write(b"GET / HTTP/1.1\r\n")  # never finished
    await asyncio.sleep(0.1)
    reader, writer = await asyncio.open_connection(host, int(port))
    assert await asyncio.wait_for(reader.read(), 2) == b""  # refused: closed at once
    writer.close()
    client = await daemon.client()
    started = time.monotonic()
    assert await client.ask(sasl_username="frank") == "DUNNO"
    assert time.monotonic() - started < 0.5
    await client.close()
    # The unfinished requests are ended after REQUEST_TIMEOUT_SECONDS.
    for reader, _ in held:
        assert (await asyncio.wait_for(reader.read(), 3)).startswith(b"HTTP/1.1 408")
    assert (await http_get(daemon.web_url + "/healthz")).status == 200


def test_config_keys() -> None:
    settings = settings_from_text("http_listen = 127.0.0.1:9094\n", "t.cfg")
    assert settings.http_listen == ("127.0.0.1", 9094)
    assert settings_from_text("http_listen = [::1]:9094\n", "t.cfg").http_listen == ("::1", 9094)
    assert settings_from_text("http_listen = 9095\n", "t.cfg").http_listen == ("127.0.0.1", 9095)
    wide = settings_from_text("http_listen = 0.0.0.0:9094\nhttp_allowed_clients = 10.0.0.0/8\n", "t.cfg")
    assert [str(n) for n in wide.http_allowed_clients] == ["10.0.0.0/8"]
    assert any("no http_user is set" in warning for warning in wide.warnings)
    for text, problem in (
        ("http_listen = 127.0.0.1\n", "t.cfg:1: http_listen: '127.0.0.1' is not host:port"),
        ("http_listen = [1:2:3:4:5:6:7:8:9]:1\n", "t.cfg:1: http_listen: '1:2:3:4:5:6:7:8:9' is not an IPv6"),
        ("http_listen = [nonsense]:1\n", "t.cfg:1: http_listen: '[nonsense]' is not an IP address"),
        ("\nhttp_user = admin\n", "t.cfg:2: http_user needs http_password_hash too"),
        ("http_password_hash = secret\n", "t.cfg:1: http_password_hash: not a password hash"),
        ("http_user = a:b\n", "t.cfg:1: http_user: a user name for basic auth cannot hold ':'"),
    ):
        with pytest.raises(ConfigError) as caught:
            settings_from_text(text, "t.cfg")
        assert caught.value.problems[0].startswith(problem), caught.value.problems
    hashed = auth.hash_password("pw", iterations=1000)
    settings = settings_from_text(f"http_user = admin\nhttp_password_hash = {hashed}\n", "t.cfg")
    described = dict(settings.describe())
    assert described["http_password_hash"] == "(set)" and hashed not in str(settings.describe())


async def test_status_page_numbers_equal_the_database(daemon: RunningDaemon, tmp_path: Path) -> None:
    client = await daemon.client()
    for user, count in (("gina", 3), ("hank", 12), ("gina", 4), ("ivan", 25)):
        await client.ask(sasl_username=user, recipient_count=count)
    await client.close()
    assert daemon.daemon.writer is not None
    await asyncio.wait_for(daemon.daemon.writer.caught_up.wait(), 5)
    await asyncio.sleep(0.1)
    store = create_storage(f"sqlite://{tmp_path}/policyd.sqlite", "events")
    await store.open()
    try:
        top = await store.top_senders(daemon.daemon.clock() - timedelta(hours=24), 20)
    finally:
        await store.close()
    page = (await http_get(daemon.web_url + "/")).text
    for sender in top:
        assert f'<tr data-user="{sender.sasl_username}"><td class="name">' in page
        assert f'<td class="num recipients">{sender.recipients}</td>' in page
    assert '<span id="held-count">1</span>' in page and '<span id="rejected-count">1</span>' in page
    assert to_ms(daemon.daemon.clock()) > 0


def test_decision_history_closes_minutes_and_fills_gaps() -> None:
    from collections import Counter
    from types import SimpleNamespace

    from policyd.web.state import DecisionHistory

    clock = FakeClock()
    decisions: Counter[tuple[str, str]] = Counter()
    daemon: Any = SimpleNamespace(clock=clock, stats=SimpleNamespace(decisions=decisions))
    history = DecisionHistory(daemon, minutes=5)
    decisions["DUNNO", ""] += 3
    decisions["HOLD", "10/24h"] += 1
    assert history.current().counts == {"DUNNO": 3, "HOLD": 1, "REJECT": 0}
    history.sample()  # the same minute: nothing closed
    assert list(history.minutes) == []
    clock.advance(minutes=1)
    history.sample()
    [closed] = history.minutes
    assert (closed.start, closed.counts) == (
        clock.now - timedelta(minutes=1),
        {"DUNNO": 3, "HOLD": 1, "REJECT": 0},
    )
    assert history.current().counts == {"DUNNO": 0, "HOLD": 0, "REJECT": 0}
    decisions["REJECT", "10/24h"] += 2
    clock.advance(minutes=3)  # two minutes with no sample
    history.sample()
    assert [minute.counts.get("REJECT", 0) for minute in history.minutes] == [0, 2, 0, 0]
    assert [minute.start for minute in history.minutes] == [
        clock.now - timedelta(minutes=n) for n in (4, 3, 2, 1)
    ]
    clock.advance(hours=5)  # longer than the ring: it holds the last 5 minutes
    history.sample()
    assert len(history.minutes) == 5
    assert history.minutes[-1].start == clock.now - timedelta(minutes=1)


def test_the_documented_password_hash_is_of_the_documented_password() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    [hashed] = [
        line.split(" = ", 1)[1] for line in text.splitlines() if line.startswith("http_password_hash = ")
    ]
    assert auth.check_password("change-this-example", hashed)
