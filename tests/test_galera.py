"""Several relays on a real 3-node MariaDB Galera cluster (tests/dbservers.py GaleraCluster,
started once per session from Debian's galera-4 and mariadb-server, on 127.0.0.1).

- A URL listing several nodes: the storage moves to the next node when its node goes
  away (a TCP proxy in front of node 1 cut and restored) and back to the first once it
  answers again, losing nothing.
- Certification conflicts (1213) at commit are retried.
- Three daemons starting at once, one per node, migrate the schema once between them.
- The proof: three `policyd serve` processes, one per node, under a steady load on
  many users plus one user hammered from all three; one node SIGKILLed mid-run, then
  restarted (it rejoins by IST).  Every request answered in time, the hammered user's
  accepted recipients within the bound of docs/shared-database.md, every answered event
  in the cluster exactly once, on every node.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import policyd.storage.mysql
from policyd.quota import Outcome
from policyd.storage import Event, create_storage
from policyd.storage.mysql import MySQLStorage
from tests import dbservers
from tests.conftest import encode_request, make_settings, run_daemon
from tests.test_faults import DB_TIMEOUT, Load, Policyd, Sent, percentile
from tests.test_shared_database import COUNTED_ELSEWHERE_WITHIN
from tests.test_shared_database import _total as total_of

pytestmark = [pytest.mark.galera, pytest.mark.slow]

_numbers = itertools.count(1)
NOW = datetime.now(UTC).replace(microsecond=0)


@dataclass
class ClusterDatabase:
    cluster: dbservers.GaleraCluster
    name: str

    def url(self, order: tuple[int, ...] = (0, 1, 2)) -> str:
        """The database's URL with the nodes in this order (indexes into cluster.nodes)."""
        return self.cluster.url_for(self.name, [self.cluster.nodes[index] for index in order])

    def url_with(self, hosts: list[tuple[str, int]]) -> str:
        listed = ",".join(f"{host}:{port}" for host, port in hosts)
        return f"mysql://{self.cluster.user}:{self.cluster.password}@{listed}/{self.name}"

    def storage(self, url: str, table: str = "events") -> MySQLStorage:
        store = create_storage(url, table)
        assert isinstance(store, MySQLStorage)
        return store

    def counts(self, sql: str) -> list[str]:
        """The same query on every running node (after the cluster has settled)."""
        self.cluster.wait_synced()
        return [node.admin_execute(sql, self.name).strip() for node in self.cluster.nodes if node.running]


@pytest.fixture
def cluster_db(galera_cluster: dbservers.GaleraCluster) -> Iterator[ClusterDatabase]:
    name = f"galera_{os.getpid()}_{next(_numbers)}"
    galera_cluster.create_database(name)
    try:
        yield ClusterDatabase(galera_cluster, name)
    finally:
        for node in galera_cluster.nodes:
            if not node.running:  # a test that failed with a node down
                node.start_server()
        galera_cluster.wait_synced()
        galera_cluster.admin_execute(f"DROP DATABASE IF EXISTS `{name}`")


def events(count: int, user: str = "alice", recipients: int = 1) -> list[Event]:
    return [
        Event(
            NOW - timedelta(seconds=count - n),
            user,
            f"s{n}@example.org",
            "192.0.2.1",
            recipients,
            Outcome.DUNNO,
        )
        for n in range(count)
    ]


# ---------------------------------------------------------------------------
# several hosts in one URL
# ---------------------------------------------------------------------------


@pytest.fixture
async def proxy(galera_cluster: dbservers.GaleraCluster) -> AsyncIterator[dbservers.TcpProxy]:
    front = await dbservers.TcpProxy(galera_cluster.nodes[0].port).start()
    try:
        yield front
    finally:
        await front.cut()


