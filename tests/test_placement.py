"""A misplaced check is said in the log (once an hour per cause), and log_level = debug
logs every decision with its inputs; through the real daemon."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from policyd.placement import WARN_EVERY_SECONDS
from tests.conftest import FakeClock, encode_request, make_settings, run_daemon


def without(name: str, **attributes: object) -> bytes:
    """A request as encode_request makes it, without the attribute `name`."""
    lines = encode_request(**attributes).decode().split("\n")
    return "\n".join(line for line in lines if not line.startswith(f"{name}=")).encode()


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


class Seconds:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_each_cause_is_said_once_an_hour_naming_the_client(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(make_settings(f"sqlite://{tmp_path}/p.sqlite", quota=5)) as daemon:
        assert daemon.daemon.server is not None
        clock = daemon.daemon.server.placement.clock = Seconds()
        client = await daemon.client()
        local = client.writer.get_extra_info("sockname")
        peer = f"{local[0]}:{local[1]}"
        for _ in range(3):
            assert await client.ask(protocol_state="RCPT", recipient_count=0) == "DUNNO"
        client.writer.write(without("recipient_count", recipient_count=9))
        assert await client.read_reply() == "DUNNO"  # counted as 0
        client.writer.write(without("request"))
        assert await client.read_reply() == "DUNNO"
        assert await client.ask(request="junk", recipient_count=1) == "DUNNO"
        said = warnings(caplog)
        assert len(said) == 3, said
        stage, count, kind = said
        assert stage.startswith(f"client {peer}: asked at the RCPT stage, where recipients cannot be counted")
        assert "move check_policy_service from smtpd_recipient_restrictions" in stage
        assert "to smtpd_end_of_data_restrictions; said once an hour" in stage
        assert count.startswith(f"client {peer}: a request at END-OF-MESSAGE without recipient_count")
        assert kind.startswith(f"client {peer}: no request attribute, not request=smtpd_access_policy")
        assert "smtpd_end_of_data_restrictions" in count and "smtpd_end_of_data_restrictions" in kind

        clock.now += WARN_EVERY_SECONDS - 1
        assert await client.ask(protocol_state="MAIL", recipient_count=0) == "DUNNO"
        assert len(warnings(caplog)) == 3
        clock.now += 1
        assert await client.ask(protocol_state="MAIL", recipient_count=0) == "DUNNO"
        again = warnings(caplog)[3:]
        assert len(again) == 1 and "asked at the MAIL stage" in again[0], again
        assert "from smtpd_sender_restrictions" in again[0]
        assert again[0].endswith("said once an hour (3 more such requests since the last time)")
        # A request as Postfix sends it at the end of the message is silent.
        assert await client.ask(recipient_count=1) == "DUNNO"
        assert len(warnings(caplog)) == 4
        await client.close()


async def test_debug_logs_each_decision_with_its_inputs_escaped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "policyd")
    settings = make_settings(f"sqlite://{tmp_path}/p.sqlite", quota=5)
    async with run_daemon(settings, clock=FakeClock()) as daemon:
        client = await daemon.client()
        sender = 'evil"\x1b[31m\\@example.org'
        assert await client.ask(sender=sender, recipient_count=5) == "HOLD quota exceeded"
        assert await client.ask(protocol_state="RCPT", recipient_count=0) == "DUNNO"
        assert await client.ask(sasl_username="", recipient_count=3) == "DUNNO"
        await client.close()
    decisions = [
        record.getMessage() for record in caplog.records if record.getMessage().startswith("decision: ")
    ]
    assert decisions == [
        'decision: "HOLD quota exceeded" (over quota) for user="alice" '
        'sender="evil\\"\\x1b[31m\\\\@example.org" client="192.0.2.10" recipients=5 '
        'stage="END-OF-MESSAGE" queue_id=4ABCDEF totals: 5 of 5/24h',
        'decision: "DUNNO" (not a counting stage) for user="alice" sender="alice@example.org" '
        'client="192.0.2.10" recipients=0 stage="RCPT" queue_id=4ABCDEF',
        'decision: "DUNNO" (unauthenticated) for user="" sender="alice@example.org" '
        'client="192.0.2.10" recipients=3 stage="END-OF-MESSAGE" queue_id=4ABCDEF',
    ]
    assert all("\x1b" not in line for line in decisions)


async def test_info_logs_no_decision_lines(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "policyd")
    async with run_daemon(make_settings(f"sqlite://{tmp_path}/p.sqlite")) as daemon:
        client = await daemon.client()
        assert await client.ask(recipient_count=1) == "DUNNO"
        await client.close()
    assert not [record for record in caplog.records if record.getMessage().startswith("decision: ")]
