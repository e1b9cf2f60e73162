"""The terminal tables of `slurm-quota stats` (seed layout), one renderer for the local and
the HTTP mode.

Owns: the USER and ACCOUNT tables, the 20-cell usage bar and its colours, minute/hour and
local-time formatting. It must not fetch or read anything: it formats a /stats payload.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from slurm_quota.ledger import UNLIMITED, usage_fraction
from slurm_quota.stats import usage_level

BAR_CELLS = 20
_COLOURS = {"ok": "\x1b[32m", "warn": "\x1b[38;5;208m", "crit": "\x1b[31m"}
_RESET = "\x1b[0m"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def color_wanted(mode: str = "auto", *, isatty: bool = True) -> bool:
    """Colour decision: never/always, or auto = a terminal and NO_COLOR unset or empty."""
    if mode == "never":
        return False
    if mode == "always":
        return True
    return isatty and not os.environ.get("NO_COLOR")


def usage_bar(
    consumed: int, preallocated: int, quota: int, *, color: bool = True
) -> str:
    """STATUS cell: 20 cells of █/░ for (consumed+prealloc)/quota and the percentage."""
    fraction = usage_fraction(quota, consumed, preallocated)
    if fraction is None:
        return "-"
    percent = fraction * 100.0
    filled = min(BAR_CELLS, max(0, int(math.floor(fraction * BAR_CELLS + 0.5))))
    text = "█" * filled + "░" * (BAR_CELLS - filled) + f" {percent:5.1f}%"
    if not color:
        return text
    return f"{_COLOURS[usage_level(percent)]}{text}{_RESET}"


def format_minutes(minutes: float, *, hours: bool = False) -> str:
    """A minute amount for display: as is, or /60 with 2 decimals under --hours."""
    if hours:
        return f"{minutes / 60.0:.2f}"
    return str(int(minutes)) if float(minutes).is_integer() else f"{minutes:.2f}"


def format_quota_value(quota: int, *, hours: bool = False) -> str:
    """A quota for display: ∞ for unlimited (−1)."""
    return "∞" if int(quota) == UNLIMITED else format_minutes(quota, hours=hours)


def local_time(stamp: str | None) -> str:
    """A stored UTC timestamp (SQLite CURRENT_TIMESTAMP) shown in local time."""
    if not stamp:
        return "-"
    text = str(stamp).strip().replace("T", " ")
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return str(stamp)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _visible_len(text: str) -> int:
    return len(_ANSI.sub("", text))


def _pad(text: str, width: int, align: str) -> str:
    gap = width - _visible_len(text)
    if gap <= 0:
        return text
    return " " * gap + text if align == "right" else text + " " * gap


def _kind_table(
    title: str, name_key: str, rows: Iterable[Mapping[str, Any]], *, hours: bool, color: bool
) -> str:
    unit = "hours" if hours else "minutes"
    sub = ["CONSUMED", "PREALLOC(JOBS)", "QUOTA", "STATUS"]
    header = [title, *sub, *sub, "LAST UPDATED"]
    aligns = ["left"] + ["right", "right", "right", "left"] * 2 + ["left"]
    body: list[list[str]] = []
    for r in rows:
        jobs = int(r["job_count"])
        line = [str(r[name_key])]
        for res in ("cpu", "gpu"):
            used = r[f"total_consumed_{res}_minutes"]
            pre = r[f"total_preallocated_{res}_minutes"]
            quota = r[f"quota_{res}_minutes"]
            line += [
                format_minutes(used, hours=hours),
                f"{format_minutes(pre, hours=hours)}({jobs})",
                format_quota_value(quota, hours=hours),
                usage_bar(int(used), int(pre), int(quota), color=color),
            ]
        line.append(local_time(r.get("last_updated")))
        body.append(line)
    widths = [max(_visible_len(row[i]) for row in [header, *body]) for i in range(len(header))]
    sep = "  "
    group_sep = " │ "

    def join(cells: list[str]) -> str:
        parts = [_pad(c, widths[i], aligns[i]) for i, c in enumerate(cells)]
        return (
            parts[0]
            + group_sep
            + sep.join(parts[1:5])
            + group_sep
            + sep.join(parts[5:9])
            + group_sep
            + parts[9]
        ).rstrip()

    group_w = sum(widths[1:5]) + len(sep) * 3
    groups = (
        " " * widths[0]
        + group_sep
        + f" CPU ({unit}) ".center(group_w, "─")
        + group_sep
        + f" GPU ({unit}) ".center(sum(widths[5:9]) + len(sep) * 3, "─")
        + group_sep.rstrip()
    )
    rule = "─" * widths[0] + "─┼─" + "─" * group_w + "─┼─"
    rule += "─" * (sum(widths[5:9]) + len(sep) * 3) + "─┼─" + "─" * widths[9]
    lines = [groups.rstrip(), join(header), rule]
    lines += [join(row) for row in body]
    return "\n".join(lines)


def render_tables(
    payload: Mapping[str, Any],
    *,
    hours: bool = False,
    color: bool = True,
    selector: tuple[str, str] | None = None,
) -> str:
    """The `stats` tables: one per non-empty kind (USER, ACCOUNT), seed layout.

    `selector` = ("user", name) or ("account", name) names what was asked for, so that an
    empty answer reads "No data found for user: X"; without it, "No data found.".
    """
    users = list(payload.get("users") or [])
    accounts = list(payload.get("accounts") or [])
    parts: list[str] = []
    if selector is not None:
        kind, name = selector
        wanted = users if kind == "user" else accounts
        if not wanted:
            parts.append(f"No data found for {kind}: {name}")
    elif not users and not accounts:
        parts.append("No data found.")
    if users:
        parts.append(_kind_table("USER", "username", users, hours=hours, color=color))
    if accounts:
        parts.append(_kind_table("ACCOUNT", "account", accounts, hours=hours, color=color))
    return "\n\n".join(parts) + "\n"


def _local_day(epoch_s: int | None) -> str:
    if epoch_s is None:
        return "-"
    return datetime.fromtimestamp(int(epoch_s), timezone.utc).astimezone().strftime("%Y-%m-%d")


def render_forecast(forecasts: Iterable[Mapping[str, Any]], *, hours: bool = False,
                    now: int | None = None) -> str:  # fmt: skip
    """The FORECAST table of `stats --forecast`: per owner and resource with a finite quota
    or a recent burn, the pace, what is left after reservations, the date it runs out and
    where the owner stands in its period."""
    from tabulate import tabulate

    unit = "h" if hours else "min"
    rows = []
    for f in forecasts:
        limited = int(f["quota_minutes"]) != UNLIMITED
        if not limited and not f["burn_minutes_per_day"]:
            continue
        left = f["left_minutes"]
        out = f["exhaust_at"]
        if out is not None and now is not None and out <= now:
            runs_out = "now"
        elif out is None:
            runs_out = "never at this pace" if limited else "-"
        else:
            runs_out = _local_day(out)
        if f["exhausts_in_period"] is True:
            runs_out += " (in this period)"
        period = "-"
        if f["period_end"] is not None:
            period = f"{f['period_elapsed_percent']:.0f}% gone, ends {_local_day(f['period_end'])}"
        projected = f["projected_percent_at_period_end"]
        rows.append((
            f"{f['kind']} {f['name']}", f["resource"].upper(),
            format_minutes(f["burn_minutes_per_day"], hours=hours),
            "∞" if left is None else format_minutes(left, hours=hours),
            runs_out, period, "-" if projected is None else f"{projected:.1f}%",
        ))  # fmt: skip
    if not rows:
        return "Forecast: no finite quota and nothing charged in the last 14 days.\n"
    return (
        tabulate(
            rows,
            headers=["OWNER", "RES", f"BURN {unit}/DAY", f"LEFT {unit}", "RUNS OUT",
                     "PERIOD", "AT PERIOD END"],  # fmt: skip
            disable_numparse=True,
        )
        + "\n"
    )
