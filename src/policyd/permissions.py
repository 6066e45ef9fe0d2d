"""What to tell the admin when the daemon's user may not write a file it needs (the
SQLite database, the spool): the command that fixes it."""

from __future__ import annotations

import errno
import os
import pwd


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def not_writable_hint(path: str) -> str:
    """The fix for a `path` this process may not write (nor make in its directory)."""
    try:
        read_only = bool(os.statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"the file system holding {path} is mounted read-only"
    user = _user_name()
    return (
        f"user {user} may not write {path} or its directory: "
        f"chown {user}: {os.path.dirname(os.path.abspath(path))} {path}*"
    )


def hint_for(error: OSError, path: str) -> str | None:
    """not_writable_hint() if `error` says this user may not write `path`, else None."""
    if isinstance(error, PermissionError) or error.errno == errno.EROFS:
        return not_writable_hint(path)
    return None
