"""One daemon's decisions are exact: one user on many connections at once, every backend.

The read-decide-record step of a user is atomic inside the daemon, so concurrent
requests of one user are decided one after the other, each seeing the others.
"""

from __future__ import annotations

import asyncio
from collections import Counter

from tests.conftest import PolicyClient, count_rows, encode_request, make_settings, run_daemon

HOLD = "HOLD quota exceeded"
REJECT = "REJECT max quota exceeded"


async def test_twenty_connections_at_the_same_moment(database: tuple[str, str]) -> None:
    url, table = database
    async with run_daemon(make_settings(url, table, quota=10, reject_quota=20)) as daemon:
        clients = [await daemon.client() for _ in range(20)]
        # Every request on the wire before any answer is read: they arrive together.
        for client in clients:
            client.writer.write(encode_request(sasl_username="phished", recipient_count=9))
        for client in clients:
            await client.writer.drain()
        answers = await asyncio.gather(*(client.read_reply() for client in clients))
        for client in clients:
            await client.close()
    # Serialised: 9 -> DUNNO, 18 -> HOLD, 27 -> REJECT (not counted), and so on.
    assert Counter(answers) == {"DUNNO": 1, HOLD: 1, REJECT: 18}
    assert await count_rows(url, table) == 20


async def test_a_steady_run_on_ten_connections(database: tuple[str, str]) -> None:
    url, table = database
    async with run_daemon(make_settings(url, table, quota=10, reject_quota=20)) as daemon:
        clients = [await daemon.client() for _ in range(10)]

        async def send(client: PolicyClient) -> list[str]:
            return [await client.ask(sasl_username="phished", recipient_count=1) for _ in range(20)]

        answers = [answer for batch in await asyncio.gather(*(send(c) for c in clients)) for answer in batch]
        for client in clients:
            await client.close()
    # Totals 1..9 DUNNO, 10..19 HOLD, then 20 each time: REJECT (rejected mail is not counted).
    assert Counter(answers) == {"DUNNO": 9, HOLD: 10, REJECT: 181}
    assert await count_rows(url, table) == 200
