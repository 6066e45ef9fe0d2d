"""`policyd check-config --connect`: the database and the spool tried for real, as the
daemon would use them, each with a one-line verdict and, when something is wrong, what
to do about it."""

from __future__ import annotations

import os
import tempfile

from policyd.config import Settings
from policyd.permissions import hint_for
from policyd.storage import StorageError, create_storage


async def check_database(settings: Settings) -> tuple[str, bool]:
    """(verdict, ok): open, read the schema, write a row and roll it back."""
    storage = create_storage(settings.database, settings.table)
    try:
        await storage.open()
        pending = await storage.pending_migrations()
        if pending:
            # The daemon migrates at start; until then nothing can be written.
            return (
                f"database: ok, but the schema needs `policyd migrate` (the daemon does it at start): "
                f"{'; '.join(pending)}",
                True,
            )
        await storage.max_event_id()
        await storage.probe_write()
    except StorageError as error:
        hint = f"; {error.hint}" if error.hint else ""
        return f"database: FAILED: {error}{hint}", False
    finally:
        await storage.close()
    return f"database: ok ({storage.description}: read, and a test row written and rolled back)", True


def check_spool(spool: str) -> tuple[str, bool]:
    """(verdict, ok): a file made and removed where the spool's files go."""
    directory = os.path.dirname(os.path.abspath(spool))
    existing = directory
    while not os.path.isdir(existing):
        existing = os.path.dirname(existing)  # the daemon makes the missing directories
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".policyd-check-"):
            pass
    except OSError as error:
        hint = hint_for(error, spool)
        return (
            f"spool: FAILED: cannot write in {existing}: {error.strerror or error}{f'; {hint}' if hint else ''}",
            False,
        )
    return f"spool: ok ({spool}: {existing} is writable)", True
