"""The daemon's counters: one object, counters that only grow, read by whoever reports.

systemd's STATUS line, the outage log lines (per-incident figures are differences of
two readings) and, later, /metrics all read the same numbers.  Nothing here resets.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, fields


@dataclass
class Stats:
    # requests answered, by protocol stage (END-OF-MESSAGE, RCPT, ...)
    requests: Counter[str] = field(default_factory=Counter)
    # decisions by (outcome, limit label; "" when within every limit or not counted)
    decisions: Counter[tuple[str, str]] = field(default_factory=Counter)
    # events: counted (handed to the writer), spooled, written, or dropped
    events_counted: int = 0
    events_spooled: int = 0  # appended to the spool (before their answers)
    events_written: int = 0  # committed to the database
    events_replayed: int = 0  # of those, written while an outage lasted (its backlog)
    events_dropped: int = 0  # lost: neither the spool nor the database took them
    spool_damaged: int = 0  # damaged stretches of the spool skipped at start
    write_batches: int = 0
    # decided while the database was unavailable (from the window, as always) and
    # decided with db_error_action (the window did not know the user yet)
    decided_during_outage: int = 0
    answered_error_action: int = 0
    # database failures by what failed ("write", "read", "replay", "load")
    database_errors: Counter[str] = field(default_factory=Counter)
    # other daemons' events read from the database into the window, and decisions that
    # read them first (the strict path)
    events_tailed: int = 0
    strict_reads: int = 0
    connections_accepted: int = 0
    connections_refused: int = 0

    def reading(self) -> dict[str, int]:
        """The plain counters now (for differences over an incident)."""
        return {item.name: getattr(self, item.name) for item in fields(self) if item.type == "int"}

    def outcome_count(self, outcome: str) -> int:
        return sum(count for (name, _), count in self.decisions.items() if name == outcome)
