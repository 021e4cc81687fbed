"""Charts of a task's stats as SVG, drawn on the server: readable without JavaScript, no
charting library to vendor for two bar charts and a line."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

from ralph.background.stats import OUTCOMES, DayStats

WIDTH = 720
HEIGHT = 200
LEFT, RIGHT, TOP, BOTTOM = 44, 44, 12, 28

COLOURS = {
    "approved": "#2f9e44",
    "approved_with_edits": "#74b816",
    "rejected": "#e03131",
    "superseded": "#adb5bd",
    "expired": "#868e96",
    "conflict": "#f08c00",
    "pending": "#4dabf7",
}
RATE_COLOUR = "#1d2330"
TOKENS_COLOUR = "#3b5bdb"


def _nice(top: float) -> float:
    """A round axis maximum at or above `top`."""
    if top <= 0:
        return 1.0
    step = 1.0
    while step * 10 < top:
        step *= 10
    for factor in (1, 2, 5, 10):
        if step * factor >= top:
            return step * factor
    return step * 10


def _frame(days: Sequence[DayStats], top: float, unit: str, rate_axis: bool) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    parts = [
        f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" '
        'stroke="#e4e7ec"/>'
    ]
    for fraction in (0.5, 1.0):
        y = HEIGHT - BOTTOM - plot_h * fraction
        parts.append(
            f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#f1f3f5"/>'
        )
        value = top * fraction
        label = f"{value:,.0f}{unit}" if value == int(value) else f"{value:,.1f}{unit}"
        parts.append(f'<text x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        if rate_axis:
            parts.append(f'<text x="{WIDTH - RIGHT + 4}" y="{y + 4:.1f}">{fraction:.0%}</text>')
    every = max(1, len(days) // 8)
    slot = (WIDTH - LEFT - RIGHT) / max(len(days), 1)
    for i, day in enumerate(days):
        if i % every == 0:
            x = LEFT + slot * (i + 0.5)
            parts.append(
                f'<text x="{x:.1f}" y="{HEIGHT - 8}" text-anchor="middle">'
                f"{day.day.strftime('%m-%d')}</text>"
            )
    return parts


def _svg(title: str, parts: list[str]) -> Markup:
    body = "".join(parts)
    return Markup(
        f'<svg class="chart" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'xmlns="http://www.w3.org/2000/svg" font-size="11" fill="#667085">'
        f"<title>{escape(title)}</title>{body}</svg>"
    )


def proposals_chart(days: Sequence[DayStats]) -> Markup:
    """Proposals made per day, stacked by outcome, and the approval rate per day (a line,
    on the right-hand axis)."""
    totals = [sum(day.proposals.values()) for day in days]
    top = _nice(max(totals, default=0))
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(len(days), 1)
    parts = _frame(days, top, "", rate_axis=True)
    rate_points: list[str] = []
    for i, day in enumerate(days):
        x = LEFT + slot * i + slot * 0.15
        y = float(HEIGHT - BOTTOM)
        for outcome in OUTCOMES:
            n = day.proposals.get(outcome, 0)
            if not n:
                continue
            h = plot_h * n / top
            y -= h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                f'fill="{COLOURS[outcome]}"><title>{day.day}: {n} {outcome}</title></rect>'
            )
        if day.approval_rate is not None:
            ry = HEIGHT - BOTTOM - plot_h * day.approval_rate
            rate_points.append(f"{LEFT + slot * (i + 0.5):.1f},{ry:.1f}")
    if rate_points:
        parts.append(
            f'<polyline points="{" ".join(rate_points)}" fill="none" stroke="{RATE_COLOUR}" '
            'stroke-width="2"/>'
        )
        parts += [
            f'<circle cx="{p.split(",")[0]}" cy="{p.split(",")[1]}" r="2.5" fill="{RATE_COLOUR}"/>'
            for p in rate_points
        ]
    return _svg("Proposals per day by outcome, and the approval rate", parts)


def tokens_chart(days: Sequence[DayStats]) -> Markup:
    """Tokens spent per day (with the cost in each bar's title when known)."""
    top = _nice(max((day.total_tokens for day in days), default=0))
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / max(len(days), 1)
    parts = _frame(days, top, "", rate_axis=False)
    for i, day in enumerate(days):
        if not day.total_tokens:
            continue
        h = plot_h * day.total_tokens / top
        cost = "" if day.cost_usd is None else f", ${day.cost_usd:.4f}"
        parts.append(
            f'<rect x="{LEFT + slot * i + slot * 0.15:.1f}" y="{HEIGHT - BOTTOM - h:.1f}" '
            f'width="{slot * 0.7:.1f}" height="{h:.1f}" fill="{TOKENS_COLOUR}">'
            f"<title>{day.day}: {day.total_tokens:,} tokens{cost}</title></rect>"
        )
    return _svg("Tokens per day", parts)
