"""Storage backends, chosen by the scheme of the `database` URL.

A backend's driver is imported only when that backend is chosen, so an SQLite-only
install needs none of the MariaDB/PostgreSQL drivers.
"""

from __future__ import annotations

import importlib
import re

from policyd.storage.base import DatabaseReplaced, Event, SchemaMissing, SenderStats, Storage, StorageError

__all__ = [
    "BACKENDS",
    "DatabaseReplaced",
    "Event",
    "SchemaMissing",
    "SenderStats",
    "Storage",
    "StorageError",
    "create_storage",
    "mask_url",
]

# scheme -> (module, class, pip extra that brings its driver)
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "sqlite": ("policyd.storage.sqlite", "SQLiteStorage", None),
    "mysql": ("policyd.storage.mysql", "MySQLStorage", "mysql"),
    "mariadb": ("policyd.storage.mysql", "MySQLStorage", "mysql"),
    "postgresql": ("policyd.storage.postgresql", "PostgreSQLStorage", "postgresql"),
    "postgres": ("policyd.storage.postgresql", "PostgreSQLStorage", "postgresql"),
}


# scheme://user:PASSWORD@host...: everything between "user:" and the last '@'.
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:)(.*)(@[^@]*)$", re.DOTALL)


def scheme_of(url: str) -> str:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    return scheme.split("+", 1)[0]


def create_storage(url: str, table: str = "events") -> Storage:
    """The backend for `url`, not yet opened."""
    scheme = scheme_of(url)
    if scheme not in BACKENDS:
        known = ", ".join(f"{name}://" for name in BACKENDS)
        raise ValueError(f"unsupported database URL scheme {scheme!r} (known: {known})")
    module_name, class_name, extra = BACKENDS[scheme]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        hint = f"; install it with: pip install 'policyd[{extra}]'" if extra else ""
        raise ValueError(
            f"the {scheme} backend needs a driver that is not installed ({error}){hint}"
        ) from None
    backend: type[Storage] = getattr(module, class_name)
    try:
        return backend.from_url(url, table)
    except ValueError as error:
        # A parser may quote a piece of the URL: never the password, not even a piece
        # of it (an unescaped '#', '/' or '?' cuts it where a parser does not expect).
        message = _without_password(str(error), url)
        if _UNESCAPED.search(_password_of(url)):
            message += "; in the password, write # as %23, / as %2F, ? as %3F, @ as %40, % as %25"
        raise ValueError(message) from None


# What a URL parser takes for the end of the password, unless percent-encoded.
_UNESCAPED = re.compile(r"[#/?@]|%(?![0-9A-Fa-f]{2})")


def _password_of(url: str) -> str:
    match = _USERINFO.match(url)
    return match.group(2) if match else ""


def _without_password(message: str, url: str) -> str:
    password = _password_of(url)
    if not password:
        return message
    pieces = {password, *re.split(r"[#/?@:%]", password)}
    for piece in sorted(pieces, key=len, reverse=True):
        if len(piece) >= 2 or piece == password:
            message = message.replace(piece, "***")
    return message


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs and check-config."""
    # Not urlsplit: a password with an unescaped '#', '?' or '/' would fool it and be
    # printed whole.  Everything between "user:" and the last '@' is the password.
    match = _USERINFO.match(url)
    if match is None:
        return url
    return f"{match.group(1)}***{match.group(3)}"
