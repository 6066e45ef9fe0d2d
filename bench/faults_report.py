#!/usr/bin/env python3
"""Run the fault tests (tests/test_faults.py) and print their figures as a markdown table.

    .venv/bin/python bench/faults_report.py                    # both backends
    .venv/bin/python bench/faults_report.py -k postgresql      # more pytest arguments
    .venv/bin/python bench/faults_report.py --json figures.jsonl

Each test starts its database server(s) and `policyd serve` itself, drives 10
connections of steady load through a fault, and records one row of figures; this
script collects the rows (through $POLICYD_FAULT_FIGURES), prints the table, then the
checks that failed, if any.  Exits with pytest's status.  About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

COLUMNS = [
    ("backend", "backend"),
    ("fault", "fault"),
    ("requests_sent", "requests sent"),
    ("requests_answered", "answered"),
    ("events_sent", "events sent"),
    ("events_in_db", "events in DB"),
    ("lost", "lost"),
    ("max_latency_ms", "max latency ms"),
    ("p99_ms", "p99 ms"),
    ("outage_s", "DB down s"),
    ("recovery_under_load_s", "caught up s"),
    ("result", "result"),
]


def lost(row: dict[str, Any]) -> str:
    """Events sent and answered that are not in the database, and why."""
    answered = row.get("events_answered")
    in_db = row.get("events_in_db")
    if answered is None or in_db is None:
        return "?"
    if "in_flight_at_kill" in row:  # in flight at the kill: not answered, may be in the DB
        missing = answered + row.get("in_flight_kept", 0) - in_db
        return (
            f"{missing} ({row['in_flight_at_kill']} in flight at kill, {row.get('in_flight_kept', 0)} kept)"
        )
    missing = answered - in_db
    if row.get("lost_by_design"):
        return f"{missing} ({row['lost_by_design']} dropped, spool full)"
    return str(missing)


def cell(row: dict[str, Any], key: str) -> str:
    if key == "lost":
        return lost(row)
    value = row.get(key)
    if value is None:
        return "-" if key != "recovery_under_load_s" else "not in 5 s"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in sorted(rows, key=lambda r: (r.get("fault", ""), r.get("backend", ""))):
        lines.append("| " + " | ".join(cell(row, key) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", help="also keep the raw rows (JSON lines) in this file")
    args, pytest_args = parser.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="policyd-faults-") as tmp:
        figures = Path(args.json).resolve() if args.json else Path(tmp) / "figures.jsonl"
        if figures.exists():
            figures.unlink()
        command = [
            sys.executable,
            "-m",
            "pytest",
            "tests/test_faults.py",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
        ]
        environment = {**os.environ, "POLICYD_FAULT_FIGURES": str(figures)}
        result = subprocess.run(
            [*command, *pytest_args], check=False, cwd=ROOT, env=environment, capture_output=True, text=True
        )
        rows = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    if not rows:
        sys.stdout.write(result.stdout[-4000:] + result.stderr[-4000:])
        print("no figures: did the tests run?", file=sys.stderr)
        return result.returncode or 1
    print(table(rows))
    failed = [row for row in rows if row.get("failures")]
    if failed:
        print("\nFailed checks:")
        for row in failed:
            for failure in row["failures"]:
                print(f"- {row['backend']}, {row['fault']}: {failure}")
    summary = [line for line in result.stdout.splitlines() if " passed" in line or " failed" in line]
    print(f"\npytest: {summary[-1] if summary else 'exit status ' + str(result.returncode)}")
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