async def test_the_next_node_when_one_goes_away_and_the_first_again_once_back(
    cluster_db: ClusterDatabase, proxy: dbservers.TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(policyd.storage.mysql, "PREFERRED_NODE_RETRY_SECONDS", 0.2)
    nodes = cluster_db.cluster.nodes
    store = cluster_db.storage(
        cluster_db.url_with(
            [(proxy.host, proxy.port), (nodes[1].host, nodes[1].port), (nodes[2].host, nodes[2].port)]
        )
    )
    await store.open()
    try:
        await store.migrate()
        batches = [events(5, user=f"u{n}") for n in range(4)]
        await store.add_events(batches[0])
        assert store.node == 0

        await proxy.cut()  # node 1 gone: connections reset, new ones refused
        await store.add_events(batches[1])  # retried on node 2, no error
        assert (store.node, store.port) == (1, nodes[1].port)
        assert await store.recipients_since("u1", NOW - timedelta(hours=1), [Outcome.DUNNO]) == 5

        await proxy.restore()
        deadline = time.monotonic() + 10
        while store.node != 0:
            assert time.monotonic() < deadline, "the first node was not taken back"
            await store.add_events(batches[2][:1])  # any call gives the chance to look
            await asyncio.sleep(0.05)
        await store.add_events(batches[2][1:] + batches[3])
        assert store.failovers == 2
        assert await store.count_events() == 20
    finally:
        await store.close()
    # Exactly once each (the write retried after the cut may have landed twice).
    assert cluster_db.counts("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events") == ["20\t20"] * 3


async def test_a_node_gone_silent_is_left_for_the_next(
    cluster_db: ClusterDatabase, proxy: dbservers.TcpProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reset, no refusal: the host just stops answering.  The call in progress gives
    up after NODE_TIMEOUT_SECONDS, the next one goes to the next node."""
    monkeypatch.setattr(policyd.storage.mysql, "NODE_TIMEOUT_SECONDS", 1.0)
    monkeypatch.setattr(policyd.storage.mysql, "PREFERRED_NODE_RETRY_SECONDS", 0.2)
    node = cluster_db.cluster.nodes[1]
    store = cluster_db.storage(cluster_db.url_with([(proxy.host, proxy.port), (node.host, node.port)]))
    await store.open()
    try:
        await store.migrate()
        await store.add_events(events(2, user="before"))
        proxy.hang()
        during = events(2, user="during")
        started = time.monotonic()
        with pytest.raises(policyd.storage.StorageError, match="no answer in time"):
            await store.add_events(during)
        assert time.monotonic() - started < 2.0
        assert store.node == 1
        await store.add_events(during)  # again, on node 2 (the first attempt may land too, later)
        proxy.resume()
        deadline = time.monotonic() + 10
        while store.node != 0:
            assert time.monotonic() < deadline, "the first node was not taken back"
            await store.count_events()
            await asyncio.sleep(0.05)
        assert await store.count_events() == 4
    finally:
        proxy.resume()
        await store.close()
    assert cluster_db.counts("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events") == ["4\t4"] * 3


async def test_a_first_node_down_from_the_start_is_skipped(cluster_db: ClusterDatabase) -> None:
    nodes = cluster_db.cluster.nodes
    nowhere = dbservers.TcpProxy(nodes[0].port)  # never started: its port refuses
    store = cluster_db.storage(
        cluster_db.url_with([(nowhere.host, nowhere.port), (nodes[2].host, nodes[2].port)])
    )
    await store.open()
    try:
        assert store.node == 1
        await store.migrate()
        await store.add_events(events(3))
        assert await store.count_events() == 3
    finally:
        await store.close()


async def test_every_node_down_is_one_clear_error_without_the_password(cluster_db: ClusterDatabase) -> None:
    ports = [dbservers.TcpProxy(0).port for _ in range(3)]  # nothing listens on any
    store = cluster_db.storage(cluster_db.url_with([("127.0.0.1", port) for port in ports]))
    with pytest.raises(policyd.storage.StorageError) as caught:
        await store.open()
    message = str(caught.value)
    assert cluster_db.cluster.password not in message
    assert "connecting" in message and str(ports[-1]) in message, message


# ---------------------------------------------------------------------------
# what Galera changes
# ---------------------------------------------------------------------------


async def test_certification_conflicts_are_retried(
    cluster_db: ClusterDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same events written at the same moment through two nodes: the second commit
    fails certification (1213) and is retried, and finds the rows there (idempotent).
    One INSERT per row, in one transaction, makes the window for a conflict wide."""
    monkeypatch.setattr(policyd.storage.mysql, "MAX_STATEMENT_BYTES", 1)
    stores = [cluster_db.storage(cluster_db.url((index,))) for index in (0, 1)]
    for store in stores:
        await store.open()
    try:
        await stores[0].migrate()
        cluster_db.cluster.wait_synced()
        written = 0
        for _ in range(60):
            batch = events(20, user=f"c{written}")
            await asyncio.gather(*(store.add_events(batch) for store in stores))
            written += len(batch)
            if sum(store.retries for store in stores) >= 3:
                break
        retries = sum(store.retries for store in stores)
        print(f"\n{retries} conflicts retried in {written // 20} rounds")
        assert retries >= 1, "no certification conflict happened: the test proves nothing"
    finally:
        for store in stores:
            await store.close()
    assert (
        cluster_db.counts("SELECT COUNT(*), COUNT(DISTINCT event_id) FROM events")
        == [f"{written}\t{written}"] * 3
    )


@pytest.mark.parametrize("shape", ["fresh", "go-policyd"])
async def test_three_daemons_starting_at_once_migrate_once(cluster_db: ClusterDatabase, shape: str) -> None:
    if shape == "go-policyd":
        cluster_db.cluster.admin_execute(
            "CREATE TABLE `events` (`ts` timestamp(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3), "
            "`sasl_username` char(8) NOT NULL DEFAULT '', `sender` char(80) NOT NULL DEFAULT '', "
            "`client_address` char(80) NOT NULL DEFAULT '', `recipient_count` int(6) DEFAULT NULL, "
            "PRIMARY KEY (`ts`,`sasl_username`,`sender`,`client_address`)) ENGINE=InnoDB DEFAULT CHARSET=latin1;"
            "INSERT INTO events (ts, sasl_username, sender, recipient_count) VALUES "
            "(UTC_TIMESTAMP(3) - INTERVAL 1 HOUR, 'alice', 'a@example.org', 10), "
            "(UTC_TIMESTAMP(3) - INTERVAL 2 HOUR, 'alice', 'b@example.org', NULL)",
            cluster_db.name,
        )
        cluster_db.cluster.wait_synced()
    stores = [cluster_db.storage(cluster_db.url((index,))) for index in range(3)]
    for store in stores:
        await store.open()
    try:
        done = await asyncio.gather(*(store.migrate() for store in stores))
        print(f"\nsteps per daemon: {done}")
        assert any(done)
        for store in stores:
            assert await store.pending_migrations() == []
        await asyncio.gather(*(store.add_events(events(2, user=f"n{n}")) for n, store in enumerate(stores)))
        if shape == "go-policyd":
            assert await stores[2].recipients_since("alice", NOW - timedelta(days=1), [Outcome.DUNNO]) == 10
    finally:
        for store in stores:
            await store.close()
    expected = "6" if shape == "fresh" else "8"
    assert cluster_db.counts("SELECT COUNT(*) FROM events") == [expected] * 3


async def test_a_message_is_counted_on_the_other_nodes_within_the_bound(
    cluster_db: ClusterDatabase, tmp_path: Path
) -> None:
    """test_shared_database's bound, with each daemon on its own node: a message accepted
    through one node is in the other daemons' windows (tailed through the other nodes,
    ids interleaved by auto_increment_increment = 3) within the bound."""
    delays: list[float] = []
    async with contextlib.AsyncExitStack() as stack:
        daemons = [
            await stack.enter_async_context(
                run_daemon(
                    make_settings(
                        cluster_db.url(tuple((index + step) % 3 for step in range(3))),
                        quota=1000,
                        reject_quota=2000,
                        spool=f"{tmp_path}/spool{index}",
                    )
                )
            )
            for index in range(3)
        ]
        clients = [await daemon.client() for daemon in daemons]
        for trial in range(12):
            sender = trial % 3
            user = f"trial{trial}"
            assert await clients[sender].ask(sasl_username=user, recipient_count=7) == "DUNNO"
            answered = time.monotonic()
            others = [daemon.daemon for index, daemon in enumerate(daemons) if index != sender]
            while [total_of(other, user) for other in others] != [7, 7]:
                assert time.monotonic() - answered < 5
                await asyncio.sleep(0.005)
            delays.append(time.monotonic() - answered)
        for client in clients:
            await client.close()
    print(
        f"\ncounted by the daemons on the other nodes after: max {max(delays) * 1000:.0f} ms, "
        f"mean {sum(delays) / len(delays) * 1000:.0f} ms"
    )
    assert max(delays) <= COUNTED_ELSEWHERE_WITHIN
    # Each daemon's rows have the ids of its node (id mod 3 = its auto_increment_offset):
    # the three daemons' ids interleave.
    assert (
        cluster_db.counts(
            "SELECT COUNT(*), COUNT(DISTINCT origin), COUNT(DISTINCT id % 3), "
            "COUNT(DISTINCT CONCAT(origin, ':', id % 3)) FROM events"
        )
        == ["12\t3\t3\t3"] * 3
    )


# ---------------------------------------------------------------------------
# the proof: a node killed under load
# ---------------------------------------------------------------------------

HOT_QUOTA = 600
HOT_CONNECTIONS_PER_DAEMON = 4
HOT_MAX_RECIPIENTS = 3
STEADY_CONNECTIONS_PER_DAEMON = 3
STEADY_USERS = 300
PAUSE_HOT = 0.1  # between a connection's requests: a paced load, not a flood of 2 cores
PAUSE_STEADY = 0.05
# A hammered user near the quota takes the strict path: a read first (at most db_timeout,
# 0.5 s), then its answer waits for its event's commit (at most db_timeout more): 1 s at
# worst by design, plus a margin for 2 busy cores.  Postfix waits 100 s.
LATENCY_BOUND = 2 * DB_TIMEOUT + 0.5
KILL_AT = 5.0
RESTART_AT = 12.0
AFTER_REJOIN = 8.0  # load goes on this long after the node is back (the daemon returns to it)


class PacedLoad(Load):
    """test_faults' Load, paced, with senders unique across loads, for one user or many."""

    def __init__(self, port: int, connections: int, name: str, hot: bool, pause: float) -> None:
        super().__init__(port, connections)
        self.name = name
        self.hot = hot
        self.pause = pause

    def _next(
        self, worker: int, user: str | None = None, recipients: int | None = None
    ) -> tuple[Sent, bytes]:
        self._serial += 1
        serial = self._serial
        if self.hot:
            user, recipients = "hot", 1 + (serial + worker) % HOT_MAX_RECIPIENTS
        else:
            user, recipients = f"u{(serial * 7 + worker) % STEADY_USERS}", 1 + serial % 5
        sender = f"{self.name}-{serial}-w{worker}@example.org"
        sent = Sent(worker, user, recipients, True, sender, time.monotonic())
        request = encode_request(
            sasl_username=user, sender=sender, recipient_count=recipients, queue_id=f"Q{serial}"
        )
        return sent, request

    async def _exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sent: Sent, request: bytes
    ) -> bool:
        answered = await super()._exchange(reader, writer, sent, request)
        await asyncio.sleep(self.pause)
        return answered


async def test_three_daemons_on_three_nodes_one_node_killed_under_load(
    cluster_db: ClusterDatabase, tmp_path: Path
) -> None:
    cluster = cluster_db.cluster
    killed = cluster.nodes[2]
    daemons = []
    for index in range(3):
        order = tuple((index + step) % 3 for step in range(3))  # its own node first
        directory = tmp_path / f"relay{index + 1}"
        directory.mkdir()
        daemons.append(
            Policyd(directory, cluster_db.url(order), defaultquota=str(HOT_QUOTA), rejectquota="1000000")
        )
    try:
        await asyncio.gather(*(daemon.start() for daemon in daemons))  # three migrations at once
        loads = [
            PacedLoad(daemon.port, STEADY_CONNECTIONS_PER_DAEMON, f"steady{n}", hot=False, pause=PAUSE_STEADY)
            for n, daemon in enumerate(daemons)
        ] + [
            PacedLoad(daemon.port, HOT_CONNECTIONS_PER_DAEMON, f"hot{n}", hot=True, pause=PAUSE_HOT)
            for n, daemon in enumerate(daemons)
        ]
        started = time.monotonic()
        for load in loads:
            load.start()
        try:
            await asyncio.sleep(KILL_AT)
            await asyncio.to_thread(killed.stop_server, crash=True)  # SIGKILL
            killed_at = time.monotonic() - started
            await asyncio.sleep(RESTART_AT - killed_at)
            restart_began = time.monotonic()
            await asyncio.to_thread(killed.start_server)  # returns once Synced (IST)
            rejoin_seconds = time.monotonic() - restart_began
            await asyncio.sleep(AFTER_REJOIN)
        finally:
            for load in loads:
                await load.stop()
        duration = time.monotonic() - started
    finally:
        statuses = [daemon.terminate() for daemon in daemons]
    assert statuses == [0, 0, 0], [daemon.notable_lines() for daemon in daemons]

    requests = [sent for load in loads for sent in load.requests]
    answered = [sent for sent in requests if sent.action is not None]
    latencies = sorted(sent.latency for sent in answered if sent.latency is not None)
    hot = [sent for load in loads if load.hot for sent in load.requests]
    hot_accepted = sum(sent.recipients for sent in hot if sent.action == "DUNNO")
    hot_connections = 3 * HOT_CONNECTIONS_PER_DAEMON
    bound = HOT_QUOTA - 1 + (hot_connections - 1) * HOT_MAX_RECIPIENTS
    per_node = cluster_db.counts("SELECT COUNT(*), COUNT(DISTINCT sender) FROM events")
    ist = "IST received" in killed.log_path.read_text(errors="replace")
    print(
        f"\n{len(requests)} requests in {duration:.1f}s, {len(answered)} answered; latency "
        f"p50 {percentile(latencies, 0.5) * 1000:.0f} ms, p99 {percentile(latencies, 0.99) * 1000:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms; node 3 killed at {killed_at:.1f}s, rejoined in "
        f"{rejoin_seconds:.1f}s (IST: {ist}); hot user accepted {hot_accepted} recipients "
        f"(quota {HOT_QUOTA}, bound {bound}); events per node {per_node}"
    )
    stored = set(
        cluster_db.cluster.nodes[0].admin_execute("SELECT sender FROM events", cluster_db.name).split()
    )
    missing = [sent for sent in answered if sent.sender not in stored]
    assert not missing, (
        [(sent.sender, round(sent.sent_at - started, 2)) for sent in missing[:40]],
        [daemon.notable_lines() for daemon in daemons],
    )
    assert len(answered) == len(requests), [sent for sent in requests if sent.action is None][:5]
    assert latencies[-1] < LATENCY_BOUND, [
        (sent.sender, round(sent.sent_at - started, 2), round(sent.latency or 0, 2))
        for sent in answered
        if (sent.latency or 0) > 1.0
    ]
    assert sum(sent.recipients for sent in hot) > 2 * HOT_QUOTA, "the hot user must go well past the quota"
    assert HOT_QUOTA - HOT_MAX_RECIPIENTS <= hot_accepted <= bound
    assert per_node == [f"{len(answered)}\t{len(answered)}"] * 3  # every event once, on every node
    assert ist, "the killed node should have caught up by IST"

    # The daemon whose node was killed went on through the next node in its list, and
    # came back to its own node once that was Synced again.
    node_text = f"{killed.host}:{killed.port}"
    log = daemons[2].log_text()
    assert re.search(
        rf"mysql {re.escape(node_text)}/\S+: failed .*; now using 127\.0\.0\.1:{cluster.nodes[0].port}", log
    ), log
    assert f"{node_text} is back; now using {node_text}" in log, log
    after_kill = [
        sent for sent in loads[2].requests + loads[5].requests if sent.sent_at > started + killed_at
    ]
    assert after_kill and all(sent.action is not None for sent in after_kill)
    assert not [line for daemon in daemons for line in daemon.log_text().splitlines() if "Traceback" in line]


def test_the_cluster_fixture_is_three_synced_nodes(galera_cluster: dbservers.GaleraCluster) -> None:
    galera_cluster.wait_synced()
    offsets = sorted(
        node.admin_execute("SELECT @@auto_increment_offset").strip() for node in galera_cluster.nodes
    )
    assert offsets == ["1", "2", "3"]
    assert {
        node.admin_execute("SELECT @@auto_increment_increment").strip() for node in galera_cluster.nodes
    } == {"3"}
    assert len({node.port for node in galera_cluster.nodes}) == 3
