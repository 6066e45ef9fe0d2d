"""The status pages: server-rendered HTML, read-only, no script.

`/` shows the top senders of the window against their limits, the users held or
rejected now, the daemon's health and the decisions per minute; `/user?name=...` one
user: recipients per hour (24 h) and per day (7 days) against the limits, their recent
events, the senders and client addresses they used, and when they will be back under
quota.  Every name is data: it goes through html.escape (and quote() in a link), and
the listener's Content-Security-Policy allows no script at all.

Times are shown in UTC.
"""

from __future__ import annotations

import platform
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from html import escape
from typing import TYPE_CHECKING
from urllib.parse import quote

from policyd import __version__
from policyd.clock import from_ms, to_ms
from policyd.quota import Outcome, QuotaRules
from policyd.storage import Event
from policyd.web import charts
from policyd.web.health import check
from policyd.web.listener import Request, Response, text_response
from policyd.web.state import USER_EVENTS_MAX, Minute, UserState

if TYPE_CHECKING:
    from policyd.daemon import Daemon
    from policyd.web.listener import WebListener

# Senders listed on the overview.
TOP_SENDERS = 20
# Minutes of decisions drawn on the overview: up to 3 hours, at least one.
CHART_MINUTES = 180
CHART_MIN_MINUTES = 60
# A user's recent events listed.
RECENT_EVENTS = 50
# Days of a user's history drawn.
HISTORY_DAYS = 7
# The overview reloads itself (a meta refresh: no script).
REFRESH_SECONDS = 60
# Names longer than this are cut on the page (the full name is in the link and the title).
NAME_SHOWN_CHARS = 80

STATE_TEXT = {"ok": "within limits", "near": "close to its limit", "held": "held", "rejected": "rejected"}

CSS = """
:root { color-scheme: light; --ok: #4c9a2a; --near: #c9b200; --held: #e08a00; --rejected: #c62828; }
* { box-sizing: border-box; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222;
       background: #f6f7f9; }
header { background: #1f2a38; color: #fff; padding: .7em 1em; display: flex; flex-wrap: wrap;
         gap: .4em 1.2em; align-items: baseline; }
header h1 { font-size: 1.2em; margin: 0; }
header a { color: #fff; }
main { max-width: 1100px; margin: 0 auto; padding: .6em; }
section { background: #fff; border: 1px solid #dde1e6; border-radius: 6px; padding: .6em .9em; margin: .7em 0; }
h2 { font-size: 1.05em; margin: .2em 0 .5em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .5em; border-bottom: 1px solid #eceef1; vertical-align: middle; }
th { font-weight: 600; color: #444; white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.name { overflow-wrap: anywhere; }
.meter { position: relative; height: .9em; min-width: 6em; background: #eceef1; border-radius: 3px; }
.meter .fill { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 3px; }
.meter .mark { position: absolute; top: -2px; bottom: -2px; width: 2px; background: #333; }
.state { display: inline-block; padding: 0 .45em; border-radius: 3px; color: #fff; font-size: .85em;
         white-space: nowrap; }
.ok { background: var(--ok); } .near { background: var(--near); color: #222; }
.held { background: var(--held); } .rejected { background: var(--rejected); }
.health-ok { background: var(--ok); } .health-degraded { background: var(--held); }
.health-failing { background: var(--rejected); }
.note { color: #666; font-size: .9em; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; margin: 0; }
dl.facts dt { color: #555; } dl.facts dd { margin: 0; overflow-wrap: anywhere; }
svg.chart { width: 100%; height: auto; display: block; }
.legend span { display: inline-block; width: .8em; height: .8em; margin: 0 .3em 0 .8em; border-radius: 2px; }
@media (max-width: 600px) {
  body { font-size: 14px; }
  main { padding: .3em; }
  section { padding: .5em; margin: .5em 0; }
  .wide { display: none; }
  dl.facts { grid-template-columns: 1fr; }
  dl.facts dt { font-weight: 600; }
}
"""


