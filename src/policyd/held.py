"""A user's mail in Postfix's hold queue: found from the queue ids policyd recorded with
the user's events, confirmed against `postqueue -j`, released (`postsuper -H`) or
deleted (`postsuper -d`) by exactly those ids, never anyone else's.

The queue is read as a stream, one JSON object a line, so thousands of held messages
cost memory for the user's own only; ids go to postsuper on its standard input (`-`),
so their number is not bounded by a command line.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

# postsuper reads this many ids at most per run here (a bounded run time each).
POSTSUPER_CHUNK = 5000
POSTFIX_TIMEOUT_SECONDS = 300


class PostfixError(Exception):
    """postqueue or postsuper could not be run, or failed; the message says which."""


@dataclass(frozen=True, slots=True)
class HeldMessage:
    queue_id: str
    sender: str
    recipients: int
    arrived: datetime | None  # when Postfix queued it (UTC)

    def as_json(self) -> dict[str, object]:
        return {
            "queue_id": self.queue_id,
            "sender": self.sender,
            "recipients": self.recipients,
            "arrived": self.arrived.isoformat() if self.arrived else None,
        }


def parse_queue(lines: Iterable[str], wanted: set[str]) -> Iterator[HeldMessage]:
    """The messages of `postqueue -j` output in the hold queue whose ids are `wanted`."""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise PostfixError(f"postqueue -j printed a line that is not JSON: {error}") from None
        if entry.get("queue_name") != "hold" or entry.get("queue_id") not in wanted:
            continue
        arrival = entry.get("arrival_time")
        yield HeldMessage(
            queue_id=str(entry["queue_id"]),
            sender=str(entry.get("sender", "")),
            recipients=len(entry.get("recipients", [])),
            arrived=datetime.fromtimestamp(arrival, UTC) if isinstance(arrival, int | float) else None,
        )


def _command(name: str, config_directory: str | None) -> list[str]:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        raise PostfixError(f"{name} not found (is Postfix installed on this host?)")
    return [path, *(["-c", config_directory] if config_directory else [])]


def held_messages(recorded: set[str], config_directory: str | None = None) -> list[HeldMessage]:
    """Of the queue ids `recorded` for a user, those in the hold queue now."""
    if not recorded:
        return []
    command = [*_command("postqueue", config_directory), "-j"]
    try:
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
            assert process.stdout is not None
            found = list(parse_queue(process.stdout, recorded))
            _, errors = process.communicate(timeout=POSTFIX_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise PostfixError(f"cannot run postqueue -j: {error}") from None
    if process.returncode != 0:
        raise PostfixError(f"postqueue -j failed ({process.returncode}): {errors.strip()}")
    return sorted(
        found, key=lambda message: (message.arrived or datetime.min.replace(tzinfo=UTC), message.queue_id)
    )


def postsuper(option: str, queue_ids: list[str], config_directory: str | None = None) -> str:
    """`postsuper OPTION -` with these ids on its input (-H: release, -d: delete); what
    postsuper said (it reports on standard error)."""
    said = []
    for first in range(0, len(queue_ids), POSTSUPER_CHUNK):
        chunk = queue_ids[first : first + POSTSUPER_CHUNK]
        try:
            result = subprocess.run(
                [*_command("postsuper", config_directory), option, "-"],
                input="".join(f"{queue_id}\n" for queue_id in chunk),
                capture_output=True,
                text=True,
                timeout=POSTFIX_TIMEOUT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise PostfixError(f"cannot run postsuper {option}: {error}") from None
        if result.returncode != 0:
            raise PostfixError(f"postsuper {option} failed ({result.returncode}): {result.stderr.strip()}")
        said.append(result.stderr.strip())
    return "\n".join(line for line in said if line)
