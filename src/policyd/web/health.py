"""/healthz: can the daemon decide and record?  200 if so, 503 with the reason if not.

It can decide as long as it runs (from the window; a user it knows nothing about gets
db_error_action while the window could not be loaded).  It can record while the
database takes the events, or else the spool does: an outage the spool absorbs is still
200 (the page says "degraded" and why); both failing is 503.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from policyd.web.listener import Response

if TYPE_CHECKING:
    from policyd.daemon import Daemon


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool  # decides and records
    status: str  # "ok", "degraded" (recording into the spool only) or "failing"
    reason: str  # why not "ok" ("" when ok)
    database: str  # one line each, for the page and the body
    spool: str
    window: str

    @property
    def lines(self) -> list[str]:
        head = self.status if not self.reason else f"{self.status}: {self.reason}"
        return [head, f"database: {self.database}", f"spool: {self.spool}", f"window: {self.window}"]


def check(daemon: Daemon) -> Health:
    outage, writer, decider = daemon.outage, daemon.writer, daemon.decider
    if outage is None or writer is None or decider is None:
        return Health(False, "failing", "starting", "not open yet", "not open yet", "not loaded yet")
    hint = outage.hint or daemon.connect_hint
    kind = "permanent" if hint else "transient"
    needs = f"; to do: {hint}" if hint else ""
    if not daemon.opened:
        database = f"not open yet{f' ({kind}: {outage.reason}{needs})' if outage.reason or hint else ''}"
        database_ok = False
    elif outage.active:
        database = f"unavailable ({kind}: {outage.reason}{needs})"
        database_ok = False
    else:
        database = "ok"
        database_ok = True
    backlog = writer.backlog_bytes
    limit = daemon.settings.spool_max_size
    if writer.spool_ok:
        spool = f"ok, {backlog} bytes waiting for the database (at most {limit})"
    else:
        spool = f"refusing events (full or unwritable), {backlog} bytes waiting (at most {limit})"
    window = f"{len(decider.window)} users" + (
        "" if decider.complete else ", history not loaded yet (unknown users get db_error_action)"
    )
    if database_ok:
        return Health(True, "ok", "", database, spool, window)
    if writer.spool_ok:
        return Health(
            True,
            "degraded",
            "the database is unavailable; events are kept in the spool",
            database,
            spool,
            window,
        )
    return Health(
        False, "failing", "neither the database nor the spool takes events", database, spool, window
    )


async def health_response(daemon: Daemon) -> Response:
    health = check(daemon)
    return Response(200 if health.ok else 503, ("\n".join(health.lines) + "\n").encode())
