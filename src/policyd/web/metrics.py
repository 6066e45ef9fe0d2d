"""/metrics: the stats object and the daemon's state in Prometheus's text format.

Through the official prometheus_client, with one custom collector that reads everything
at scrape time (nothing is updated on the policy path for Prometheus's sake: the
counters are the stats object's own, which only grow).  Its own registry, not the
library's global one: two daemons in one process (the tests) do not mix.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from policyd import __version__
from policyd.quota import Outcome
from policyd.stats import Histogram
from policyd.web.health import check
from policyd.web.listener import Request, Response

if TYPE_CHECKING:
    from policyd.daemon import Daemon
    from policyd.web.listener import WebListener


class PolicydCollector(Collector):
    def __init__(self, daemon: Daemon, web: WebListener) -> None:
        self.daemon = daemon
        self.web = web
        self.started = time.time()

    def collect(self) -> Iterator[Metric]:
        daemon, stats = self.daemon, self.daemon.stats
        info = InfoMetricFamily("policyd_build", "policyd's version and the Python running it")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info
        yield GaugeMetricFamily(
            "policyd_start_time_seconds", "When this daemon started (Unix time)", self.started
        )

        requests = CounterMetricFamily(
            "policyd_requests",
            "Policy requests answered, by Postfix protocol stage",
            labels=["protocol_state"],
        )
        for state, count in sorted(stats.requests.items()):
            requests.add_metric([state], count)
        yield requests
        decisions = CounterMetricFamily(
            "policyd_decisions",
            'Decisions by action and by the limit that decided ("" within every limit)',
            labels=["action", "limit"],
        )
        seen = set(stats.decisions)
        for outcome in Outcome:  # every action present from the start: rate() needs a zero
            if not any(key[0] == outcome.value for key in seen):
                decisions.add_metric([outcome.value, ""], 0)
        for (action, limit), count in sorted(stats.decisions.items()):
            decisions.add_metric([action, limit], count)
        yield decisions
        yield _histogram(
            "policyd_request_duration_seconds",
            "From a policy request read to its answer ready (waits for the spool or database included)",
            stats.request_seconds,
        )
        yield _histogram(
            "policyd_database_write_duration_seconds",
            "One batch of events written to the database",
            stats.write_seconds,
        )
        yield _histogram(
            "policyd_database_write_batch_events", "Events per database write", stats.write_batch_events
        )

        errors = CounterMetricFamily(
            "policyd_database_errors",
            "Database operations that failed or timed out, by operation (write, read, replay, load)",
            labels=["operation"],
        )
        for kind in ("write", "read", "replay", "load"):
            errors.add_metric([kind], stats.database_errors.get(kind, 0))
        for kind, count in sorted(stats.database_errors.items()):
            if kind not in {"write", "read", "replay", "load"}:
                errors.add_metric([kind], count)
        yield errors

        outage, writer, server, decider = daemon.outage, daemon.writer, daemon.server, daemon.decider
        health = check(daemon)
        yield GaugeMetricFamily(
            "policyd_database_up",
            "1 while the database takes the daemon's reads and writes",
            int(health.database == "ok"),
        )
        yield GaugeMetricFamily(
            "policyd_outage",
            "1 while a database outage lasts (deciding from memory, spooling)",
            int(outage is not None and outage.active),
        )
        yield GaugeMetricFamily(
            "policyd_healthy", "1 while the daemon can decide and record (/healthz 200)", int(health.ok)
        )
        if writer is not None:
            yield GaugeMetricFamily(
                "policyd_spool_pending_bytes",
                "Bytes of events in the spool the database does not have yet",
                writer.backlog_bytes,
            )
            yield GaugeMetricFamily(
                "policyd_spool_bytes", "Size of the spool's files", writer.spool.total_bytes
            )
            yield GaugeMetricFamily(
                "policyd_spool_ok", "1 while the spool takes events", int(writer.spool_ok)
            )
            yield GaugeMetricFamily(
                "policyd_events_queued", "Events waiting to be spooled or written", writer.queued
            )
        yield GaugeMetricFamily("policyd_spool_max_bytes", "spool_max_size", daemon.settings.spool_max_size)
        for name, value, text in (
            ("events_counted", stats.events_counted, "Counted messages handed to the writer"),
            ("events_spooled", stats.events_spooled, "Events appended to the spool"),
            ("events_written", stats.events_written, "Events committed to the database"),
            (
                "events_replayed",
                stats.events_replayed,
                "Of those, written while an outage lasted (its backlog)",
            ),
            (
                "events_dropped",
                stats.events_dropped,
                "Events lost: neither the spool nor the database took them",
            ),
            ("events_tailed", stats.events_tailed, "Other daemons' events read into the window"),
            (
                "tail_rereads",
                stats.tail_rereads,
                "Polls that read recent rows again: one had committed after higher ids",
            ),
            ("spool_damaged", stats.spool_damaged, "Damaged stretches of the spool skipped at start"),
            (
                "decided_during_outage",
                stats.decided_during_outage,
                "Decisions made while the database was unavailable",
            ),
            ("answered_error_action", stats.answered_error_action, "Requests answered with db_error_action"),
            ("strict_reads", stats.strict_reads, "Decisions that read other daemons' new events first"),
            ("connections_accepted", stats.connections_accepted, "Policy connections accepted"),
            (
                "connections_refused",
                stats.connections_refused,
                "Policy connections refused (allowed_clients, max_connections)",
            ),
            ("http_requests", self.web.requests, "HTTP requests answered by this listener"),
            (
                "http_connections_refused",
                self.web.refused,
                "HTTP connections refused (http_allowed_clients, too many)",
            ),
        ):
            yield CounterMetricFamily(f"policyd_{name}", text, value)
        if server is not None:
            yield GaugeMetricFamily(
                "policyd_connections_open", "Policy connections open", len(server.connections)
            )
        yield GaugeMetricFamily("policyd_max_connections", "max_connections", daemon.settings.max_connections)
        if decider is not None:
            yield GaugeMetricFamily(
                "policyd_window_users", "Users with events in the window", len(decider.window)
            )
            yield GaugeMetricFamily(
                "policyd_window_entries", "Entries the window holds", decider.window.entry_count
            )
            yield GaugeMetricFamily(
                "policyd_window_loaded",
                "1 once the window holds the database's history",
                int(decider.complete),
            )
        snapshot = self.web.scan.last
        over = GaugeMetricFamily(
            "policyd_users_over_limit",
            "Users at or past a HOLD threshold now (state held) or a REJECT threshold (state rejected)",
            labels=["state"],
        )
        over.add_metric(["held"], snapshot.held_count if snapshot else 0)
        over.add_metric(["rejected"], snapshot.rejected_count if snapshot else 0)
        yield over
        limits = GaugeMetricFamily(
            "policyd_limit_recipients",
            "The configured thresholds, recipients per window",
            labels=["limit", "threshold"],
        )
        for rule in daemon.settings.rules.limits:
            limits.add_metric([rule.label, "hold"], rule.hold)
            limits.add_metric([rule.label, "reject"], rule.reject)
        yield limits


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.total)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class MetricsEndpoint:
    def __init__(self, daemon: Daemon, web: WebListener) -> None:
        self.web = web
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(PolicydCollector(daemon, web))

    async def handle(self, request: Request) -> Response:
        await self.web.scan.snapshot()  # users over a limit: at most one window scan per few seconds
        return Response(200, generate_latest(self.registry), content_type=CONTENT_TYPE_LATEST)
