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


# Below 2**32 s after the epoch (the year 2106) a double holds ms / 1000 within 2**-22 s,
# a quarter of a microsecond: fromtimestamp, rounding to the microsecond, gives the exact
# millisecond (tests/test_clock.py checks it).
_FLOAT_EXACT_MS = 2**32 * 1000


def from_ms(milliseconds: int) -> datetime:
    if 0 <= milliseconds < _FLOAT_EXACT_MS:
        # Twice as quick as the timedelta sum (once per counted message).
        return datetime.fromtimestamp(milliseconds / 1000, UTC)
    return EPOCH + timedelta(milliseconds=milliseconds)
