"""The dashboard's view: the HTML page and its static files, pure functions of a /stats
payload and the page's query.

Owns: the page (Users and Accounts tables with consumed, preallocated (jobs), quota and
usage bars per resource; filters by user and account; minutes/hours; sorting; auto-refresh)
and its static files (packaged in slurm_quota/web/static, so the wheel ships them). It must
not fetch or serve anything: slurm_quota.app serves the page, with the data from the ledger
(`slurm-quota serve`) or from the service at SLURM_QUOTA_URL (`slurm-quota-web`, mod_wsgi:
slurm_quota/web/wsgi.py).
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from slurm_quota import __version__
from slurm_quota.stats import CRIT_PERCENT, WARN_PERCENT, usage_level

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
DEFAULT_REFRESH_S = 60
MAX_ROWS = 500  # per table; a filter narrows the rest


# ---------------------------------------------------------------------------------------
# View model: pure functions of the /stats payload and the page's query
# ---------------------------------------------------------------------------------------


def usage_class(percent: float | None) -> str:
    """CSS class of a usage bar: ok, warn above 80 %, crit above 95 %, '' when unlimited."""
    return usage_level(percent)


def percent_of(row: Mapping[str, Any], res: str) -> float | None:
    """(consumed + preallocated) / quota in percent; None when unlimited; 0 quota = 100."""
    quota = int(row[f"quota_{res}_minutes"])
    if quota == -1:
        return None
    used = int(row[f"total_consumed_{res}_minutes"]) + int(row[f"total_preallocated_{res}_minutes"])
    return 100.0 if quota == 0 else used * 100.0 / quota


def fmt_amount(minutes: int | float, hours: bool) -> str:
    """Minutes as a grouped integer, or hours with 2 decimals."""
    if hours:
        return f"{minutes / 60.0:,.2f}"
    return f"{int(minutes):,}"


def _max_percent(row: Mapping[str, Any]) -> float:
    values = [p for p in (percent_of(row, "cpu"), percent_of(row, "gpu")) if p is not None]
    return max(values) if values else -1.0


def select_rows(
    rows: Iterable[Mapping[str, Any]], name_key: str, needle: str, sort: str
) -> list[Mapping[str, Any]]:
    """Rows whose name contains needle (case-insensitive), by name or by usage (highest first)."""
    needle = needle.strip().lower()
    chosen = [r for r in rows if needle in str(r[name_key]).lower()]
    if sort == "usage":
        chosen.sort(key=lambda r: (-_max_percent(r), str(r[name_key])))
    return chosen


def _iso_utc(stamp: Any) -> str | None:
    if not stamp:
        return None
    try:
        when = datetime.fromisoformat(str(stamp).replace("T", " ").replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------

e = html.escape


def _usage_cell(row: Mapping[str, Any], res: str) -> str:
    percent = percent_of(row, res)
    if percent is None:
        return f'<td class="usage {res}-usage"><span class="unlimited">unlimited</span></td>'
    width = max(0.0, min(100.0, percent))
    return (
        f'<td class="usage {res}-usage {usage_class(percent)}" data-percent="{percent:.1f}">'
        f'<span class="bar"><span style="width:{width:.1f}%"></span></span>'
        f'<span class="pct">{percent:.1f}%</span></td>'
    )


def _row_html(row: Mapping[str, Any], name_key: str, hours: bool) -> str:
    name = str(row[name_key])
    jobs = int(row["job_count"])
    cells = [f'<td class="name">{e(name)}</td>']
    for res in ("cpu", "gpu"):
        quota = int(row[f"quota_{res}_minutes"])
        quota_text = "∞" if quota == -1 else fmt_amount(quota, hours)
        cells += [
            f'<td class="num first {res}-consumed">'
            f"{fmt_amount(row[f'total_consumed_{res}_minutes'], hours)}</td>",
            f'<td class="num {res}-prealloc">'
            f"{fmt_amount(row[f'total_preallocated_{res}_minutes'], hours)}"
            f'<span class="jobs">({jobs})</span></td>',
            f'<td class="num {res}-quota">{quota_text}</td>',
            _usage_cell(row, res),
        ]
    iso = _iso_utc(row.get("last_updated"))
    if iso:
        shown = iso.replace("T", " ")[:16] + " UTC"
        cells.append(f'<td class="updated"><time datetime="{iso}">{shown}</time></td>')
    else:
        cells.append(f'<td class="updated">{e(str(row.get("last_updated") or "-"))}</td>')
    return f'<tr data-name="{e(name, quote=True)}">' + "".join(cells) + "</tr>"


def _table_html(
    title: str, kind: str, name_key: str, rows: list[Mapping[str, Any]], total: int,
    hours: bool, empty: str,
) -> str:
    unit = "hours" if hours else "minutes"
    shown = rows[:MAX_ROWS]
    count = f"{len(rows)} of {total}" if len(rows) != total else f"{total}"
    parts = [f'<section id="{kind}"><h2>{e(title)} <span class="count">({count})</span></h2>']
    if not rows:
        parts.append(f'<p class="empty">{e(empty)}</p></section>')
        return "".join(parts)
    sub = (
        '<th class="first">Consumed</th><th>Prealloc (jobs)</th><th>Quota</th>'
        '<th class="usage">Usage</th>'
    )
    parts.append(
        "<table><thead>"
        f'<tr><th class="name"></th><th class="group" colspan="4">CPU ({unit})</th>'
        f'<th class="group" colspan="4">GPU ({unit})</th><th class="updated"></th></tr>'
        f'<tr><th class="name">{e(name_key.capitalize())}</th>{sub}{sub}'
        '<th class="updated">Last updated</th></tr></thead><tbody>'
    )
    parts += [_row_html(r, name_key, hours) for r in shown]
    parts.append("</tbody></table>")
    if len(rows) > MAX_ROWS:
        parts.append(
            f'<p class="note">Showing the first {MAX_ROWS} of {len(rows)}; use a filter.</p>'
        )
    parts.append("</section>")
    return "".join(parts)


def _cards(users: list[Mapping[str, Any]], accounts: list[Mapping[str, Any]]) -> str:
    def near(rows: list[Mapping[str, Any]], low: float, high: float | None) -> int:
        return sum(
            1 for r in rows if _max_percent(r) > low and (high is None or _max_percent(r) <= high)
        )

    items = [
        ("", len(users), "users"),
        ("", len(accounts), "accounts"),
        ("warn", near(users, WARN_PERCENT, CRIT_PERCENT), "users at 80–95 %"),
        ("crit", near(users, CRIT_PERCENT, None), "users above 95 %"),
        ("warn", near(accounts, WARN_PERCENT, CRIT_PERCENT), "accounts at 80–95 %"),
        ("crit", near(accounts, CRIT_PERCENT, None), "accounts above 95 %"),
    ]
    return '<div class="cards">' + "".join(
        f'<div class="card {cls}"><div class="n">{n}</div><div class="l">{e(label)}</div></div>'
        for cls, n, label in items
    ) + "</div>"


def render_page(
    payload: Mapping[str, Any] | None,
    *,
    query: Mapping[str, str],
    base: str,
    api_url: str,
    refresh_s: int,
    error: str | None = None,
    user_accounts: list[Mapping[str, Any]] | None = None,
    now: datetime | None = None,
    charts: list[dict[str, Any]] | None = None,
) -> str:
    """The whole dashboard page for a payload (None with an error message when unavailable)."""
    user_q = query.get("user", "")
    account_q = query.get("account", "")
    hours = query.get("unit") == "hours"
    sort = "usage" if query.get("sort") == "usage" else "name"
    now = now or datetime.now(timezone.utc)

    def link(**change: str) -> str:
        params = {k: v for k, v in {**query, **change}.items() if v}
        return e(base + ("?" + urlencode(params) if params else ""), quote=True)

    head = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        + (f'<meta http-equiv="refresh" content="{refresh_s}">' if refresh_s > 0 else "")
        + "<title>slurm-quota</title>"
        f'<link rel="stylesheet" href="{e(base)}static/style.css"></head><body>'
        '<header><h1>slurm-quota</h1><span class="meta">CPU and GPU quotas · '
        f'updated <time datetime="{now.strftime("%Y-%m-%dT%H:%M:%SZ")}">'
        f'{now.strftime("%Y-%m-%d %H:%M")} UTC</time>'
        + (f" · refreshes every {refresh_s} s" if refresh_s > 0 else " · auto-refresh off")
        + "</span></header><main>"
    )
    form = (
        f'<form class="filters" method="get" action="{e(base)}">'
        f'<label>User<input type="search" name="user" value="{e(user_q, quote=True)}" '
        'placeholder="name contains…"></label>'
        f'<label>Account<input type="search" name="account" value="{e(account_q, quote=True)}" '
        'placeholder="name contains…"></label>'
        '<label>Sort<select name="sort">'
        f'<option value="name"{" selected" if sort == "name" else ""}>by name</option>'
        f'<option value="usage"{" selected" if sort == "usage" else ""}>by usage</option>'
        "</select></label>"
        f'<input type="hidden" name="unit" value="{"hours" if hours else "minutes"}">'
        "<button type=\"submit\">Apply</button>"
        '<span class="toggle" role="group" aria-label="unit">'
        f'<a href="{link(unit="minutes")}" class="{"" if hours else "on"}">minutes</a>'
        f'<a href="{link(unit="hours")}" class="{"on" if hours else ""}">hours</a></span>'
        "</form>"
    )
    body = [head, form]
    if error is not None or payload is None:
        body.append(f'<div class="error" role="alert">{e(error or "No data.")}</div>')
    else:
        all_users = list(payload.get("users") or [])
        all_accounts = list(payload.get("accounts") or [])
        users = select_rows(all_users, "username", user_q, sort)
        if user_accounts is not None and not account_q:
            accounts = select_rows(user_accounts, "account", "", sort)
            accounts_title = f"Accounts of {user_q.strip()}"
        else:
            accounts = select_rows(all_accounts, "account", account_q, sort)
            accounts_title = "Accounts"
        body.append(_cards(all_users, all_accounts))
        if charts:
            body.append(_charts_html(charts, hours, query.get("chart") == "week", link))
        body.append(
            _table_html(
                "Users", "users", "username", users, len(all_users), hours,
                f"No user matches “{user_q}”." if user_q else "No users yet.",
            )
        )
        body.append(
            _table_html(
                accounts_title, "accounts", "account", accounts, len(all_accounts), hours,
                f"No account matches “{account_q}”." if account_q else "No accounts.",
            )
        )
    body.append(
        f"</main><footer>Data from {e(api_url)} · slurm-quota {e(__version__)} · "
        "bars: consumed + preallocated by open jobs, over the quota; orange above 80 %, "
        f'red above 95 %</footer><script src="{e(base)}static/dashboard.js"></script>'
        "</body></html>"
    )
    return "".join(body)


def _charts_html(charts: list[dict[str, Any]], hours: bool, weekly: bool, link: Any) -> str:
    """The "Usage over time" section: per owner, a CPU chart and (when it has a GPU quota or
    GPU use) a GPU chart, server-side SVG (slurm_quota.web.chart)."""
    from slurm_quota.web.chart import usage_svg

    toggle = (
        '<span class="toggle" role="group" aria-label="chart bucket">'
        f'<a href="{link(chart="day")}" class="{"" if weekly else "on"}">per day</a>'
        f'<a href="{link(chart="week")}" class="{"on" if weekly else ""}">per week</a></span>'
    )
    parts = [f'<section id="usage"><h2>Usage over time {toggle}</h2>']
    for c in charts:
        row = c["row"]
        parts.append(
            f'<figure class="owner-usage" data-kind="{e(c["kind"], quote=True)}" '
            f'data-name="{e(c["name"], quote=True)}">'
        )
        parts.append(usage_svg(c, "cpu", hours=hours))
        gpu_used = any(p["gpu_minutes"] for p in c["series"])
        if int(row["quota_gpu_minutes"]) != -1 or gpu_used:
            parts.append(usage_svg(c, "gpu", hours=hours))
        parts.append(
            f"<figcaption>{e(c['kind'])} {e(c['name'])}: cumulative consumption of the "
            "period (line), minutes charged per bucket (bars), reservations of open jobs at "
            "now, forecast at the pace of the last 14 days (dashed) and the quota.</figcaption>"
            "</figure>"
        )
    parts.append("</section>")
    return "".join(parts)


# ---------------------------------------------------------------------------------------
# Static files
# ---------------------------------------------------------------------------------------


def static_file(path: str) -> tuple[str, bytes] | None:
    """(content type, bytes) of /static/NAME, or None when path names no static file."""
    if not path.startswith("/static/"):
        return None
    name = path[len("/static/"):]
    target = STATIC_DIR / name
    if "/" in name or target.suffix not in STATIC_TYPES or not target.is_file():
        return None
    return STATIC_TYPES[target.suffix], target.read_bytes()