class Pages:
    def __init__(self, daemon: Daemon, web: WebListener) -> None:
        self.daemon = daemon
        self.web = web

    # -- the overview ----------------------------------------------------------------

    async def overview(self, request: Request) -> Response:
        daemon = self.daemon
        rules = daemon.settings.rules
        snapshot = await self.web.scan.snapshot()
        top = await self.web.views.top_senders(TOP_SENDERS)
        health = check(daemon)
        parts = [
            _health_section(daemon, health.status, health.lines),
            self._over_section(
                snapshot.held, snapshot.rejected, snapshot.held_count, snapshot.rejected_count
            ),
        ]
        window_text = _duration(rules.window)
        if top.value is not None:
            rows = []
            for sender in top.value:
                state = self.web.scan.one(sender.sasl_username)
                rows.append(
                    f'<tr data-user="{escape(sender.sasl_username)}">'
                    f'<td class="name">{_user_link(sender.sasl_username)}</td>'
                    f'<td class="num recipients">{sender.recipients}</td>'
                    f'<td class="num messages wide">{sender.messages}</td>'
                    f'<td class="num held-count wide">{sender.held}</td>'
                    f'<td class="num rejected-count wide">{sender.rejected}</td>'
                    f"<td>{_meter(rules, state)}</td>"
                    f"<td>{_state_badge(state.state)}</td></tr>"
                )
            table = (
                '<div class="scroll"><table id="top-senders"><thead><tr><th>User</th>'
                '<th class="num">Recipients</th><th class="num wide">Messages</th><th class="num wide">Held</th>'
                '<th class="num wide">Rejected</th><th>Counted now / limit</th><th>State</th></tr></thead><tbody>'
                + ("".join(rows) or '<tr><td colspan="7" class="note">no mail in this window yet</td></tr>')
                + "</tbody></table></div>"
            )
            source = f"from the database, last {window_text}"
        else:
            rows = [
                f'<tr data-user="{escape(state.name)}"><td class="name">{_user_link(state.name)}</td>'
                f'<td class="num counted">{state.totals[0]}</td><td>{_meter(rules, state)}</td>'
                f"<td>{_state_badge(state.state)}</td></tr>"
                for state in snapshot.top[:TOP_SENDERS]
            ]
            table = (
                '<div class="scroll"><table id="top-senders-memory"><thead><tr><th>User</th>'
                '<th class="num">Counted</th><th>Counted now / limit</th><th>State</th></tr></thead><tbody>'
                + ("".join(rows) or '<tr><td colspan="4" class="note">nothing counted yet</td></tr>')
                + "</tbody></table></div>"
            )
            source = f"from memory ({escape(top.problem)})"
        parts.append(
            f'<section id="top"><h2>Top senders <span class="note">{source}</span></h2>{table}</section>'
        )
        parts.append(self._decisions_section())
        body = "".join(parts)
        return _page("policyd status", body, refresh=REFRESH_SECONDS, daemon=daemon)

    def _over_section(
        self, held: Sequence[UserState], rejected: Sequence[UserState], held_count: int, rejected_count: int
    ) -> str:
        rules = self.daemon.settings.rules
        items = []
        for state in [*rejected, *held]:
            limit = rules.limits[state.limit]
            items.append(
                f'<tr data-user="{escape(state.name)}"><td class="name">{_user_link(state.name)}</td>'
                f"<td>{_state_badge(state.state)}</td>"
                f'<td class="num">{state.totals[state.limit]}</td>'
                f'<td class="num">{limit.hold} / {limit.reject} per {_duration(limit.window)}</td></tr>'
            )
        shown = "" if len(items) >= held_count + rejected_count else f" (the {len(items)} furthest shown)"
        table = (
            '<div class="scroll"><table id="over-limit"><thead><tr><th>User</th><th>State</th>'
            '<th class="num">Counted</th><th class="num">Hold / reject</th></tr></thead><tbody>'
            + "".join(items)
            + "</tbody></table></div>"
            if items
            else '<p class="note">No user is at a limit now.</p>'
        )
        return (
            f'<section id="over"><h2>Held or rejected now: <span id="held-count">{held_count}</span> held, '
            f'<span id="rejected-count">{rejected_count}</span> rejected{shown}</h2>{table}</section>'
        )

    def _decisions_section(self) -> str:
        history = self.web.history
        current = history.current()
        by_start = {minute.start: minute for minute in history.minutes}
        by_start[current.start] = current
        # At least an hour drawn, so that the first minutes of a run are not one wide bar.
        shown = max(CHART_MIN_MINUTES, min(len(by_start), CHART_MINUTES))
        minutes = [
            by_start.get(start, Minute(start, {}))
            for start in (current.start - timedelta(minutes=back) for back in range(shown - 1, -1, -1))
        ]
        bars = []
        for minute in minutes:
            counts = minute.counts
            label = minute.start.astimezone(UTC).strftime("%H:%M") if minute.start.minute % 15 == 0 else ""
            parts = [(outcome.value, counts.get(outcome.value, 0)) for outcome in Outcome]
            title = f"{minute.start.astimezone(UTC):%H:%M} UTC: " + ", ".join(
                f"{count} {name.lower()}" for name, count in parts
            )
            bars.append(charts.Bar(label, parts, title))
        chart = charts.Chart("Decisions per minute", bars, unit=" decisions")
        legend = "".join(
            f'<span style="background:{charts.COLOURS[outcome.value]}"></span>{outcome.value}'
            for outcome in Outcome
        )
        total = sum(sum(minute.counts.values()) for minute in minutes)
        return (
            '<section id="decisions"><h2>Decisions per minute <span class="note">since this daemon started, '
            f'up to {CHART_MINUTES // 60} hours, UTC; <span id="decisions-total">{total}</span> shown</span></h2>'
            f'<div class="legend note">{legend}</div>{charts.render(chart)}</section>'
        )

    # -- one user -------------------------------------------------------------------------

    async def user(self, request: Request) -> Response:
        name = request.arg("name")
        if name is None:
            return text_response(400, "which user? /user?name=...\n")
        daemon = self.daemon
        decider = daemon.decider
        assert decider is not None
        rules = decider.settings.rules
        now = daemon.clock()
        now_ms = to_ms(now)
        state = self.web.scan.one(name)
        held_events = decider.window.events(name, now_ms)
        events = await self.web.views.user_events(name, HISTORY_DAYS)
        parts = [
            self._user_summary(name, rules, state, held_events, now_ms),
            _hourly_section(rules, held_events, now_ms),
        ]
        if events.value is not None:
            parts.append(_daily_section(rules, events.value, now))
            parts.append(_recent_section(events.value[:RECENT_EVENTS]))
            parts.append(_sources_section(events.value))
        else:
            parts.append(
                f'<section id="history"><h2>History</h2><p class="note">Not shown: {escape(events.problem)}.</p></section>'
            )
        return _page(f"policyd: {name}", "".join(parts), daemon=daemon, heading=f"User {name}")

    def _user_summary(
        self,
        name: str,
        rules: QuotaRules,
        state: UserState,
        held: list[tuple[int, int, Outcome]],
        now_ms: int,
    ) -> str:
        facts = [("State", _state_badge(state.state))]
        for limit, total in zip(rules.limits, state.totals, strict=True):
            facts.append(
                (
                    f"Counted, last {_duration(limit.window)}",
                    f'<span class="counted">{total}</span> (hold from {limit.hold}, reject from {limit.reject})',
                )
            )
        back = back_under_quota(rules, held, now_ms)
        if back is None:
            facts.append(("Back under quota", "now: within every limit"))
        else:
            when = from_ms(back)
            facts.append(
                (
                    "Back under quota",
                    f'<span id="back-at">{when:%Y-%m-%d %H:%M:%S} UTC</span> '
                    f"(in {_duration(timedelta(milliseconds=back - now_ms))}, if nothing more is sent)",
                )
            )
        lists = []
        lowered = name.lower()
        if lowered in rules.whitelist:
            lists.append(f"whitelist (not counted during {escape(rules.whitelist_hours.spec)})")
        if lowered in rules.blacklist:
            lists.append("blacklist (always held)")
        facts.append(("Lists", ", ".join(lists) or "in no list by user name"))
        rows = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in facts)
        return f'<section id="summary"><h2>Now</h2><dl class="facts">{rows}</dl></section>'


