"""HTTP basic auth against a password hash kept in the config file.

The hash is PBKDF2-SHA256 in the usual ``pbkdf2_sha256$iterations$salt$hash`` text
(salt and hash in base64), made by ``policyd hash-password``.  Checking one costs a
fraction of a second of CPU on purpose, so it runs in a thread of its own (never on the
event loop), one at a time, and a header once found right is remembered (as a keyed
digest, not the password) so that a dashboard's scrapes do not pay it again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets

SCHEME = "pbkdf2_sha256"
# OWASP's 2023 figure for PBKDF2-HMAC-SHA256.
DEFAULT_ITERATIONS = 600_000
_HASH_RE = re.compile(r"^pbkdf2_sha256\$(\d{1,9})\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)$")
# Headers remembered as right, at most (one per admin and tool, in practice).
REMEMBERED_MAX = 64


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None) -> str:
    salt = secrets.token_bytes(16) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return f"{SCHEME}${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def parse_password_hash(text: str) -> str:
    """The config value checked (a ValueError says what is wrong, never echoing it)."""
    match = _HASH_RE.match(text.strip())
    if not match:
        raise ValueError(
            "not a password hash like pbkdf2_sha256$600000$...$... (make one: policyd hash-password)"
        )
    if int(match.group(1)) < 1000:
        raise ValueError("fewer than 1000 iterations: make a new hash with policyd hash-password")
    try:
        base64.b64decode(match.group(2), validate=True)
        base64.b64decode(match.group(3), validate=True)
    except binascii.Error:
        raise ValueError("the salt or the hash is not base64 (make one: policyd hash-password)") from None
    return text.strip()


def check_password(password: str, encoded: str) -> bool:
    match = _HASH_RE.match(encoded)
    if not match:
        return False
    iterations, salt, expected = int(match.group(1)), base64.b64decode(match.group(2)), match.group(3)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return hmac.compare_digest(base64.b64encode(digest).decode(), expected)


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user, password) from an ``Authorization: Basic ...`` value; None if not that."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, colon, password = decoded.partition(":")
    return (user, password) if colon else None


class Remembered:
    """Authorization headers already found right, as digests keyed by a per-process secret."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)
        self._digests: dict[bytes, None] = {}

    def _digest(self, header: str) -> bytes:
        return hmac.digest(self._key, header.encode("utf-8", "surrogateescape"), "sha256")

    def __contains__(self, header: object) -> bool:
        return isinstance(header, str) and self._digest(header) in self._digests

    def add(self, header: str) -> None:
        if len(self._digests) >= REMEMBERED_MAX:
            self._digests.pop(next(iter(self._digests)))
        self._digests[self._digest(header)] = None
