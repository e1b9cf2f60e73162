"""Forecasts: when each user and account runs out of each quota at the recent pace.

Owns the burn rate (what the owner's runs that ended in the last FORECAST_WINDOW_DAYS were
charged, per day), the exhaustion date (what is left after the open reservations, divided
by that rate) and where the owner stands in its allocation period (share of the period's
time gone, the percentage of the quota it will have used at the period's end at this pace).
Read-only; the SQL is db.py's. Shared by `stats --forecast`, `/stats?forecast=1`, `/metrics`
and the dashboard.

Why reservations count as spent: an open job's reservation is its worst case and is already
withheld by the plugin, so "runs out" means "the plugin starts refusing jobs of the usual
size", which is what a PI wants to know.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from slurm_quota import db
from slurm_quota.ledger import UNLIMITED

FORECAST_WINDOW_DAYS = 14
DAY_S = 86400
_PER_MINUTE = {"cpu": 60, "gpu": 60000}


@dataclass(frozen=True)
class Forecast:
    """One owner's forecast for one resource."""

    kind: str  # user | account
    name: str
    resource: str  # cpu | gpu
    quota_minutes: int  # -1 unlimited
    consumed_minutes: int
    reserved_minutes: int
    burn_minutes_per_day: float  # over the window (or since the first charge, if later)
    exhaust_at: int | None  # epoch s; None: unlimited, or nothing burnt recently
    period_start: int | None
    period_end: int | None  # None: no calendar period
    period_elapsed_percent: float | None
    projected_percent_at_period_end: float | None

    @property
    def left_minutes(self) -> int | None:
        """Quota - consumed - reserved (None when unlimited)."""
        if self.quota_minutes == UNLIMITED:
            return None
        return self.quota_minutes - self.consumed_minutes - self.reserved_minutes

    @property
    def exhausts_in_period(self) -> bool | None:
        """True when the quota runs out before the period ends (None: no period or date)."""
        if self.period_end is None or self.exhaust_at is None:
            return None
        return self.exhaust_at < self.period_end

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (times as epoch seconds; the views format them)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "resource": self.resource,
            "quota_minutes": self.quota_minutes,
            "consumed_minutes": self.consumed_minutes,
            "reserved_minutes": self.reserved_minutes,
            "left_minutes": self.left_minutes,
            "burn_minutes_per_day": round(self.burn_minutes_per_day, 2),
            "exhaust_at": self.exhaust_at,
            "exhausts_in_period": self.exhausts_in_period,
            "period_start": self.period_start,
            "period_end": self.period_end,
            "period_elapsed_percent": self.period_elapsed_percent,
            "projected_percent_at_period_end": self.projected_percent_at_period_end,
        }


def exhaustion(left_exact: float, rate_per_s: float, now: int) -> int | None:
    """When left_exact runs out at rate_per_s: now if nothing is left, None if no burn."""
    if left_exact <= 0:
        return now
    if rate_per_s <= 0:
        return None
    return now + int(left_exact / rate_per_s)


def owner_forecast(
    kind: str,
    name: str,
    resource: str,
    *,
    quota_minutes: int,
    consumed_minutes: int,
    reserved_minutes: int,
    burnt_exact: int,
    window_s: int,
    now: int,
    period: tuple[int, int | None] | None = None,
) -> Forecast:
    """The forecast of one owner and resource from its totals and its recent charges."""
    per_minute = _PER_MINUTE[resource]
    rate = burnt_exact / window_s if window_s > 0 else 0.0  # exact units per second
    burn_per_day = rate * DAY_S / per_minute
    start, end = period if period is not None else (None, None)
    elapsed = projected = None
    if start is not None and end is not None and end > start:
        elapsed = round(min(100.0, max(0.0, (now - start) / (end - start) * 100.0)), 2)
    if quota_minutes == UNLIMITED:
        return Forecast(
            kind,
            name,
            resource,
            quota_minutes,
            consumed_minutes,
            reserved_minutes,
            burn_per_day,
            None,
            start,
            end,
            elapsed,
            None,
        )
    left = (quota_minutes - consumed_minutes - reserved_minutes) * per_minute
    at = exhaustion(left, rate, now)
    if end is not None and quota_minutes > 0:
        ahead = rate * max(0, end - now) / per_minute
        used = consumed_minutes + reserved_minutes + ahead
        projected = round(used / quota_minutes * 100.0, 2)
    return Forecast(
        kind,
        name,
        resource,
        quota_minutes,
        consumed_minutes,
        reserved_minutes,
        burn_per_day,
        at,
        start,
        end,
        elapsed,
        projected,
    )


