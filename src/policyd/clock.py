"""Time as the daemon counts it: UTC datetimes, and integer milliseconds since the epoch
(what the window and the database's millisecond timestamps hold)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MILLISECOND = timedelta(milliseconds=1)


def utc_now() -> datetime:
    return datetime.now(UTC)


def to_ms(moment: datetime) -> int:
    """Milliseconds since the epoch, exactly (integer arithmetic: no float rounding)."""
    return (moment - EPOCH) // MILLISECOND


def from_ms(milliseconds: int) -> datetime:
    return EPOCH + timedelta(milliseconds=milliseconds)
