"""Usage over time of one user or account: the read model of `/usage` and the dashboard chart.

Owns the series (CPU and GPU minutes charged per day or week, by the runs' end times, at
local midnights of the site's zone), the cumulative consumption of the current period
derived from it, and the numbers drawn with it (quota, reserved, forecast). Read-only; the
SQL is db.py's. It must not render anything (slurm_quota/web/chart.py draws it).

Cumulative consumption at a bucket's end = the owner's consumption now minus the runs that
ended after it: exact for charges; an `adjust` or a rollover inside the window moves the
whole curve (the curve ends at the true total now).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from slurm_quota import db, forecast, periods, stats
from slurm_quota.errors import InvalidInput, NotFound

BUCKETS = {"day": 86400, "week": 7 * 86400}
DEFAULT_DAYS = 60
MAX_DAYS = 730


def _offset(tz: Any, now: int) -> int:
    """Seconds to add to an epoch so that whole buckets start at local midnight (today's
    offset; a DST change inside the window shifts older buckets by an hour at most)."""
    offset = datetime.fromtimestamp(now, tz).utcoffset() or timedelta(0)
    return int(offset.total_seconds())


def usage_payload(
    conn: Any,
    *,
    username: str | None = None,
    account: str | None = None,
    bucket: str = "day",
    days: int = DEFAULT_DAYS,
    now: int,
) -> dict[str, Any]:
    """The `/usage` answer for one user or account (raises InvalidInput, NotFound)."""
    if (username is None) == (account is None):
        raise InvalidInput("Give a username or an account (one of them).")
    if bucket not in BUCKETS:
        raise InvalidInput(f"bucket is day or week, not {bucket!r}.")
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise InvalidInput(f"days is 1 to {MAX_DAYS}.")
    kind, name = ("user", username) if username is not None else ("account", account)
    assert name is not None
    rows = db.stats_accounts(conn, name) if kind == "account" else db.stats_user_view(conn, name)[0]
    if not rows:
        raise NotFound(f"No {kind} {name} in the ledger.")
    row = stats.payload_row("username" if kind == "user" else "account", rows[0])
    tz = periods.site_zone(conn)
    size = BUCKETS[bucket]
    offset = _offset(tz, now)
    since = now - days * 86400
    since = ((since + offset) // size) * size - offset  # a bucket start
    series = db.charge_usage_by_bucket(conn, kind, name, since, size, offset)
    state = db.period_state(conn, kind, name)
    period = None
    if state is not None:
        period = (int(state["period_start"]), state["period_end"])
    fc = forecast.forecasts(
        conn,
        {"users": [row], "accounts": []} if kind == "user" else {"users": [], "accounts": [row]},
        now,
    )
    by_bucket = {t: (cpu, gpu) for t, cpu, gpu in series}
    points = []
    t = since
    while t <= now:
        cpu_s, gpu_ms = by_bucket.get(t, (0, 0))
        points.append(
            {
                "start": t,
                "cpu_minutes": round(cpu_s / 60, 2),
                "gpu_minutes": round(gpu_ms / 60000, 2),
            }
        )
        t += size
    # Cumulative consumption of the current period at each bucket's end: today's total minus
    # what ended later; None for buckets that ended before the period began.
    begin = period[0] if period is not None else None
    for res in ("cpu", "gpu"):
        total = row[f"total_consumed_{res}_minutes"]
        later = 0.0
        for p in reversed(points):
            ended_before = begin is not None and p["start"] + size <= begin
            p[f"cumulative_{res}_minutes"] = None if ended_before else round(total - later, 2)
            later += p[f"{res}_minutes"]
    return {
        "kind": kind,
        "name": name,
        "bucket": bucket,
        "now": now,
        "time_zone": str(getattr(tz, "key", tz)),
        "period_start": None if period is None else period[0],
        "period_end": None if period is None else period[1],
        "row": row,
        "series": points,
        "forecasts": [f.as_dict() for f in fc],
    }
