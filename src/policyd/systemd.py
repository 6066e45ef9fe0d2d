"""Tell systemd how the daemon is doing: the sd_notify protocol, stdlib only.

Under a ``Type=notify`` unit systemd passes the path of a unix datagram socket in
``$NOTIFY_SOCKET`` (a leading ``@`` means an abstract socket) and reads newline-separated
``KEY=value`` lines from it (``READY=1``, ``STATUS=...``, ``WATCHDOG=1``...).  Outside
systemd the variable is unset and every function here does nothing and returns False.
None of them raises: a daemon must not stop because its supervisor went away.

Our own ~50 lines rather than a dependency: ``sdnotify`` (PyPI) has had no release since
2017, has no type hints and no watchdog helpers; ``systemd-python`` needs libsystemd's
headers and a compiler to install.  Protocol: sd_notify(3), sd_watchdog_enabled(3).
"""

from __future__ import annotations

import os
import socket
import time


def notify(*lines: str) -> bool:
    """Send `lines` (``KEY=value`` each) as one message; True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not lines or len(address) < 2 or address[0] not in "/@":
        return False  # unset, or a kind we do not speak (vsock:...): nothing to tell
    if address[0] == "@":
        address = "\0" + address[1:]
    message = "\n".join(lines).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except (OSError, ValueError):  # no such socket, refused, full; ValueError: NUL in a path
        return False
    return True


def _one_line(text: str) -> str:
    return " ".join(text.replace("\0", " ").splitlines())


def ready(status: str | None = None) -> bool:
    """Startup is done (listening): systemd now considers the unit started."""
    return notify("READY=1", f"STATUS={_one_line(status)}") if status else notify("READY=1")


def reloading() -> bool:
    """A reload began; send ``ready()`` when it is done (the unit is "reloading" until then)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    """Shutdown began."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Free-form one-line status, shown by ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog_ping() -> bool:
    """Still alive (``WatchdogSec=``): call at least every ``watchdog_interval()`` seconds."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """How often to ping, in seconds (half of ``WatchdogSec=``); None when there is no watchdog.

    Like sd_watchdog_enabled(3): ``$WATCHDOG_USEC`` must be a positive integer, and when
    ``$WATCHDOG_PID`` is set it must be this process (not a parent that exec'd or forked us).
    """
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
        pid = os.environ.get("WATCHDOG_PID")
        if usec <= 0 or (pid is not None and int(pid) != os.getpid()):
            return None
    except ValueError:
        return None
    return usec / 2_000_000
