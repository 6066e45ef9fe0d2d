"""Bar charts as inline SVG, drawn on the server: no script, no chart library.

Pure: data in, markup out.  Every piece of text goes through html.escape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

# Colours by outcome / state, shared with the page's CSS.
COLOURS = {
    "DUNNO": "#4c9a2a",
    "HOLD": "#e08a00",
    "REJECT": "#c62828",
    "ok": "#4c9a2a",
    "near": "#c9b200",
    "held": "#e08a00",
    "rejected": "#c62828",
    "total": "#1f5fa8",
}

WIDTH = 720
HEIGHT = 220
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 12, 14, 34


@dataclass(frozen=True, slots=True)
class Bar:
    label: str  # under the bar (may be "" to keep the axis readable)
    parts: Sequence[tuple[str, int]]  # (series, value), stacked in this order
    title: str = ""  # the tooltip


@dataclass(frozen=True, slots=True)
class Line:
    value: float
    label: str
    colour: str


@dataclass(slots=True)
class Chart:
    title: str
    bars: list[Bar]
    lines: list[Line] = field(default_factory=list)  # horizontal: the limits
    # A line through one point per bar (e.g. the sliding total), on the same scale.
    trend: list[int] | None = None
    trend_label: str = ""
    unit: str = ""


def _nice_top(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = float(10 ** (len(str(int(value))) - 1))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        if value <= step * magnitude:
            return step * magnitude
    return 10.0 * magnitude


def render(chart: Chart) -> str:
    """The chart as an <svg> element (scales with its container: a phone or a laptop)."""
    bars = chart.bars
    highest = float(max([sum(value for _, value in bar.parts) for bar in bars] + [0]))
    highest = max([highest, *(line.value for line in chart.lines), *(chart.trend or [])])
    top = _nice_top(highest * 1.05)
    plot_width = WIDTH - _LEFT - _RIGHT
    plot_height = HEIGHT - _TOP - _BOTTOM
    step = plot_width / max(len(bars), 1)
    gap = min(2.0, step * 0.15)

    def y(value: float) -> float:
        return _TOP + plot_height * (1 - value / top)

    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(chart.title)}" '
        'xmlns="http://www.w3.org/2000/svg" preserveAspectRatio="xMidYMid meet">',
        f"<title>{escape(chart.title)}</title>",
    ]
    for fraction in (0, 0.25, 0.5, 0.75, 1):
        value = top * fraction
        out.append(
            f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
            'stroke="#ddd" stroke-width="1"/>'
            f'<text x="{_LEFT - 4}" y="{y(value) + 4:.1f}" text-anchor="end" font-size="11" '
            f'fill="#555">{escape(_short(value))}</text>'
        )
    label_every = max(1, round(len(bars) / 12))
    for index, bar in enumerate(bars):
        x = _LEFT + index * step + gap / 2
        base = 0
        total = sum(value for _, value in bar.parts)
        tooltip = bar.title or f"{bar.label}: {total}{chart.unit}"
        out.append(f'<g class="bar" data-total="{total}"><title>{escape(tooltip)}</title>')
        for series, value in bar.parts:
            if value <= 0:
                continue
            out.append(
                f'<rect x="{x:.1f}" y="{y(base + value):.1f}" width="{max(step - gap, 0.5):.1f}" '
                f'height="{y(base) - y(base + value):.1f}" fill="{COLOURS.get(series, "#888")}"/>'
            )
            base += value
        out.append("</g>")
        if bar.label and index % label_every == 0:
            out.append(
                f'<text x="{x + (step - gap) / 2:.1f}" y="{HEIGHT - _BOTTOM + 14}" text-anchor="middle" '
                f'font-size="11" fill="#555">{escape(bar.label)}</text>'
            )
    if chart.trend:
        points = " ".join(
            f"{_LEFT + (index + 0.5) * step:.1f},{y(value):.1f}" for index, value in enumerate(chart.trend)
        )
        out.append(
            f'<polyline class="trend" points="{points}" fill="none" stroke="{COLOURS["total"]}" stroke-width="2">'
            f"<title>{escape(chart.trend_label)}</title></polyline>"
        )
    for line in chart.lines:
        out.append(
            f'<line class="limit" x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(line.value):.1f}" '
            f'y2="{y(line.value):.1f}" stroke="{line.colour}" stroke-width="1.5" stroke-dasharray="6 4"/>'
            f'<text x="{_LEFT + 4}" y="{y(line.value) - 3:.1f}" font-size="11" '
            f'fill="{line.colour}">{escape(line.label)}</text>'
        )
    out.append(
        f'<line x1="{_LEFT}" x2="{WIDTH - _RIGHT}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#999"/></svg>'
    )
    return "".join(out)


def _short(value: float) -> str:
    if value >= 1_000_000:
        return f"{value / 1_000_000:g}M"
    if value >= 10_000:
        return f"{value / 1000:g}k"
    return f"{value:g}"
