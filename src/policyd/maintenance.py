"""Housekeeping on the events table: deleting what is older than `retention`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta

from policyd.clock import utc_now
from policyd.logs import log
from policyd.outage import describe_error
from policyd.storage import Storage, StorageError

# How often old events are purged (and once at start).
PURGE_INTERVAL = timedelta(days=1)


async def purge_old_events(storage: Storage, retention: timedelta, now: datetime | None = None) -> int:
    """Delete events older than `retention`; returns how many."""
    before = (now or utc_now()) - retention
    started = time.monotonic()
    deleted = await storage.purge(before)
    log.info(
        "purged %d events older than %s in %.1fs",
        deleted,
        before.strftime("%Y-%m-%d %H:%M:%S UTC"),
        time.monotonic() - started,
    )
    return deleted


async def purge_every_day(storage: Storage, retention: Callable[[], timedelta]) -> None:
    """Purge now, then once a day, until cancelled (`retention` is read each time: a reload
    may change it)."""
    while True:
        try:
            await purge_old_events(storage, retention())
        except StorageError as error:
            log.error("purge failed: %s (will try again in %s)", describe_error(error), PURGE_INTERVAL)
        await asyncio.sleep(PURGE_INTERVAL.total_seconds())
