"""Reading `postqueue -j`: only the hold queue, only the ids asked for, in one pass over
a queue of thousands (the e2e tests run the real postqueue and postsuper)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from policyd.held import PostfixError, parse_queue


def entry(
    queue_id: str, queue_name: str = "hold", recipients: int = 1, sender: str = "alice@example.org"
) -> str:
    return json.dumps(
        {
            "queue_name": queue_name,
            "queue_id": queue_id,
            "arrival_time": 1_780_000_000,
            "sender": sender,
            "recipients": [{"address": f"r{n}@example.net"} for n in range(recipients)],
        }
    )


def test_only_the_wanted_ids_in_the_hold_queue() -> None:
    lines = [entry(f"H{n:05X}", recipients=n % 7 + 1) for n in range(5000)]
    lines += [entry("ACTIVE1", queue_name="active"), entry("DEFER1", queue_name="deferred"), ""]
    wanted = {f"H{n:05X}" for n in range(0, 5000, 2)} | {"ACTIVE1", "DEFER1", "GONE"}
    found = list(parse_queue(iter(lines), wanted))
    assert [message.queue_id for message in found] == [f"H{n:05X}" for n in range(0, 5000, 2)]
    assert found[1].recipients == 3
    assert found[0].arrived == datetime.fromtimestamp(1_780_000_000, UTC)
    assert found[0].sender == "alice@example.org"


def test_output_that_is_not_json_is_a_clear_error() -> None:
    with pytest.raises(PostfixError, match="postqueue -j printed a line that is not JSON"):
        list(parse_queue(["-Queue ID-  --Size-- ----Arrival Time----"], {"X"}))
