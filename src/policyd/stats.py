"""The daemon's counters: one object, counters that only grow, read by whoever reports.

systemd's STATUS line, the outage log lines (per-incident figures are differences of
two readings), /metrics and the status page (web/) all read the same numbers.  Nothing
here resets.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

# Bucket bounds (upper, inclusive) of the histograms, in seconds or events.  An answer
# from the window takes tens of microseconds; one that waits for the spool or the
# database, milliseconds; db_timeout (0.5 s by default) bounds the rest.
REQUEST_SECONDS_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
WRITE_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_EVENTS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class Histogram:
    """Observations counted in fixed buckets: one bisect and two additions each, no lock
    (everything runs on the event loop); /metrics turns it into a Prometheus histogram."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), the last bound infinite."""
        running, out = 0, []
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


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
    # polls that read the recent rows again because one had come in late (sync.py)
    tail_rereads: int = 0
    connections_accepted: int = 0
    connections_refused: int = 0
    # from a request read to its answer ready, and each database write (a batch of events)
    request_seconds: Histogram = field(default_factory=lambda: Histogram(REQUEST_SECONDS_BUCKETS))
    write_seconds: Histogram = field(default_factory=lambda: Histogram(WRITE_SECONDS_BUCKETS))
    write_batch_events: Histogram = field(default_factory=lambda: Histogram(BATCH_EVENTS_BUCKETS))

    def reading(self) -> dict[str, int]:
        """The plain counters now (for differences over an incident)."""
        return {item.name: getattr(self, item.name) for item in fields(self) if item.type == "int"}

    def outcome_count(self, outcome: str) -> int:
        return sum(count for (name, _), count in self.decisions.items() if name == outcome)
