"""The alerts' background task: crossings from the decisions (incidents.py), batched
for a few seconds (a storm of users is one notice), claimed in the database so that
of several relays sharing it one only tells, written up with what the admin needs (the
senders and client addresses used, the held queue ids, the commands to run next), and
sent by mail and/or webhook from a thread, retried a few times.  A decision never waits
for any of it: observe() is a dictionary look-up and, on a crossing, an append.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from policyd.alerts.incidents import Crossing, Incidents
from policyd.alerts.notify import NotifyError, post_webhook, send_mail
from policyd.clock import from_ms, utc_now
from policyd.config import Settings
from policyd.logs import log, printable
from policyd.quota import Limit, Outcome
from policyd.storage import Storage, StorageError

# A crossing waits this long for others (a storm is one notice).
BATCH_SECONDS = 5.0
# Sending is tried this many times, this long apart.
SEND_ATTEMPTS = 3
RETRY_SECONDS = 20.0
# Events read per user for a notice (its senders and addresses).
EVENTS_PER_USER = 5000
# Users written up in full in one notice (the others are named).
USERS_IN_FULL = 20


@dataclass
class UserReport:
    user: str
    crossings: list[Crossing]
    senders: Counter[str] = field(default_factory=Counter)
    addresses: Counter[str] = field(default_factory=Counter)
    first: datetime | None = None
    last: datetime | None = None
    held_queue_ids: list[str] = field(default_factory=list)


class Alerter:
    def __init__(
        self, settings: Settings, storage: Storage, origin: str, clock: Callable[[], datetime] = utc_now
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.origin = origin
        self.clock = clock
        self.incidents = Incidents()
        self._pending: list[Crossing] = []
        self._wakeup = asyncio.Event()
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return bool(self.settings.alert_mail_to or self.settings.alert_webhook)

    def observe(self, user: str, limits: tuple[Limit, ...], totals: tuple[int, ...], at: int) -> None:
        """A counted decision: note the crossings it makes (cheap; no I/O)."""
        if not self.enabled:
            return
        crossings = self.incidents.observe(user, limits, totals, at)
        if crossings:
            self._pending.extend(crossings)
            self._wakeup.set()

    def reset(self, user: str) -> None:
        self.incidents.reset(user)

    async def run(self) -> None:
        while True:
            await self._wakeup.wait()
            await asyncio.sleep(BATCH_SECONDS)
            self._wakeup.clear()
            batch, self._pending = self._pending, []
            try:
                await self._tell(batch)
            except Exception:
                log.exception("alerts: telling %d crossings failed unexpectedly", len(batch))

    async def _tell(self, batch: list[Crossing]) -> None:
        claimed = []
        for crossing in batch:
            try:
                mine = await self.storage.claim_alert(
                    crossing.user,
                    crossing.limit.label,
                    int(crossing.level),
                    at_ms=crossing.at,
                    window_ms=crossing.limit.window // timedelta(milliseconds=1),
                    origin=self.origin,
                )
            except StorageError as error:
                # The database is down: tell anyway (twice is better than never).
                log.warning(
                    "alerts: cannot claim the alert of %s in the database (%s); telling it anyway",
                    printable(crossing.user),
                    error,
                )
                mine = True
            if mine:
                claimed.append(crossing)
        if not claimed:
            return
        reports = await self._reports(claimed)
        subject, text, payload = self._compose(reports)
        channels = self._channels()
        for attempt in range(1, SEND_ATTEMPTS + 1):
            # Each channel once it worked: a webhook that fails does not resend the mail.
            problems = await asyncio.to_thread(self._send, channels, subject, text, payload)
            if not problems:
                self.sent += 1
                log.info("alerts: told about %s", ", ".join(printable(report.user) for report in reports))
                return
            channels = [channel for channel in channels if channel in problems]
            said = "; ".join(problems.values())
            if attempt < SEND_ATTEMPTS:
                log.warning("alerts: %s; trying again in %gs", said, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
            else:
                self.failed += 1
                log.error("alerts: %s; gave up after %d attempts: %s", said, SEND_ATTEMPTS, subject)

    def _channels(self) -> list[str]:
        return [
            name
            for name, on in (("mail", self.settings.alert_mail_to), ("webhook", self.settings.alert_webhook))
            if on
        ]

    async def _reports(self, crossings: list[Crossing]) -> list[UserReport]:
        by_user: dict[str, UserReport] = {}
        for crossing in crossings:
            by_user.setdefault(crossing.user, UserReport(crossing.user, [])).crossings.append(crossing)
        since = self.clock() - max(limit.window for limit in self.settings.rules.limits)
        for report in list(by_user.values())[:USERS_IN_FULL]:
            try:
                events = await self.storage.user_events(report.user, since, EVENTS_PER_USER)
            except StorageError as error:
                log.warning(
                    "alerts: cannot read %s's events (%s); telling without them",
                    printable(report.user),
                    error,
                )
                continue
            for event in events:
                report.senders[event.sender] += event.recipient_count
                report.addresses[event.client_address] += event.recipient_count
                if event.outcome is Outcome.HOLD and event.queue_id:
                    report.held_queue_ids.append(event.queue_id)
            report.held_queue_ids.reverse()  # read newest first: told oldest first
            if events:
                times = [event.ts for event in events]
                report.first, report.last = min(times), max(times)
        return list(by_user.values())

    def _compose(self, reports: list[UserReport]) -> tuple[str, str, dict[str, object]]:
        host = socket.gethostname()
        if len(reports) == 1:
            crossing = max(reports[0].crossings, key=lambda c: c.level)
            subject = (
                f"policyd on {host}: {reports[0].user} over {crossing.limit.label} ({crossing.level.name})"
            )
        else:
            subject = f"policyd on {host}: {len(reports)} users over a limit"
        lines = []
        users_payload = []
        for number, report in enumerate(reports):
            if number >= USERS_IN_FULL:
                lines.append(
                    f"... and {len(reports) - USERS_IN_FULL} more: "
                    + ", ".join(r.user for r in reports[USERS_IN_FULL:])
                )
                break
            lines.append(f"User {report.user}")
            for crossing in report.crossings:
                lines.append(
                    f"  reached {crossing.level.name} of {crossing.limit.label}: {crossing.total} recipients "
                    f"(HOLD from {crossing.limit.hold}, REJECT from {crossing.limit.reject}) at {from_ms(crossing.at):%Y-%m-%d %H:%M:%S} UTC"
                )
            if report.first and report.last:
                lines.append(
                    f"  events from {report.first:%Y-%m-%d %H:%M:%S} to {report.last:%Y-%m-%d %H:%M:%S} UTC"
                )
            if report.senders:
                lines.append(
                    "  senders: "
                    + ", ".join(
                        f"{sender or '<>'} ({count})" for sender, count in report.senders.most_common(10)
                    )
                )
            if report.addresses:
                lines.append(
                    "  client addresses: "
                    + ", ".join(f"{address} ({count})" for address, count in report.addresses.most_common(10))
                )
            page = self._page_of(report.user)
            if page:
                lines.append(f"  status page: {page}")
            if report.held_queue_ids:
                lines.append(
                    f"  held so far: {len(report.held_queue_ids)} messages: {' '.join(report.held_queue_ids[:20])}"
                )
            lines += [
                "  next:",
                f"    policyd user {report.user}",
                f"    policyd held {report.user}",
                f"    policyd block {report.user} --reason 'phished?'   (and have the password changed)",
                f"    policyd delete {report.user} --all   (the spam in hold; or: policyd release {report.user} QUEUE_ID...)",
                f"    policyd reset {report.user} --reason 'password changed'",
                "",
            ]
            users_payload.append(
                {
                    "user": report.user,
                    "crossings": [
                        {
                            "limit": c.limit.label,
                            "level": c.level.name,
                            "total": c.total,
                            "at": from_ms(c.at).isoformat(),
                        }
                        for c in report.crossings
                    ],
                    "senders": dict(report.senders.most_common(10)),
                    "client_addresses": dict(report.addresses.most_common(10)),
                    "first_event": report.first.isoformat() if report.first else None,
                    "last_event": report.last.isoformat() if report.last else None,
                    "held_queue_ids": report.held_queue_ids,
                }
            )
        text = "\n".join(lines)
        payload: dict[str, object] = {"text": f"{subject}\n{text}", "host": host, "users": users_payload}
        return subject, text, payload

    def _page_of(self, user: str) -> str | None:
        """The user's status page, when the HTTP listener is on."""
        listen = self.settings.http_listen
        if listen is None:
            return None
        host, port = listen
        if host in {"0.0.0.0", "::", ""}:
            host = socket.getfqdn()
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/user?name={urllib.parse.quote(user, safe='')}"

    def _send(
        self, channels: list[str], subject: str, text: str, payload: dict[str, object]
    ) -> dict[str, str]:
        """Send on each channel (in a thread: blocking calls); the problems, by channel."""
        problems = {}
        settings = self.settings
        if "mail" in channels:
            host, port = settings.alert_smtp
            sender = settings.alert_mail_from or f"policyd@{socket.getfqdn()}"
            try:
                send_mail(f"{host}:{port}", sender, list(settings.alert_mail_to), subject, text)
            except NotifyError as error:
                problems["mail"] = str(error)
        if "webhook" in channels and settings.alert_webhook:
            try:
                post_webhook(settings.alert_webhook, payload)
            except NotifyError as error:
                problems["webhook"] = str(error)
        return problems