def _window(conn: Any, now: int, window_days: int) -> tuple[int, int]:
    """(since, window_s): the last window_days, shorter when the ledger's first charge is
    younger (at least a day), so a new site is not shown a diluted pace."""
    since = now - window_days * DAY_S
    first = db.first_charge_end(conn)
    start = max(since, first) if first is not None else since
    return since, max(DAY_S, now - start)


def forecasts(
    conn: Any,
    payload: dict[str, list[dict[str, Any]]],
    now: int,
    window_days: int = FORECAST_WINDOW_DAYS,
) -> list[Forecast]:
    """Forecasts of every user and account of a /stats payload (its rows, its selection)."""
    since, window_s = _window(conn, now, window_days)
    out: list[Forecast] = []
    for kind, key, rows in (
        ("user", "username", payload.get("users", [])),
        ("account", "account", payload.get("accounts", [])),
    ):
        if not rows:
            continue
        burnt = db.charge_sums_by_owner_since(conn, kind, since, now)
        states = db.period_states(conn, kind)
        for row in rows:
            name = row[key]
            cpu_s, gpu_ms = burnt.get(name, (0, 0))
            period = states.get(name)
            for resource, exact in (("cpu", cpu_s), ("gpu", gpu_ms)):
                out.append(
                    owner_forecast(
                        kind, name, resource,
                        quota_minutes=int(row[f"quota_{resource}_minutes"]),
                        consumed_minutes=int(row[f"total_consumed_{resource}_minutes"]),
                        reserved_minutes=int(row[f"total_preallocated_{resource}_minutes"]),
                        burnt_exact=exact, window_s=window_s, now=now, period=period,
                    )
                )  # fmt: skip
    return out


def metric_forecasts(
    conn: Any, kind: str, rows: list, now: int, window_days: int = FORECAST_WINDOW_DAYS
) -> list[Forecast]:
    """Forecasts for /metrics from db.stats_users/stats_accounts tuples, only of the owners
    with a finite quota or something charged in the window (the others have no date and a
    burn of 0): a whole-ledger build stays a GROUP BY plus a pass over those few."""
    since, window_s = _window(conn, now, window_days)
    burnt = _burnt_cached(conn, kind, since, now)
    states = db.period_states(conn, kind)
    out: list[Forecast] = []
    for name, cu, cp, cq, gu, gp, gq, _updated, _jobs in rows:
        cpu_s, gpu_ms = burnt.get(name, (0, 0))
        for resource, quota, used, reserved, exact in (
            ("cpu", int(cq), cu, cp, cpu_s), ("gpu", int(gq), gu, gp, gpu_ms)
        ):
            if quota == UNLIMITED and not exact:
                continue
            out.append(
                owner_forecast(
                    kind, name, resource, quota_minutes=quota, consumed_minutes=int(used),
                    reserved_minutes=int(reserved), burnt_exact=exact, window_s=window_s,
                    now=now, period=states.get(name),
                )
            )  # fmt: skip
    return out


# /metrics is rebuilt after every change of the ledger; the 14-day sums behind the burn
# rates cost a scan of the window's charges (112 ms at 60k charges in 14 days). A pace over
# two weeks does not move in five minutes: whole-ledger builds reuse the sums of the same
# ledger file for up to BURN_CACHE_S (runs charged meanwhile join at the next refresh).
BURN_CACHE_S = 300
_burn_cache: dict[tuple, dict[str, tuple[int, int]]] = {}
_burn_lock = threading.Lock()


def _burnt_cached(conn: Any, kind: str, since: int, now: int) -> dict[str, tuple[int, int]]:
    bucket = since // BURN_CACHE_S
    key = (db.database_file(conn), kind, bucket)
    with _burn_lock:
        hit = _burn_cache.get(key)
    if hit is not None:
        return hit
    sums = db.charge_sums_by_owner_since(conn, kind, bucket * BURN_CACHE_S, now)
    with _burn_lock:
        if len(_burn_cache) >= 16:
            _burn_cache.clear()
        _burn_cache[key] = sums
    return sums
