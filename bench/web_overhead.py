#!/usr/bin/env python3
"""What the HTTP listener costs the policy answers: the same load with and without it.

    .venv/bin/python bench/web_overhead.py                  # 2 rounds each, 10 s, -c 20
    .venv/bin/python bench/web_overhead.py --rounds 3 --duration 15

Runs the real `policyd serve` (SQLite, the shipped defaults, logging to a syslog sink as
bench/run_bench.py does) under ../shared/tools/policy-bench, alternately:

- off:        no http_listen;
- scraped:    http_listen, /metrics scraped every second and / every 5 s (a Prometheus
              at a harsh interval and an admin with the page open);
- hammered:   http_listen, 4 clients fetching /, /metrics and a user's page back to
              back as fast as the listener answers them.

and prints each mode's mean throughput, its ratio to "off", and the policy answers'
latency (p50/p99/max).  Absolute numbers on a shared 2-core machine drift; compare the
ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT.parent / "shared" / "tools"
sys.path.insert(0, str(ROOT / "bench"))

from run_bench import free_port, stop, wait_for_port  # noqa: E402

MODES = ("off", "scraped", "hammered")


class Fetcher(threading.Thread):
    """GETs `paths` in turn, every `interval` seconds (0: back to back) until stopped."""

    def __init__(self, base: str, paths: list[str], interval: float) -> None:
        super().__init__(daemon=True)
        self.base, self.paths, self.interval = base, paths, interval
        self.done = threading.Event()
        self.fetched = 0
        self.failed = 0

    def run(self) -> None:
        index = 0
        while not self.done.is_set():
            try:
                with urllib.request.urlopen(
                    self.base + self.paths[index % len(self.paths)], timeout=10
                ) as answer:
                    answer.read()
                self.fetched += 1
            except OSError:
                self.failed += 1
            index += 1
            if self.interval:
                self.done.wait(self.interval)


def one_run(mode: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    port, http_port = free_port(), free_port()
    sink_socket = workdir / "syslog.sock"
    sink_socket.unlink(missing_ok=True)
    sink = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "syslog_sink.py"),
            str(sink_socket),
            str(workdir / "syslog.txt"),
        ]
    )
    while not sink_socket.exists():
        time.sleep(0.01)
    database = workdir / f"{mode}.sqlite"
    for old in workdir.glob(f"{mode}.s*"):
        old.unlink()
    config = workdir / "policyd.cfg"
    config.write_text(
        f"bind = 127.0.0.1\nport = {port}\ndatabase = sqlite://{database}\n"
        f"spool = {workdir}/{mode}.spool\nsyslog_socket = {sink_socket}\n"
        + (f"http_listen = 127.0.0.1:{http_port}\n" if mode != "off" else "")
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "policyd", "serve", "-c", str(config)],
        stderr=(workdir / f"{mode}.stderr").open("wb"),
    )
    fetchers: list[Fetcher] = []
    try:
        wait_for_port(port, process)
        if mode != "off":
            wait_for_port(http_port, process)
        base = f"http://127.0.0.1:{http_port}"
        if mode == "scraped":
            fetchers = [Fetcher(base, ["/metrics"], 1.0), Fetcher(base, ["/"], 5.0)]
        elif mode == "hammered":
            paths = ["/", "/metrics", "/user?name=u0000001", "/healthz"]
            fetchers = [Fetcher(base, paths[index:] + paths[:index], 0) for index in range(4)]
        for fetcher in fetchers:
            fetcher.start()
        result = subprocess.run(
            [
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
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for fetcher in fetchers:
            fetcher.done.set()
        for fetcher in fetchers:
            fetcher.join(15)
        stop(process)
        stop(sink)
    figures: dict[str, Any] = json.loads(result.stdout)
    figures["http_fetches"] = sum(fetcher.fetched for fetcher in fetchers)
    figures["http_failures"] = sum(fetcher.failed for fetcher in fetchers)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("-c", "--connections", type=int, default=20)
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="policyd-web-bench-") as directory:
        for _ in range(args.rounds):
            for mode in MODES:
                runs[mode].append(one_run(mode, args, Path(directory)))
    base = statistics.mean(run["throughput_rps"] for run in runs["off"])
    print("| mode | requests/s | ratio to off | p50 ms | p99 ms | max ms | HTTP fetches (failed) |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        rate = statistics.mean(run["throughput_rps"] for run in runs[mode])
        latency = {key: max(run["latency_ms"][key] for run in runs[mode]) for key in ("p50", "p99", "max")}
        fetches = sum(run["http_fetches"] for run in runs[mode])
        failures = sum(run["http_failures"] for run in runs[mode])
        print(
            f"| {mode} | {rate:.0f} | {rate / base:.3f} | {latency['p50']} | {latency['p99']} | "
            f"{latency['max']} | {fetches} ({failures}) |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
