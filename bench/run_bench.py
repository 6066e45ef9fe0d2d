#!/usr/bin/env python3
"""Measure policyd against the do-nothing reference server, in the same run.

    .venv/bin/python bench/run_bench.py                      # SQLite, empty table
    .venv/bin/python bench/run_bench.py --history 1000000    # with 1M rows over 7 days
    .venv/bin/python bench/run_bench.py --database mysql://u:p@127.0.0.1:3306/db

Starts ../shared/tools/policy-reference-server and `policyd serve` (a subprocess on a
temp config), drives each with ../shared/tools/policy-bench for the same duration and
connections, and prints both results and their ratio.  Absolute numbers on a shared
2-core machine drift from run to run; the ratio is what to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from policyd.quota import Outcome
from policyd.storage import Event, create_storage

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT.parent / "shared" / "tools"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("server did not start listening")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def bench(port: int, args: argparse.Namespace) -> dict[str, object]:
    command = [
        sys.executable,
        str(TOOLS / "policy-bench"),
        "--target",
        f"127.0.0.1:{port}",
        "-c",
        str(args.connections),
        "--duration",
        str(args.duration),
        "--warmup",
        str(args.warmup),
        "--users",
        str(args.users),
        "--json",
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    data: dict[str, object] = json.loads(result.stdout)
    return data


async def fill_history(url: str, table: str, rows: int, users: int) -> None:
    """`rows` events spread over the last 7 days among `users` users (u0000000 ...)."""
    storage = create_storage(url, table)
    await storage.open()
    await storage.migrate()
    rng = random.Random(42)
    now = datetime.now(UTC)
    batch: list[Event] = []
    started = time.monotonic()
    for index in range(rows):
        batch.append(
            Event(
                ts=now - timedelta(seconds=rng.uniform(0, 7 * 86400)),
                sasl_username=f"u{rng.randrange(users):07d}",
                sender="history@example.org",
                client_address="192.0.2.1",
                recipient_count=rng.randint(1, 5),
                outcome=Outcome.DUNNO,
            )
        )
        if len(batch) == 5000 or index == rows - 1:
            await storage.add_events(batch)
            batch = []
    count = await storage.count_events()
    await storage.close()
    print(f"history: {count} rows in {time.monotonic() - started:.0f}s", file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database", help="database URL (default: a temp SQLite file)")
    parser.add_argument(
        "--server",
        choices=["mariadb", "postgresql"],
        help="start a private MariaDB/PostgreSQL (as the tests do) and use it",
    )
    parser.add_argument("--table", default="events_bench")
    parser.add_argument("--history", type=int, default=0, help="rows of history to insert first")
    parser.add_argument("--history-users", type=int, default=10_000)
    parser.add_argument("-c", "--connections", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--users", type=int, default=1000, help="distinct users in the load")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="policyd-bench-"))
    with contextlib.ExitStack() as servers:
        url = args.database or f"sqlite://{workdir}/bench.sqlite"
        if args.server:
            sys.path.insert(0, str(ROOT))
            from tests import dbservers

            server_class = dbservers.MariaDBServer if args.server == "mariadb" else dbservers.PostgreSQLServer
            url = servers.enter_context(server_class()).url
        return run(args, workdir, url)


def run(args: argparse.Namespace, workdir: Path, url: str) -> int:
    if args.history:
        asyncio.run(fill_history(url, args.table, args.history, args.history_users))

    reference_port = free_port()
    reference = subprocess.Popen(
        [sys.executable, str(TOOLS / "policy-reference-server"), "--listen", f"127.0.0.1:{reference_port}"],
        stderr=subprocess.DEVNULL,
    )
    port = free_port()
    config = workdir / "policyd.cfg"
    config.write_text(
        f"bind = 127.0.0.1\nport = {port}\ndatabase = {url}\npolicy_table = {args.table}\n"
        f"spool = {workdir}/policyd.spool\nlog_level = warning\n"
    )
    policyd = subprocess.Popen(
        [sys.executable, "-m", "policyd", "serve", "-c", str(config), "--foreground"],
        stderr=open(workdir / "policyd.log", "wb"),  # noqa: SIM115 - closed with the process
        env={**os.environ},
    )
    try:
        wait_for_port(reference_port, reference)
        wait_for_port(port, policyd)
        reference_result = bench(reference_port, args)
        policyd_result = bench(port, args)
    finally:
        stop(policyd)
        stop(reference)
    ratio = float(policyd_result["throughput_rps"]) / float(reference_result["throughput_rps"])  # type: ignore[arg-type]
    summary = {
        "database": url.rsplit("@", maxsplit=1)[-1],
        "history_rows": args.history,
        "connections": args.connections,
        "duration_s": args.duration,
        "reference_rps": reference_result["throughput_rps"],
        "policyd_rps": policyd_result["throughput_rps"],
        "ratio": round(ratio, 3),
        "policyd_latency_ms": policyd_result["latency_ms"],
        "policyd_errors": policyd_result["errors"],
        "policyd_actions": policyd_result["actions"],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        latency = policyd_result["latency_ms"]
        print(f"database          {summary['database']}  (history rows: {args.history})")
        print(f"reference server  {reference_result['throughput_rps']:>9} req/s")
        print(f"policyd           {policyd_result['throughput_rps']:>9} req/s  ratio {ratio:.2f}")
        print(f"policyd latency   {latency}")  # p50/p90/p99 in ms
        print(f"policyd errors    {policyd_result['errors']}  actions {policyd_result['actions']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
