"""Where log lines go: syslog (facility daemon, ident policyd) or stderr in the foreground.

At the shipped `log_level = info` every counted message logs go-policyd's line, so a
line must be cheap and must never wait: the syslog socket is non-blocking, and a line
the syslog daemon has no room for is dropped and counted (said once it has room again)
rather than holding up the answers.  The logging module's per-line lookups of the
caller's file, thread and process are switched off (they are never shown).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

LOGGER_NAME = "policyd"
SYSLOG_SOCKET = "/dev/log"
# syslog facility "daemon" (RFC 3164) and the severities of Python's levels.
_FACILITY_DAEMON = 3
_SEVERITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
_STARTED_NS = time.time_ns()

log = logging.getLogger(LOGGER_NAME)

# Control characters (but newline and tab), which a user name or sender may hold: shown
# raw they would move the cursor, retitle or recolour the admin's terminal.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def printable(text: str) -> str:
    """`text` with its control characters as \\xNN: for the log, `policyd top`, any terminal."""
    return _CONTROL.sub(_escaped, text)


class PrintableFormatter(logging.Formatter):
    """A formatter whose lines carry no control character (see printable)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


class LeanRecord(logging.LogRecord):
    """A log record without what policyd never shows (source file, thread, process), made
    for every counted message at log_level = info, so made cheap.  Installed with
    logging.setLogRecordFactory (the documented hook): every logger in the process gets
    complete records, the drivers' included."""

    def __init__(  # noqa: PLR0917 - the signature LogRecord's factory is called with
        self,
        name: str,
        level: int,
        pathname: str,
        lineno: int,
        msg: object,
        args: Any,
        exc_info: Any,
        func: str | None = None,
        sinfo: str | None = None,
        **_: object,
    ) -> None:
        now = time.time_ns()
        self.name = name
        self.msg = msg
        if args and len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
            args = args[0]  # logging's rule: one mapping argument is the mapping
        self.args = args
        self.levelname = logging.getLevelName(level)
        self.levelno = level
        self.pathname = self.filename = pathname
        self.module = "policyd"
        self.exc_info = exc_info
        self.exc_text = None
        self.stack_info = sinfo
        self.lineno = lineno
        self.funcName = func or "(unknown function)"
        self.created = now / 1e9
        self.msecs = float(now % 1_000_000_000 // 1_000_000)
        self.relativeCreated = (now - _STARTED_NS) / 1e6
        self.thread = self.threadName = None
        self.processName = self.process = None
        self.taskName = None


class SyslogHandler(logging.Handler):
    """Lines as a local syslog daemon reads them: ``<priority>policyd[pid]: message``, one
    datagram each, on a unix socket that never blocks."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.dropped = 0  # lines the syslog daemon had no room for, not reported yet
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.connect(path)
        self._socket.setblocking(False)
        self._ident = f"policyd[{os.getpid()}]: "

    def emit(self, record: logging.LogRecord) -> None:
        # The message alone, or with its traceback; no formatting beyond that.
        self.send_line(record.levelno, self.format(record) if record.exc_info else record.getMessage())

    def send_line(self, level: int, message: str) -> None:
        """Send one line (after the count of those dropped, if any were)."""
        try:
            if self.dropped:
                notice = f"syslog had no room for {self.dropped} lines; they were dropped"
                if not self._send(logging.WARNING, notice):
                    self.dropped += 1
                    return
                self.dropped = 0
            if not self._send(level, message):
                self.dropped += 1
        except OSError as error:
            # The syslog daemon is gone for good: say so on stderr, as logging would.
            print(f"policyd: cannot log to syslog at {self.path}: {error}", file=sys.stderr)

    def _send(self, level: int, message: str) -> bool:
        """Send one line; False if the syslog daemon has no room for it now."""
        priority = _FACILITY_DAEMON * 8 + _SEVERITY.get(level, 6)
        data = f"<{priority}>{self._ident}{printable(message)}\x00".encode("utf-8", "backslashreplace")
        try:
            self._socket.send(data)
        except BlockingIOError:
            return False
        except OSError:
            # The syslog daemon restarted (a new socket at the same path): connect again.
            self._socket.close()
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.connect(self.path)
            self._socket.setblocking(False)
            self._socket.send(data)
        return True

    def close(self) -> None:
        self._socket.close()
        super().close()


def setup_logging(foreground: bool, level: str = "info", syslog_socket: str = SYSLOG_SOCKET) -> None:
    """Send policyd's log lines to syslog, or to stderr when in the foreground.

    Without a syslog socket (a container, say) lines go to stderr, with one warning,
    rather than the daemon refusing to start.
    """
    # Never shown, looked up for every line otherwise (the logging HOWTO's "Optimization").
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.setLogRecordFactory(LeanRecord)
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
            handler = SyslogHandler(syslog_socket)
        except OSError as error:
            fallback_reason = f"no syslog at {syslog_socket} ({error.strerror or error}); logging to stderr"
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            PrintableFormatter(
                f"%(asctime)s policyd[{os.getpid()}] %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S"
            )
        )
    root.addHandler(handler)
    if fallback_reason:
        root.warning(fallback_reason)


def set_level(level: str) -> None:
    logging.getLogger(LOGGER_NAME).setLevel(level.upper())


def info(message: str) -> None:
    """Log `message` at info: the line of every counted message, so a fast path.

    When policyd's logger sends straight to syslog (the daemon's usual set-up: one
    SyslogHandler, no filters), the line goes to the socket without the logging
    module's record and handler machinery, which costs several times the send itself.
    Otherwise (stderr, tests capturing the lines) it is an ordinary log.info().
    """
    if log.level > logging.INFO:
        return
    handlers = log.handlers
    if len(handlers) == 1 and not log.filters:
        handler = handlers[0]
        if type(handler) is SyslogHandler and not handler.filters and handler.level <= logging.INFO:
            handler.send_line(logging.INFO, message)
            return
    log.info("%s", message)
