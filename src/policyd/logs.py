"""Where log lines go: syslog (facility daemon, ident policyd) or stderr in the foreground."""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys

LOGGER_NAME = "policyd"
SYSLOG_SOCKET = "/dev/log"

log = logging.getLogger(LOGGER_NAME)


def setup_logging(foreground: bool, level: str = "info", syslog_socket: str = SYSLOG_SOCKET) -> None:
    """Send policyd's log lines to syslog, or to stderr when in the foreground.

    Without a syslog socket (a container, say) lines go to stderr, with one warning,
    rather than the daemon refusing to start.
    """
    root = logging.getLogger(LOGGER_NAME)
    for old_handler in list(root.handlers):
        root.removeHandler(old_handler)
        old_handler.close()
    root.setLevel(level.upper())
    root.propagate = False
    fallback_reason = None
    handler: logging.Handler | None = None
    if not foreground:
        try:
            # Python's SysLogHandler swallows a failed connect and then fails on every
            # line; so check the socket ourselves first.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
                probe.connect(syslog_socket)
            syslog = logging.handlers.SysLogHandler(
                address=syslog_socket,
                facility=logging.handlers.SysLogHandler.LOG_DAEMON,
                socktype=socket.SOCK_DGRAM,
            )
            syslog.ident = f"{LOGGER_NAME}[{os.getpid()}]: "
            syslog.setFormatter(logging.Formatter("%(message)s"))
            handler = syslog
        except OSError as error:
            fallback_reason = f"no syslog at {syslog_socket} ({error.strerror or error}); logging to stderr"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter(
                "%(asctime)s policyd[%(process)d] %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"
            )
        )
    root.addHandler(handler)
    if fallback_reason:
        root.warning(fallback_reason)


def set_level(level: str) -> None:
    logging.getLogger(LOGGER_NAME).setLevel(level.upper())
