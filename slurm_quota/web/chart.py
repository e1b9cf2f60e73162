"""The usage chart of one user or account, as server-side SVG (no script, no library).

Owns the drawing of a `/usage` answer (slurm_quota.usage) for one resource: the minutes
charged per day or week (bars, their own scale, in the lower strip), the cumulative
consumption of the period (line), the quota (dashed line), the reservations of the open
jobs (a bar at "now" from consumed to consumed + reserved), and the forecast at the recent
pace (dashed line from there, to the period's end or ahead, with the date the quota runs
out). Pure: a payload in, a string out; every text is escaped.
"""

from __future__ import annotations

import html
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

W, H = 760, 280
LEFT, RIGHT, TOP, BOTTOM = 72, 24, 28, 46
STRIP = 56  # height of the per-bucket bars strip at the bottom of the plot
DAY = 86400

e = html.escape


def _zone(name: str) -> Any:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _amount(minutes: float, hours: bool) -> str:
    if hours:
        return f"{minutes / 60:,.1f} h"
    return f"{minutes:,.0f} min"


def _ticks(low: float, high: float, count: int = 4) -> list[float]:
    span = high - low
    if span <= 0:
        return [low]
    raw = span / count
    magnitude = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = int(low // step) * step
    return [first + i * step for i in range(count + 2) if low <= first + i * step <= high]


def usage_svg(payload: dict[str, Any], resource: str, *, hours: bool = False) -> str:
    """The SVG chart of one resource ('cpu' or 'gpu') of a /usage payload."""
    row = payload["row"]
    series = payload["series"]
    now = int(payload["now"])
    tz = _zone(str(payload.get("time_zone") or "UTC"))
    quota = int(row[f"quota_{resource}_minutes"])
    consumed = float(row[f"total_consumed_{resource}_minutes"])
    reserved = float(row[f"total_preallocated_{resource}_minutes"])
    fc = next((f for f in payload["forecasts"] if f["resource"] == resource), None)
    burn = float(fc["burn_minutes_per_day"]) if fc else 0.0
    exhaust_at = fc["exhaust_at"] if fc else None
    period_end = payload.get("period_end")

    x0 = int(series[0]["start"]) if series else now - 30 * DAY
    horizon = int(period_end) if period_end else now + max(7 * DAY, (now - x0) // 3)
    horizon = max(horizon, now + DAY)
    ahead = consumed + reserved + burn * (horizon - now) / DAY
    cumulative = [p for p in series if p[f"cumulative_{resource}_minutes"] is not None]
    top_values = [consumed + reserved, *(p[f"cumulative_{resource}_minutes"] for p in cumulative)]
    if quota >= 0:
        top_values.append(quota)
        ahead = min(ahead, quota * 1.15) if quota > 0 else ahead
    top_values.append(ahead)
    y_max = max(top_values + [1.0]) * 1.08
    y_min = min([0.0, *(p[f"cumulative_{resource}_minutes"] for p in cumulative)])
    plot_h = H - TOP - BOTTOM - STRIP - 8

    def x(t: float) -> float:
        return LEFT + (t - x0) / max(1, horizon - x0) * (W - LEFT - RIGHT)

    def y(v: float) -> float:
        return TOP + (y_max - v) / max(1e-9, y_max - y_min) * plot_h

    unit = "hours" if hours else "minutes"
    title = f"{resource.upper()} {unit} of {payload['kind']} {payload['name']}"
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="usage-chart {resource}" '
        f'viewBox="0 0 {W} {H}" role="img" aria-label="{e(title, quote=True)}" '
        f'data-resource="{resource}" data-quota="{quota}" data-consumed="{consumed:g}" '
        f'data-reserved="{reserved:g}" data-exhaust-at="{exhaust_at or ""}">',
        f"<title>{e(title)}</title>",
        f'<text x="{LEFT}" y="16" class="chart-title">{e(title)}</text>',
    ]
    div = 60.0 if hours else 1.0  # ticks at round numbers of the unit shown
    for v in (t * div for t in _ticks(y_min / div, y_max / div)):
        parts.append(
            f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{y(v):.1f}" y2="{y(v):.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{y(v) + 4:.1f}" text-anchor="end">'
            f"{e(_amount(v, hours))}</text>"
        )
    # x ticks: about six dates
    step = max(DAY, (horizon - x0) // 6 // DAY * DAY)
    t = x0
    while t <= horizon:
        label = datetime.fromtimestamp(t, tz).strftime("%b %d")
        parts.append(
            f'<text class="tick" x="{x(t):.1f}" y="{H - 8}" text-anchor="middle">{e(label)}</text>'
        )
        t += step
    # per-bucket bars in the bottom strip, own scale
    strip_top = H - BOTTOM - STRIP + 6
    peak = max([p[f"{resource}_minutes"] for p in series] + [0.0])
    if series:
        width = max(1.0, x(x0 + (series[1]["start"] - x0 if len(series) > 1 else DAY)) - x(x0) - 1)
        for p in series:
            v = float(p[f"{resource}_minutes"])
            if v <= 0 or peak <= 0:
                continue
            h = v / peak * (STRIP - 14)
            bar_y = strip_top + STRIP - 14 - h
            parts.append(
                f'<rect class="bucket" x="{x(p["start"]):.1f}" y="{bar_y:.1f}" '
                f'width="{width:.1f}" height="{h:.1f}"><title>'
                f"{e(datetime.fromtimestamp(p['start'], tz).strftime('%Y-%m-%d'))}: "
                f"{e(_amount(v, hours))}</title></rect>"
            )
    per = "week" if payload.get("bucket") == "week" else "day"
    parts.append(
        f'<text class="tick" x="{LEFT + 4}" y="{strip_top + 2}">per {per} '
        f"(peak {e(_amount(peak, hours))})</text>"
    )
    # cumulative consumption
    if cumulative:
        bucket_s = series[1]["start"] - series[0]["start"] if len(series) > 1 else DAY
        first = cumulative[0]
        begin = payload.get("period_start") or first["start"]
        start_v = first[f"cumulative_{resource}_minutes"] - first[f"{resource}_minutes"]
        points = [(max(x0, int(begin)), y(start_v))]
        points += [
            (min(now, p["start"] + bucket_s), y(p[f"cumulative_{resource}_minutes"]))
            for p in cumulative
        ]
        path = " ".join(f"{x(px):.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline class="consumed" points="{path}"/>')
    if payload.get("period_start") and int(payload["period_start"]) > x0:
        ps = int(payload["period_start"])
        parts.append(
            f'<line class="period" x1="{x(ps):.1f}" x2="{x(ps):.1f}" y1="{TOP}" '
            f'y2="{H - BOTTOM - STRIP:.1f}"/><text class="label" x="{x(ps) + 4:.1f}" '
            f'y="{TOP + 12}">period start</text>'
        )
    # quota
    if quota >= 0:
        parts.append(
            f'<line class="quota" x1="{LEFT}" x2="{W - RIGHT}" y1="{y(quota):.1f}" '
            f'y2="{y(quota):.1f}"/><text class="label quota-label" x="{W - RIGHT - 4}" '
            f'y="{y(quota) - 5:.1f}" text-anchor="end">quota {e(_amount(quota, hours))}</text>'
        )
    # now, reserved, forecast
    parts.append(
        f'<line class="now" x1="{x(now):.1f}" x2="{x(now):.1f}" y1="{TOP}" '
        f'y2="{H - BOTTOM - STRIP:.1f}"/>'
    )
    if reserved > 0:
        parts.append(
            f'<rect class="reserved" x="{x(now) - 4:.1f}" y="{y(consumed + reserved):.1f}" '
            f'width="8" height="{max(1.0, y(consumed) - y(consumed + reserved)):.1f}">'
            f"<title>reserved by open jobs: {e(_amount(reserved, hours))}</title></rect>"
        )
    start_v = consumed + reserved
    if burn > 0:
        end_t = horizon
        end_v = start_v + burn * (end_t - now) / DAY
        if quota >= 0 and end_v > quota and exhaust_at and exhaust_at < horizon:
            end_t, end_v = int(exhaust_at), float(quota)
        parts.append(
            f'<line class="forecast" x1="{x(now):.1f}" y1="{y(start_v):.1f}" '
            f'x2="{x(end_t):.1f}" y2="{y(end_v):.1f}"/>'
        )
    if quota >= 0 and exhaust_at and now <= int(exhaust_at) <= horizon:
        when = datetime.fromtimestamp(int(exhaust_at), tz).strftime("%Y-%m-%d")
        parts.append(
            f'<line class="exhaust" x1="{x(exhaust_at):.1f}" x2="{x(exhaust_at):.1f}" '
            f'y1="{TOP}" y2="{H - BOTTOM - STRIP:.1f}"/><text class="label exhaust-label" '
            f'x="{x(exhaust_at) - 4:.1f}" y="{TOP + 12}" text-anchor="end">runs out {when}</text>'
        )
    # legend
    legend = [
        ("consumed", "consumed"),
        ("reserved", "reserved"),
        ("forecast", "forecast"),
        ("quota", "quota"),
    ]
    lx = W - RIGHT - 4 * 92
    for i, (cls, text) in enumerate(legend):
        parts.append(
            f'<g class="legend legend-{cls}"><rect x="{lx + i * 92}" y="6" width="14" height="4"/>'
            f'<text x="{lx + i * 92 + 18}" y="12">{text}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)
