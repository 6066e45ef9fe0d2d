#!/usr/bin/env python3
"""The inputs of docs/scaling.md, measured: what one event costs the database, what a
user costs the window, what the tail costs per relay.

    .venv/bin/python bench/sizing.py                      # MariaDB, PostgreSQL, Galera
    .venv/bin/python bench/sizing.py --backend mariadb --events 200000

For each database (private servers started from Debian's packages as the tests do,
tests/dbservers.py; MariaDB and PostgreSQL with bench/run_bench.py's production-like
caches, the Galera cluster as the tests run it: 3 nodes on this machine):

- the database cost per event: `--events` events among 10,000 users written through
  the real backend (`add_events`, batches of 500 as the daemon's writer makes them),
  then the table's data and index bytes per row (after ANALYZE), and the servers' CPU
  (utime + stime of every server process, all nodes for Galera) per batch and per event;
- the cost of a commit alone: 2,000 transactions of one event each (the writer's batches
  when the load is light), server CPU per commit;
- the tail's cost: 400 polls as a relay makes them every 250 ms (`tail` after the top
  id, nothing new: the steady state), timed, with the servers' CPU per poll; and 50
  polls that each find 1,000 rows, for the servers' CPU per row read.

And, with no database, the window's memory (tracemalloc) for 10,000 users holding 1, 10
and 100 events each.  Prints one JSON object per measurement and a summary table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from run_bench import BenchMariaDB, BenchPostgreSQL  # noqa: E402
from tests import dbservers  # noqa: E402

from policyd.decider import to_ms  # noqa: E402
from policyd.quota import Outcome  # noqa: E402
from policyd.storage import Event, Storage, create_storage  # noqa: E402
from policyd.window import Window  # noqa: E402

USERS = 10_000
BATCH = 500  # the writer's MAX_BATCH_EVENTS
POLLS = 400
SINGLES = 2000
TAIL_ROWS = 1000
ROW_POLLS = 50
DAY_MS = 86_400_000


def process_cpu(pid: int) -> float:
    """utime + stime of a process and its live children (PostgreSQL's backends)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(stat.parent.name) == pid or int(fields[1]) == pid:
                total += (int(fields[11]) + int(fields[12])) / ticks
    return total


@contextlib.contextmanager
def servers(backend: str) -> Iterator[tuple[str, list[int], Any]]:
    """(URL, server pids, an object with admin_execute) of a fresh database."""
    if backend == "galera":
        with dbservers.GaleraCluster() as cluster:
            cluster.create_database("sizing")
            yield cluster.url_for("sizing"), [node.pid or 0 for node in cluster.nodes], cluster
        return
    server_class = BenchMariaDB if backend == "mariadb" else BenchPostgreSQL
    with server_class() as server:
        url = server.create_database("sizing")
        yield url, [server.pid or 0], server


def table_bytes(backend: str, admin: Any) -> tuple[int, int, int]:
    """(rows, data bytes, index bytes) of the events table."""
    if backend == "postgresql":
        admin.admin_execute("ANALYZE events", "sizing")
        out = admin.admin_execute(
            "SELECT (SELECT COUNT(*) FROM events), pg_table_size('events'), pg_indexes_size('events')",
            "sizing",
        )
    else:
        admin.admin_execute("ANALYZE TABLE events", "sizing")
        out = admin.admin_execute(
            "SELECT (SELECT COUNT(*) FROM events), DATA_LENGTH, INDEX_LENGTH FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = 'sizing' AND TABLE_NAME = 'events'",
            "sizing",
        )
    rows, data, index = (int(value) for value in out.split())
    return rows, data, index


async def measure_database(backend: str, events: int) -> dict[str, Any]:
    with servers(backend) as (url, pids, admin):
        storage: Storage = create_storage(url, "events")
        await storage.open()
        try:
            await storage.migrate()
            now = datetime.now(UTC)
            spread = timedelta(hours=23) / events
            batches = [
                [
                    Event(
                        now - spread * (events - n),
                        f"user{n % USERS}@example.org",
                        f"sender{n % 3}@example.org",
                        "192.0.2.1",
                        1 + n % 5,
                        Outcome.DUNNO,
                        queue_id=f"Q{n:010d}",
                    )
                    for n in range(start, min(start + BATCH, events))
                ]
                for start in range(0, events, BATCH)
            ]
            cpu_before = sum(process_cpu(pid) for pid in pids)
            started = time.perf_counter()
            for batch in batches:
                await storage.add_events(batch, origin="sizing-writer")
            write_seconds = time.perf_counter() - started
            write_cpu = sum(process_cpu(pid) for pid in pids) - cpu_before
            rows, data, index = table_bytes(backend, admin)

            # One event per transaction: the writer's batches when the load is light.
            singles = [
                [Event(now, f"single{n % USERS}", "s@example.org", "192.0.2.1", 1, Outcome.DUNNO)]
                for n in range(SINGLES)
            ]
            cpu_before = sum(process_cpu(pid) for pid in pids)
            started = time.perf_counter()
            for batch in singles:
                await storage.add_events(batch, origin="sizing-writer")
            single_seconds = time.perf_counter() - started
            single_cpu = sum(process_cpu(pid) for pid in pids) - cpu_before

            # Polls that find rows: the last TAIL_ROWS rows of the table each time.
            top = await storage.max_event_id()
            ids = [row.row_id for row in (await storage.tail(0, "sizing-reader", 10**9)).rows]
            after = ids[-TAIL_ROWS - 1]
            cpu_before = sum(process_cpu(pid) for pid in pids)
            for _ in range(ROW_POLLS):
                assert len((await storage.tail(after, "sizing-reader", 10_000)).rows) == TAIL_ROWS
            row_cpu = (sum(process_cpu(pid) for pid in pids) - cpu_before) / (ROW_POLLS * TAIL_ROWS)

            cpu_before = sum(process_cpu(pid) for pid in pids)
            latencies = []
            for _ in range(POLLS):
                began = time.perf_counter()
                await storage.tail(top, "sizing-reader", 10_000)
                latencies.append(time.perf_counter() - began)
            poll_cpu = (sum(process_cpu(pid) for pid in pids) - cpu_before) / POLLS
        finally:
            await storage.close()
    latencies.sort()
    return {
        "backend": backend,
        "events": rows,
        "data_bytes_per_event": round(data / rows),
        "index_bytes_per_event": round(index / rows),
        "write_events_per_second": round(rows / write_seconds),
        "server_cpu_ms_per_batch": round(write_cpu / len(batches) * 1000, 2),
        "server_cpu_us_per_event": round(write_cpu / rows * 1e6, 1),
        "single_event_commits_per_second": round(SINGLES / single_seconds),
        "server_cpu_ms_per_single_commit": round(single_cpu / SINGLES * 1000, 2),
        "tail_server_cpu_us_per_row_read": round(row_cpu * 1e6, 1),
        "tail_poll_ms_p50": round(latencies[len(latencies) // 2] * 1000, 2),
        "tail_poll_ms_max": round(latencies[-1] * 1000, 2),
        "server_cpu_us_per_poll": round(poll_cpu * 1e6),
    }


def measure_window(events_per_user: int) -> dict[str, Any]:
    now = to_ms(datetime.now(UTC))
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    window = Window([DAY_MS])
    for user in range(USERS):
        name = f"user{user}@example.org"
        for n in range(events_per_user):
            window.add(name, now - DAY_MS // 2 + n * 1000, 1 + n % 5, Outcome.DUNNO, now)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    names = sum(sys.getsizeof(f"user{user}@example.org") for user in range(USERS))
    return {
        "window_users": USERS,
        "events_per_user": events_per_user,
        "bytes_per_user": round(used / USERS),
        "of_which_name_bytes": round(names / USERS),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", action="append", choices=["mariadb", "postgresql", "galera"])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    results = [measure_window(count) for count in (1, 10, 100)]
    for result in results:
        print(json.dumps(result), flush=True)
    for backend in args.backend or ["mariadb", "postgresql", "galera"]:
        result = asyncio.run(measure_database(backend, args.events))
        print(json.dumps(result), flush=True)
        results.append(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
