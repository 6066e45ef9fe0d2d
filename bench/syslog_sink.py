#!/usr/bin/env python3
"""A syslog socket for the bench: reads every datagram, as a syslog daemon would.

    syslog_sink.py SOCKET_PATH OUTPUT

Counts the lines; writes every line but go-policyd's per-message ones to OUTPUT, and the
count at the end (SIGTERM).
"""

from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path


def main() -> int:
    path, output = sys.argv[1], Path(sys.argv[2])
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    sink.bind(path)
    kept: list[str] = []
    lines = 0

    def finish(*_: object) -> None:
        kept.append(f"sink: {lines} lines")
        output.write_text("\n".join(kept) + "\n")
        sys.exit(0)

    signal.signal(signal.SIGTERM, finish)
    while True:
        line = sink.recv(65536).decode("utf-8", "replace").rstrip("\x00")
        lines += 1
        if "Updating db:" not in line:
            kept.append(line)


if __name__ == "__main__":
    sys.exit(main())
