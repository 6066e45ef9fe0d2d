"""Several limits: the `limit` key, the decision over all of them, the lines naming the one hit."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest

from policyd.config import ConfigError, load_settings
from policyd.quota import Limit, Outcome, QuotaRules, decide
from tests.conftest import FakeClock, make_settings, run_daemon


def load(tmp_path: Path, text: str) -> QuotaRules:
    path = tmp_path / "policyd.cfg"
    path.write_text(text)
    path.chmod(0o600)
    return load_settings(path).rules


def test_default_is_go_policyds_single_quota(tmp_path: Path) -> None:
    rules = load(tmp_path, "defaultquota = 1500\n")
    assert rules.limits == (Limit(1500, 3000, timedelta(hours=24)),)


def test_limit_key_adds_limits_with_twice_the_hold_as_reject(tmp_path: Path) -> None:
    rules = load(tmp_path, "defaultquota = 1500\nlimit = 300/1h\nlimit = 50/5m reject 80\n")
    assert rules.limits == (
        Limit(1500, 3000, timedelta(hours=24)),
        Limit(300, 600, timedelta(hours=1)),
        Limit(50, 80, timedelta(minutes=5)),
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("limit = 300", "is not like 300/1h"),
        ("limit = 300/1x", "is not a duration"),
        ("limit = 300/1h reject 200", "below the hold one"),
        ("limit = 0/1h", "out of range"),
        ("limit = 300/24h", "another limit has the window 24h"),
        ("limit = 300/0.5s", "at least 1s"),
    ],
)
def test_bad_limits_are_refused_with_the_line(tmp_path: Path, line: str, problem: str) -> None:
    path = tmp_path / "policyd.cfg"
    path.write_text(f"defaultquota = 10\n{line}\n")
    with pytest.raises(ConfigError) as caught:
        load_settings(path)
    [message] = caught.value.problems
    assert problem in message and str(path) in message


def test_two_limits_with_one_window_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "policyd.cfg"
    path.write_text("limit = 300/1h\nlimit = 400/60m\n")
    with pytest.raises(ConfigError, match="another limit has the window 1h"):
        load_settings(path)


def test_the_strictest_outcome_wins_and_names_its_limit() -> None:
    rules = QuotaRules(quota=1500, reject_quota=3000, extra_limits=(Limit(300, 600, timedelta(hours=1)),))
    assert decide(rules, [299, 299]).outcome is Outcome.DUNNO
    held = decide(rules, [400, 300])
    assert (held.action, held.limit, held.total) == ("HOLD quota exceeded (300/1h)", rules.limits[1], 300)
    rejected = decide(rules, [1600, 700])  # HOLD by the day, REJECT by the hour: REJECT
    assert (rejected.action, rejected.limit) == ("REJECT max quota exceeded (300/1h)", rules.limits[1])
    primary = decide(rules, [1600, 10])
    assert primary.action == "HOLD quota exceeded"  # go-policyd's words for its own quota


async def test_daemon_applies_every_limit_and_logs_the_one_hit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    settings = make_settings(
        f"sqlite://{tmp_path}/db.sqlite",
        quota=100,
        reject_quota=200,
        extra_limits=(Limit(10, 20, timedelta(minutes=10)),),
    )
    caplog.set_level(logging.INFO, logger="policyd")
    async with run_daemon(settings, clock) as daemon:
        client = await daemon.client()
        assert await client.ask(sasl_username="phished", recipient_count=9) == "DUNNO"
        assert await client.ask(sasl_username="phished", recipient_count=1) == "HOLD quota exceeded (10/10m)"
        assert "DEFERRING overquota (10>10) for user phished" in caplog.text
        assert "(limit 10/10m)" in caplog.text
        assert (
            await client.ask(sasl_username="phished", recipient_count=10)
            == "REJECT max quota exceeded (10/10m)"
        )
        clock.advance(minutes=11)  # out of the short window; 10 counted today (the REJECT is not)
        assert await client.ask(sasl_username="phished", recipient_count=9) == "DUNNO"
        [daily, short] = daemon.daemon.decider.totals("phished", _ms(clock), settings.rules)
        assert (daily, short) == (19, 9)
        await client.close()


def _ms(clock: FakeClock) -> int:
    from policyd.clock import to_ms

    return to_ms(clock())


def test_check_config_shows_the_limits(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from policyd.cli import main

    path = tmp_path / "policyd.cfg"
    path.write_text(f"database = sqlite://{tmp_path}/x.sqlite\nlimit = 300/1h\n")
    result = CliRunner().invoke(main, ["check-config", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert ["limit", "300/1h reject 600"] in [line.split(None, 1) for line in result.output.splitlines()]