def back_under_quota(rules: QuotaRules, held: list[tuple[int, int, Outcome]], now_ms: int) -> int | None:
    """When (ms) the user's counted total is below every HOLD threshold again, if they
    send nothing more; None when it is already."""
    latest: int | None = None
    for limit in rules.limits:
        span = int(limit.window.total_seconds() * 1000)
        inside = [
            (at, count)
            for at, count, outcome in held
            if at >= now_ms - span and (rules.count_rejected or outcome is not Outcome.REJECT)
        ]
        remaining = sum(count for _, count in inside)
        if remaining < limit.hold:
            continue
        for at, count in inside:  # oldest first: the first to leave the window
            remaining -= count
            if remaining < limit.hold:
                leaves = at + span + 1
                latest = leaves if latest is None else max(latest, leaves)
                break
    return latest


def _hourly_section(rules: QuotaRules, held: list[tuple[int, int, Outcome]], now_ms: int) -> str:
    hour = 3_600_000
    first = (now_ms // hour - 24) * hour
    sums: Counter[tuple[int, str]] = Counter()
    for at, count, outcome in held:
        if at >= first:
            sums[(at - first) // hour, outcome.value] += count
    limit = rules.limits[0]
    span = int(limit.window.total_seconds() * 1000)
    bars, trend = [], []
    for index in range(25):
        start = first + index * hour
        parts = [(outcome.value, sums[index, outcome.value]) for outcome in Outcome]
        label = f"{from_ms(start):%H}h" if index % 3 == 0 else ""
        bars.append(
            charts.Bar(label, parts, f"{from_ms(start):%H}:00 UTC: {sum(v for _, v in parts)} recipients")
        )
        end = min(start + hour, now_ms + 1)
        trend.append(
            sum(
                count
                for at, count, outcome in held
                if end - span <= at < end and (rules.count_rejected or outcome is not Outcome.REJECT)
            )
        )
    chart = charts.Chart(
        "Recipients per hour, last 24 hours",
        bars,
        lines=_limit_lines(rules),
        trend=trend,
        trend_label=f"counted in the last {_duration(limit.window)} at the end of each hour",
        unit=" recipients",
    )
    return (
        '<section id="hourly"><h2>Recipients per hour <span class="note">last 24 hours, UTC, from memory; '
        f"the blue line: counted in the sliding {_duration(limit.window)} window</span></h2>"
        f"{charts.render(chart)}</section>"
    )


def _daily_section(rules: QuotaRules, events: list[Event], now: datetime) -> str:
    today = now.astimezone(UTC).date()
    sums: Counter[tuple[int, str]] = Counter()
    for event in events:
        days_ago = (today - event.ts.astimezone(UTC).date()).days
        if 0 <= days_ago < HISTORY_DAYS:
            sums[days_ago, event.outcome.value] += event.recipient_count
    bars = []
    for days_ago in range(HISTORY_DAYS - 1, -1, -1):
        day = today - timedelta(days=days_ago)
        parts = [(outcome.value, sums[days_ago, outcome.value]) for outcome in Outcome]
        bars.append(
            charts.Bar(f"{day:%a %d}", parts, f"{day:%Y-%m-%d}: {sum(v for _, v in parts)} recipients")
        )
    chart = charts.Chart(
        "Recipients per day, last 7 days", bars, lines=_limit_lines(rules), unit=" recipients"
    )
    note = f"{len(events)} events" + (
        " (the newest only: the chart may miss older days)" if len(events) >= USER_EVENTS_MAX else ""
    )
    return (
        f'<section id="daily"><h2>Recipients per day <span class="note">last {HISTORY_DAYS} days, UTC days, '
        f"from the database ({note})</span></h2>{charts.render(chart)}</section>"
    )


def _limit_lines(rules: QuotaRules) -> list[charts.Line]:
    limit = rules.limits[0]
    return [
        charts.Line(limit.hold, f"hold {limit.hold}", charts.COLOURS["held"]),
        charts.Line(limit.reject, f"reject {limit.reject}", charts.COLOURS["rejected"]),
    ]


def _recent_section(events: list[Event]) -> str:
    rows = "".join(
        f'<tr><td class="num">{event.ts.astimezone(UTC):%Y-%m-%d %H:%M:%S}</td>'
        f'<td class="name">{escape(event.sender)}</td><td>{escape(event.client_address)}</td>'
        f'<td class="num recipients">{event.recipient_count}</td>'
        f"<td>{_state_badge(_outcome_state(event.outcome), event.outcome.value)}</td>"
        f'<td class="queue-id">{escape(event.queue_id)}</td></tr>'
        for event in events
    )
    return (
        f'<section id="recent"><h2>Recent events <span class="note">the newest {len(events)}, UTC</span></h2>'
        '<div class="scroll"><table id="recent-events"><thead><tr><th>Time</th><th>Sender</th><th>Client IP</th>'
        '<th class="num">Recipients</th><th>Action</th><th>Queue id</th></tr></thead><tbody>'
        + (rows or '<tr><td colspan="6" class="note">none in the database</td></tr>')
        + "</tbody></table></div></section>"
    )


def _sources_section(events: list[Event]) -> str:
    def table(key: str, title: str, values: list[str]) -> str:
        messages: Counter[str] = Counter()
        recipients: Counter[str] = Counter()
        for value, event in zip(values, events, strict=True):
            messages[value] += 1
            recipients[value] += event.recipient_count
        rows = "".join(
            f'<tr><td class="name">{escape(value) or "<i>(none)</i>"}</td><td class="num">{messages[value]}</td>'
            f'<td class="num">{recipients[value]}</td></tr>'
            for value, _ in recipients.most_common(20)
        )
        return (
            f'<div class="scroll"><table id="{key}"><thead><tr><th>{title}</th><th class="num">Messages</th>'
            f'<th class="num">Recipients</th></tr></thead><tbody>{rows}</tbody></table></div>'
        )

    return (
        f'<section id="sources"><h2>Senders and client IPs <span class="note">last {HISTORY_DAYS} days</span></h2>'
        + table("senders", "Sender", [event.sender for event in events])
        + table("clients", "Client IP", [event.client_address for event in events])
        + "</section>"
    )


def _outcome_state(outcome: Outcome) -> str:
    return {Outcome.DUNNO: "ok", Outcome.HOLD: "held", Outcome.REJECT: "rejected"}[outcome]


def _health_section(daemon: Daemon, status: str, lines: list[str]) -> str:
    server = daemon.server
    stats = daemon.stats
    facts = [
        ("Health", f'<span class="state health-{status}" id="health">{escape(lines[0])}</span>'),
        *(
            (label.capitalize(), escape(value))
            for label, _, value in (line.partition(": ") for line in lines[1:])
        ),
        (
            "Connections",
            f"{len(server.connections) if server else 0} open, {stats.connections_refused} refused",
        ),
        ("Requests", f"{sum(stats.requests.values())} answered, {stats.events_counted} counted"),
        (
            "Events",
            f"{stats.events_written} written, {stats.events_replayed} replayed, {stats.events_dropped} dropped",
        ),
    ]
    rows = "".join(f"<dt>{label}</dt><dd>{value}</dd>" for label, value in facts)
    return f'<section id="health-section"><h2>Daemon</h2><dl class="facts">{rows}</dl></section>'


def _meter(rules: QuotaRules, state: UserState) -> str:
    limit = rules.limits[state.limit]
    total = state.totals[state.limit]
    scale = max(limit.reject, total, 1)
    width = 100 * total / scale
    hold_at = 100 * limit.hold / scale
    return (
        f'<div class="meter" title="{total} of {limit.hold} (hold), {limit.reject} (reject) per '
        f'{escape(_duration(limit.window))}"><div class="fill {state.state}" style="width:{width:.1f}%"></div>'
        f'<div class="mark" style="left:{hold_at:.1f}%"></div></div>'
        f'<span class="note"><span class="counted">{total}</span> / {limit.hold}</span>'
    )


def _state_badge(state: str, text: str | None = None) -> str:
    return f'<span class="state {state}">{escape(text or STATE_TEXT[state])}</span>'


def _user_link(name: str) -> str:
    shown = name if len(name) <= NAME_SHOWN_CHARS else name[:NAME_SHOWN_CHARS] + "…"
    return f'<a class="user" href="/user?name={quote(name, safe="")}" title="{escape(name)}">{escape(shown) or "<i>(empty)</i>"}</a>'


def _duration(value: timedelta) -> str:
    seconds = int(value.total_seconds())
    if seconds >= 86400 and seconds % 86400 == 0 and seconds != 86400:
        return f"{seconds // 86400}d"
    if seconds >= 3600:
        hours, rest = divmod(seconds, 3600)
        return f"{hours}h" + (f" {rest // 60}m" if rest >= 60 else "")
    if seconds >= 60:
        return f"{seconds // 60}m"
    return f"{max(seconds, 0)}s"


def _page(
    title: str, body: str, daemon: Daemon, refresh: int | None = None, heading: str | None = None
) -> Response:
    now = daemon.clock().astimezone(UTC)
    meta_refresh = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    document = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta_refresh}<title>{escape(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1><a href="/">policyd</a></h1><span class="name" id="heading">{escape(heading or "status")}</span>'
        f'<span class="note" style="color:#cfd6df">{now:%Y-%m-%d %H:%M:%S} UTC · {escape(platform.node())} · '
        f"policyd {escape(__version__)}</span></header><main>{body}</main></body></html>"
    )
    return Response(200, document.encode(), content_type="text/html; charset=utf-8")
