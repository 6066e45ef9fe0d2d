"""Storage backends, chosen by the scheme of the `database` URL.

A backend's driver is imported only when that backend is chosen, so an SQLite-only
install needs none of the MariaDB/PostgreSQL drivers.
"""

from __future__ import annotations

import importlib
import re

from policyd.storage.base import Event, SenderStats, Storage, StorageError

__all__ = ["BACKENDS", "Event", "SenderStats", "Storage", "StorageError", "create_storage", "mask_url"]

# scheme -> (module, class, pip extra that brings its driver)
BACKENDS: dict[str, tuple[str, str, str | None]] = {
    "sqlite": ("policyd.storage.sqlite", "SQLiteStorage", None),
    "mysql": ("policyd.storage.mysql", "MySQLStorage", "mysql"),
    "mariadb": ("policyd.storage.mysql", "MySQLStorage", "mysql"),
    "postgresql": ("policyd.storage.postgresql", "PostgreSQLStorage", "postgresql"),
    "postgres": ("policyd.storage.postgresql", "PostgreSQLStorage", "postgresql"),
}


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
    return backend.from_url(url, table)


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs and check-config."""
    # Not urlsplit: a password with an unescaped '#', '?' or '/' would fool it and be
    # printed whole.  Everything between "user:" and the last '@' is the password.
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:)(.*)(@[^@]*)$", url, re.DOTALL)
    if match is None:
        return url
    return f"{match.group(1)}***{match.group(3)}"
