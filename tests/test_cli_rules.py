"""`policyd quota | allow | block | unlist | lists | reset | user | top` on every backend."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

from click.testing import CliRunner, Result

from policyd.cli import main
from policyd.quota import Outcome
from policyd.storage import Event
from tests.conftest import add_events


def run(config: Path, *arguments: str) -> Result:
    return CliRunner().invoke(main, [*arguments, "-c", str(config)])


def make_config(tmp_path: Path, url: str, table: str, extra: str = "") -> Path:
    config = tmp_path / "policyd.cfg"
    config.write_text(f"database = {url}\npolicy_table = {table}\ndefaultquota = 100\nlimit = 20/1h\n{extra}")
    config.chmod(0o600)
    return config


def test_quota_set_show_unset(database: tuple[str, str], tmp_path: Path) -> None:
    url, table = database
    config = make_config(tmp_path, url, table)
    assert run(config, "migrate").exit_code == 0
    result = run(config, "quota", "set", "Teacher", "2000", "--reason", "class", "--until", "2099-01-01")
    assert result.exit_code == 0, result.output
    assert (
        "quota of teacher: HOLD from 2000, REJECT from 4000 per 24h, until 2099-01-01 00:00:00 UTC"
        in result.output
    )
    result = run(config, "quota", "set", "teacher", "50", "--reject", "60", "--window", "1h")
    assert result.exit_code == 0, result.output
    shown = json.loads(run(config, "quota", "show", "teacher", "--json").output)
    assert shown["limits"] == ["2000/24h reject 4000", "50/1h reject 60"]
    assert sorted(
        (row["window"], row["hold"], row["reject"], row["reason"]) for row in shown["overrides"]
    ) == [
        ("1h", 50, 60, ""),
        ("24h", 2000, 4000, "class"),
    ]
    text = run(config, "quota", "show").output
    assert "teacher  2000/24h reject 4000  until 2099-01-01 00:00:00 UTC  class" in text
    # A window no limit has, a past date, a reject below the hold: refused.
    assert run(config, "quota", "set", "teacher", "5", "--window", "2h").exit_code == 2
    assert run(config, "quota", "set", "teacher", "5", "--until", "2001-01-01").exit_code == 2
    assert run(config, "quota", "set", "teacher", "5", "--reject", "4").exit_code == 2
    assert (
        run(config, "quota", "unset", "teacher", "--window", "1h").output
        == "removed 1 overrides of teacher\n"
    )
    assert run(config, "quota", "unset", "teacher").exit_code == 0
    missing = run(config, "quota", "unset", "teacher")
    assert (missing.exit_code, missing.output) == (1, "removed 0 overrides of teacher\n")
    assert json.loads(run(config, "quota", "show", "--json").output) == {"overrides": []}


def test_allow_block_unlist_lists(database: tuple[str, str], tmp_path: Path) -> None:
    url, table = database
    config = make_config(tmp_path, url, table, "whitelist = 198.51.100.0/24\nblacklist = @spam.example\n")
    assert run(config, "migrate").exit_code == 0
    assert run(config, "block", "2001:DB8::/32", "--action", "reject", "--reason", "botnet").exit_code == 0
    assert run(config, "allow", "news@example.org", "--user", "Newsletter", "--until", "30d").exit_code == 0
    refused = run(config, "allow", "@example.org")
    assert refused.exit_code == 2 and "dodge the quota" in refused.output
    assert run(config, "block", "*spam*").exit_code == 2
    rows = json.loads(run(config, "lists", "--json").output)
    assert [(r["kind"], r["target"], r["user"], r["action"], r["source"]) for r in rows] == [
        ("allow", "198.51.100.0/24", None, "DUNNO", "config"),
        ("block", "@spam.example", None, "HOLD", "config"),
        ("block", "2001:db8::/32", None, "REJECT", "database"),
        ("allow", "news@example.org", "newsletter", "DUNNO", "database"),
    ]
    text = run(config, "lists").output
    assert "config file (whitelist, in whitelist_hours Mon-Fri 07:00-20:00)" in text
    assert "2001:db8::/32  REJECT  until never  database  botnet" in text
    assert run(config, "unlist", "2001:db8:0::/32").output == "removed 1 entries for 2001:db8::/32\n"
    assert run(config, "unlist", "2001:db8::/32").exit_code == 1
    kept = run(config, "unlist", "198.51.100.0/24")
    assert kept.exit_code == 1 and "remove it there" in kept.output
    assert [r["target"] for r in json.loads(run(config, "lists", "--json").output)] == [
        "198.51.100.0/24",
        "@spam.example",
        "news@example.org",
    ]


def test_check_config_refuses_entries_that_never_match(tmp_path: Path) -> None:
    config = tmp_path / "policyd.cfg"
    config.write_text(
        f"database = sqlite://{tmp_path}/x.sqlite\nwhitelist = *spam*\nblacklist = 192.0.2.0/33\n"
    )
    result = run(config, "check-config")
    assert result.exit_code == 2
    assert "whitelist: '*spam*': wildcards and spaces are not supported" in result.output
    assert "blacklist: '192.0.2.0/33' is not a valid IP address or network" in result.output
    config.write_text(
        f"database = sqlite://{tmp_path}/x.sqlite\nwhitelist = 192.0.2.0/24\nwhitelist = @univ.fr\n"
        "whitelist = boss@univ.fr\n"
    )
    result = run(config, "check-config")
    assert result.exit_code == 0, result.output
    assert "whitelist = boss@univ.fr exempts any authenticated user" in result.output


def test_reset_user_and_top(database: tuple[str, str], tmp_path: Path) -> None:
    url, table = database
    config = make_config(tmp_path, url, table)
    now = datetime.now(UTC)
    asyncio.run(
        add_events(
            url,
            table,
            [
                Event(
                    now - timedelta(minutes=30), "jdoe", "jdoe@example.org", "192.0.2.1", 15, Outcome.DUNNO
                ),
                Event(
                    now - timedelta(minutes=20), "jdoe", "ceo@example.org", "2001:db8::7", 10, Outcome.HOLD
                ),
                Event(
                    now - timedelta(minutes=10), "jdoe", "ceo@example.org", "2001:db8::7", 90, Outcome.REJECT
                ),
                Event(now - timedelta(minutes=5), "other", "o@example.org", "192.0.2.2", 3, Outcome.DUNNO),
            ],
        )
    )
    assert run(config, "block", "2001:db8::/32").exit_code == 0
    view = json.loads(run(config, "user", "JDoe", "--json").output)
    assert view["state"] == "held"
    assert [(item["limit"], item["total"], item["state"]) for item in view["limits"]] == [
        ("100/24h reject 200", 25, "ok"),
        ("20/1h reject 40", 25, "held"),
    ]
    assert view["limits"][1]["back_under"] is not None
    assert view["senders"] == [
        {"sender": "ceo@example.org", "recipients": 100},
        {"sender": "jdoe@example.org", "recipients": 15},
    ]
    assert [row["client_address"] for row in view["client_addresses"]] == ["2001:db8::7", "192.0.2.1"]
    assert [entry["target"] for entry in view["entries"]] == ["2001:db8::/32"]
    assert [(e["recipients"], e["counted"]) for e in view["events"]] == [(90, False), (10, True), (15, True)]
    text = run(config, "user", "jdoe").output
    assert text.startswith("user jdoe: held\n")
    assert "  limit 20/1h reject 40: 25 counted, held, back under it at " in text

    top = json.loads(run(config, "top", "--json").output)
    assert [(row["user"], row["counted"], row["recipients"], row["client_addresses"]) for row in top] == [
        ("jdoe", 25, 115, 2),
        ("other", 3, 3, 1),
    ]
    assert [row["user"] for row in json.loads(run(config, "top", "other", "--json").output)] == ["other"]

    result = run(config, "reset", "jdoe", "--reason", "password changed")
    assert result.exit_code == 0, result.output
    assert run(config, "reset", "jdoe").exit_code == 2  # a reason is required
    view = json.loads(run(config, "user", "jdoe", "--json").output)
    assert view["state"] == "ok"
    assert [item["total"] for item in view["limits"]] == [0, 0]
    assert view["reset"]["reason"] == "password changed"
    assert all(not event["counted"] for event in view["events"])  # still there, not counted
    top = json.loads(run(config, "top", "jdoe", "--json").output)
    assert [(row["counted"], row["recipients"]) for row in top] == [(0, 115)]
