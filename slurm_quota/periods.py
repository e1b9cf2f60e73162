"""Allocation periods: calendar periods with an archive and a capped carry-over, rolling windows.

Owns the period arithmetic (pure: specs, time zones, boundaries, carry-over) and the upkeep
that keeps each owner's consumed totals those of its current period: a calendar rollover
archives the closed period and restarts consumption at minus the carried-over credit; a
rolling window takes the charges that aged out of it off the totals. Every such change is a
consumption_adjustments row of its own reason, so `check`'s invariant
consumed = Σ charges + Σ adjustments still holds, and the plugin keeps reading the same one
row per owner (no scan at submit time).

Who runs the upkeep: the charge path (for the run's user and account, in the charge's
transaction, before the charge is added) and `reconcile` (every owner). Both are idempotent:
a rollover happens under the write lock and moves period_state forward, so a second run,
concurrent or not, finds nothing due. It must not print, run commands or hold SQL (db.py's).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

from slurm_quota import db, ledger, numbers
from slurm_quota.errors import InvalidInput, NotFound

NONE = "none"
CALENDAR = "calendar"
ROLLING = "rolling"
SITE = "site"  # period_rules.owner_kind of the site default (owner '')

REASON_ROLLOVER = "period-rollover"
REASON_WINDOW = "window"
REASON_CLOSED_PERIOD = "closed-period"
ACTION_SET_PERIOD = "set-period"
ACTION_PERIOD_START = "period-start"
ACTION_ROLLOVER = "period-rollover"
ACTION_CLOSE_PERIOD = "close-period"
ACTION_PERIOD_END = "period-end"

DAY_S = 86400
MAX_WINDOW_DAYS = 3660
MAX_LENGTH = 1200  # of any unit in an anchored spec (100 years of months)
MAX_ROLLOVERS = 1000  # periods closed in one upkeep (a daily period unattended ~3 years)

_ANCHORED = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})\+([0-9]{1,4})([dwmy])")
_ROLLING = re.compile(r"rolling:([0-9]{1,4})")


# ---------------------------------------------------------------------------------------
# Specs and time zones (pure)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """A parsed period spec: none, a calendar period, or a rolling window."""

    text: str
    kind: str  # NONE | CALENDAR | ROLLING
    unit: str = ""  # calendar: 'm' (months), 'd' (days); lengths in that unit
    length: int = 0
    anchor: date | None = None  # calendar: the start of one period (periods repeat from it)
    window_days: int = 0


def parse_spec(text: str) -> Spec:
    """A period spec from what an admin typed (raises InvalidInput)."""
    raw = (text or "").strip().lower()
    if raw == NONE:
        return Spec(NONE, NONE)
    if raw in ("month", "quarter", "year"):
        length = {"month": 1, "quarter": 3, "year": 12}[raw]
        return Spec(raw, CALENDAR, unit="m", length=length, anchor=date(2000, 1, 1))
    match = _ROLLING.fullmatch(raw)
    if match:
        days = int(match.group(1))
        if not 1 <= days <= MAX_WINDOW_DAYS:
            raise InvalidInput(f"A rolling window is 1 to {MAX_WINDOW_DAYS} days, not {days}.")
        return Spec(f"rolling:{days}", ROLLING, window_days=days)
    match = _ANCHORED.fullmatch(raw)
    if match:
        year, month, day, length, unit = match.groups()
        try:
            anchor = date(int(year), int(month), int(day))
        except ValueError as err:
            raise InvalidInput(f"{year}-{month}-{day} is not a date ({err}).") from err
        count = int(length)
        if not 1 <= count <= MAX_LENGTH:
            raise InvalidInput(f"A period length is 1 to {MAX_LENGTH}, not {count}.")
        if unit in ("d", "w"):
            return Spec(raw, CALENDAR, "d", count * (7 if unit == "w" else 1), anchor)
        return Spec(raw, CALENDAR, "m", count * (12 if unit == "y" else 1), anchor)
    raise InvalidInput(
        f"{numbers.shown(text)} is not a period: give none, month, quarter, year, a start "
        f"date and a length (2027-01-01+1y, 2026-09-01+6m, 2026-12-07+2w, 2026-12-01+10d) or "
        f"rolling:N (the last N days)."
    )


def local_zone_name() -> str:
    """The controller's zone: $TZ when it names a zone, else /etc/localtime's, else UTC."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz and "/" in tz or tz == "UTC":
        return tz
    try:
        target = os.path.realpath("/etc/localtime")
    except OSError:
        return "UTC"
    marker = "/zoneinfo/"
    return target.split(marker, 1)[1] if marker in target else "UTC"


def zone(name: str | None) -> Any:
    """The tzinfo of an IANA zone name (None: the controller's); raises InvalidInput."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    key = name or local_zone_name()
    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError) as err:
        raise InvalidInput(
            f"{numbers.shown(key)} is not a time zone this system knows ({err})."
        ) from err


def _midnight(day: date, tz: Any) -> int:
    """Epoch seconds of 00:00 local time on day (DST handled by the zone)."""
    return int(datetime(day.year, day.month, day.day, tzinfo=tz).timestamp())


def add_months(day: date, months: int) -> date:
    """day moved by whole months, clamped to the month's end (Jan 31 + 1 → Feb 28/29)."""
    index = day.year * 12 + (day.month - 1) + months
    year, month = divmod(index, 12)
    month += 1
    last = (date(year + (month == 12), month % 12 + 1, 1) - timedelta(days=1)).day
    return date(year, month, min(day.day, last))


def _nth_start(spec: Spec, k: int) -> date:
    assert spec.anchor is not None
    if spec.unit == "m":
        return add_months(spec.anchor, k * spec.length)
    return spec.anchor + timedelta(days=k * spec.length)


def period_bounds(spec: Spec, at: int, tz: Any) -> tuple[int, int]:
    """(start, end) in epoch seconds of the calendar period containing the instant at;
    boundaries are local midnights in tz, each period [start, end)."""
    if spec.kind != CALENDAR or spec.anchor is None:
        raise ValueError(f"{spec.text} has no calendar bounds")
    local = datetime.fromtimestamp(at, tz).date()
    if spec.unit == "m":
        months = (local.year - spec.anchor.year) * 12 + local.month - spec.anchor.month
        k = months // spec.length
    else:
        k = (local - spec.anchor).days // spec.length
    # The estimate is off by at most one either way (day clamping, time of day).
    while _midnight(_nth_start(spec, k), tz) > at:
        k -= 1
    while _midnight(_nth_start(spec, k + 1), tz) <= at:
        k += 1
    return _midnight(_nth_start(spec, k), tz), _midnight(_nth_start(spec, k + 1), tz)


def carry_over(quota_minutes: int, consumed_exact: int, per_minute: int, percent: int) -> int:
    """The credit (exact units) carried into the next period: the unused quota at the close,
    at most percent % of the quota; 0 for an unlimited quota or percent 0."""
    if quota_minutes < 0 or percent <= 0:
        return 0
    quota_exact = quota_minutes * per_minute
    unused = max(0, quota_exact - consumed_exact)
    return min(unused, quota_exact * percent // 100)


def shown_time(epoch_s: int | None, tz: Any) -> str:
    """An instant as local ISO time to the minute, with its UTC offset."""
    if epoch_s is None:
        return "-"
    return datetime.fromtimestamp(epoch_s, tz).isoformat(timespec="minutes")


def parse_day(text: str, tz: Any) -> int:
    """An instant typed as YYYY-MM-DD (00:00 local) or YYYY-MM-DDTHH:MM (raises InvalidInput)."""
    raw = (text or "").strip()
    try:
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", raw):
            return _midnight(date.fromisoformat(raw), tz)
        if re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}", raw):
            return int(datetime.fromisoformat(raw).replace(tzinfo=tz).timestamp())
    except ValueError as err:
        raise InvalidInput(f"{numbers.shown(raw)} is not a date ({err}).") from err
    raise InvalidInput(f"{numbers.shown(raw)} is not a date: give YYYY-MM-DD or YYYY-MM-DDTHH:MM.")


# ---------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """The period rule of one owner (its own, else the site default)."""

    spec: Spec
    carry_over_percent: int
    own: bool  # False: the site default applies


def _rule_from_row(row: Any, own: bool) -> Rule:
    return Rule(parse_spec(str(row[0])), int(row[1]), own)


def site_zone(conn: Any) -> Any:
    """The zone of calendar boundaries: the site rule's time_zone, else the controller's."""
    return zone(db.period_time_zone(conn))


def effective_rule(conn: Any, kind: str, name: str) -> Rule:
    """The rule of an owner: its own row, else the site default, else none."""
    row = db.period_rule(conn, kind, name)
    if row is not None:
        return _rule_from_row(row, True)
    row = db.period_rule(conn, SITE, "")
    if row is not None:
        return _rule_from_row(row, False)
    return Rule(parse_spec(NONE), 0, False)


def check_percent(percent: int) -> int:
    """A carry-over percentage 0..100 (raises InvalidInput)."""
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise InvalidInput(f"A carry-over is 0 to 100 percent, not {percent!r}.")
    return percent


# ---------------------------------------------------------------------------------------
# Upkeep (inside the caller's write transaction)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    """One change the upkeep made to an owner."""

    kind: str
    name: str
    action: str  # period-start | period-rollover | window | period-end | close-period
    detail: str


def _journal(
    conn: Any,
    actor: str,
    action: str,
    kind: str,
    name: str,
    old: str,
    new: str,
    reason: str | None = None,
) -> None:
    db.insert_journal(
        conn,
        actor=actor,
        action=action,
        target_kind=kind,
        target=name,
        field="period",
        old_value=old,
        new_value=new,
        reason=reason,
    )


def _minutes_text(cpu_s: int, gpu_ms: int) -> str:
    return (
        f"CPU {ledger.minutes_from_cpu_s(cpu_s)} min, GPU {ledger.minutes_from_gpu_ms(gpu_ms)} min"
    )


def _start_state(conn: Any, kind: str, name: str, spec: Spec, now: int, tz: Any) -> tuple:
    if spec.kind == CALENDAR:
        start, end = period_bounds(spec, now, tz)
        db.set_period_state(conn, kind, name, spec.text, start, end, None, 0, 0)
        return start, end
    # A rolling window starts counting the last N days at once: older charges age out at
    # the first upkeep (window_aged_until 0 = nothing aged yet).
    db.set_period_state(conn, kind, name, spec.text, now - spec.window_days * DAY_S, None, 0, 0, 0)
    return now - spec.window_days * DAY_S, None


def _close(
    conn: Any,
    kind: str,
    name: str,
    state: Any,
    end: int,
    rule: Rule,
    actor: str,
    reason: str | None,
    action: str,
    tz: Any,
) -> Event:
    """Archive the owner's period [start, end), restart consumption at minus the carry-over."""
    owner = db.get_owner(conn, kind, name)
    cpu_s, gpu_ms = db.owner_consumed_exact(conn, kind, name)
    quota_cpu = int(owner["quota_cpu_minutes"])
    quota_gpu = int(owner["quota_gpu_minutes"])
    carry_in_cpu, carry_in_gpu = int(state["carry_in_cpu_s"]), int(state["carry_in_gpu_ms"])
    pct = rule.carry_over_percent
    carry_cpu = carry_over(quota_cpu, cpu_s, 60, pct)
    carry_gpu = carry_over(quota_gpu, gpu_ms, 60000, pct)
    start = int(state["period_start"])
    db.insert_period_archive(
        conn,
        kind,
        name,
        str(state["spec"]),
        start,
        end,
        quota_cpu,
        quota_gpu,
        cpu_s + carry_in_cpu,
        gpu_ms + carry_in_gpu,
        carry_in_cpu,
        carry_in_gpu,
        carry_cpu,
        carry_gpu,
    )
    db.set_consumed(conn, kind, name, -carry_cpu, -carry_gpu)
    db.insert_consumption_adjustment(
        conn, kind, name, -carry_cpu - cpu_s, -carry_gpu - gpu_ms, REASON_ROLLOVER
    )
    if action == ACTION_CLOSE_PERIOD:
        next_end = int(state["period_end"])  # closed early: the next boundary stays
    else:
        next_end = period_bounds(parse_spec(str(state["spec"])), end, tz)[1]
    if next_end <= end:  # cannot happen; never loop forever
        raise ValueError(f"period {state['spec']} does not advance at {end}")
    db.set_period_state(
        conn, kind, name, str(state["spec"]), end, next_end, None, carry_cpu, carry_gpu
    )
    old = (
        f"{shown_time(start, tz)} .. {shown_time(end, tz)}: used "
        f"{_minutes_text(cpu_s + carry_in_cpu, gpu_ms + carry_in_gpu)}"
    )
    new = (
        f"{shown_time(end, tz)} .. {shown_time(next_end, tz)}: carried over "
        f"{_minutes_text(carry_cpu, carry_gpu)} ({pct} % cap)"
    )
    _journal(conn, actor, action, kind, name, old, new, reason)
    return Event(kind, name, action, f"{old} -> {new}")


def _age_window(conn: Any, kind: str, name: str, state: Any, spec: Spec, now: int) -> Event | None:
    """Take the charges that left the window (ended at or before now - N days) off the totals."""
    cutoff = now - spec.window_days * DAY_S
    aged = int(state["window_aged_until"] or 0)
    if cutoff <= aged:
        return None
    cpu_s, gpu_ms = db.charge_sums_ended_between(conn, kind, name, aged, cutoff)
    db.set_period_state(conn, kind, name, spec.text, cutoff, None, cutoff, 0, 0)
    if not cpu_s and not gpu_ms:
        return None
    cur_cpu, cur_gpu = db.owner_consumed_exact(conn, kind, name)
    # Never below 0: an `adjust` may already have taken some of it off.
    new_cpu = max(0, cur_cpu - cpu_s) if cur_cpu >= 0 else cur_cpu
    new_gpu = max(0, cur_gpu - gpu_ms) if cur_gpu >= 0 else cur_gpu
    db.set_consumed(conn, kind, name, new_cpu, new_gpu)
    db.insert_consumption_adjustment(
        conn, kind, name, new_cpu - cur_cpu, new_gpu - cur_gpu, REASON_WINDOW
    )
    return Event(kind, name, REASON_WINDOW, f"aged out {_minutes_text(cpu_s, gpu_ms)}")


def maintain_owner(
    conn: Any, kind: str, name: str, now: int, actor: str, tz: Any = None
) -> list[Event]:
    """Bring one owner's period up to now: start, roll over (as often as due), age a window,
    or end it when the rule became none. The caller holds the write transaction."""
    if db.get_owner(conn, kind, name) is None:
        if db.period_state(conn, kind, name) is not None:  # the owner was pruned
            db.delete_period_state(conn, kind, name)
        return []
    rule = effective_rule(conn, kind, name)
    state = db.period_state(conn, kind, name)
    events: list[Event] = []
    if rule.spec.kind == NONE:
        if state is not None:
            db.delete_period_state(conn, kind, name)
            _journal(conn, actor, ACTION_PERIOD_END, kind, name, str(state["spec"]), NONE)
            events.append(Event(kind, name, ACTION_PERIOD_END, str(state["spec"])))
        return events
    tz = tz if tz is not None else site_zone(conn)
    if state is None or str(state["spec"]) != rule.spec.text:
        start, end = _start_state(conn, kind, name, rule.spec, now, tz)
        old = "none" if state is None else str(state["spec"])
        new = f"{rule.spec.text}: {shown_time(start, tz)} .. {shown_time(end, tz)}"
        _journal(conn, actor, ACTION_PERIOD_START, kind, name, old, new)
        events.append(Event(kind, name, ACTION_PERIOD_START, new))
        state = db.period_state(conn, kind, name)
    if rule.spec.kind == ROLLING:
        aged = _age_window(conn, kind, name, state, rule.spec, now)
        return events + ([aged] if aged else [])
    for _ in range(MAX_ROLLOVERS):
        if state["period_end"] is None or int(state["period_end"]) > now:
            break
        events.append(
            _close(
                conn,
                kind,
                name,
                state,
                int(state["period_end"]),
                rule,
                actor,
                None,
                ACTION_ROLLOVER,
                tz,
            )
        )
        state = db.period_state(conn, kind, name)
    return events


def after_charge(
    conn: Any, kind: str, name: str, end_time: int, cpu_s: int, gpu_ms: int, tz: Any = None
) -> None:
    """A run just added to an owner's totals that ended before its current period (closed
    calendar period: counted in that period's archive) or before its window: take it back
    off, so it counts where it ended (docs/design.md)."""
    state = db.period_state(conn, kind, name)
    if state is None or not (cpu_s or gpu_ms):
        return
    if state["period_end"] is None:  # rolling
        if end_time > int(state["window_aged_until"] or 0):
            return
    else:
        if end_time >= int(state["period_start"]):
            return
        if not db.add_period_archive_late(conn, kind, name, end_time, cpu_s, gpu_ms):
            return  # ended before any period we archived: it stays in the current one
    cur_cpu, cur_gpu = db.owner_consumed_exact(conn, kind, name)
    db.set_consumed(conn, kind, name, cur_cpu - cpu_s, cur_gpu - gpu_ms)
    reason = REASON_WINDOW if state["period_end"] is None else REASON_CLOSED_PERIOD
    db.insert_consumption_adjustment(conn, kind, name, -cpu_s, -gpu_ms, reason)


def periods_in_use(conn: Any) -> bool:
    """Whether any rule other than none is set or any owner has a period (the fast path)."""
    return db.periods_in_use(conn)


def maintain_all(conn: Any, now: int, actor: str) -> list[Event]:
    """The upkeep of every user and account (reconcile), one short transaction per owner."""
    if not periods_in_use(conn):
        return []
    tz = site_zone(conn)
    events: list[Event] = []
    for kind, name in _due(conn, now):
        with db.write_transaction(conn):
            events.extend(maintain_owner(conn, kind, name, now, actor, tz))
    return events


def _due(conn: Any, now: int) -> list[tuple[str, str]]:
    """The owners the upkeep has something to do for, found by reading only (rules and
    states in bulk; one indexed probe per rolling window): at 10k owners under a site
    default, a run with nothing due opens no write transaction at all."""
    rules = db.period_rules_all(conn)
    site = rules.get(("site", ""))
    states = db.period_states_all(conn)
    due = []
    for owner in db.period_owners(conn):
        rule = rules.get(owner) or site
        spec = parse_spec(rule[0]) if rule else parse_spec(NONE)
        state = states.get(owner)
        if spec.kind == NONE:
            if state is not None:
                due.append(owner)
            continue
        if state is None or state[0] != spec.text:
            due.append(owner)
        elif spec.kind == CALENDAR:
            if state[2] is not None and state[2] <= now:
                due.append(owner)
        else:
            aged = state[3] or 0
            cutoff = now - spec.window_days * DAY_S
            if cutoff > aged and any(db.charge_sums_ended_between(conn, *owner, aged, cutoff)):
                due.append(owner)
    return due


# ---------------------------------------------------------------------------------------
# Admin operations (each in its own transaction, journaled)
# ---------------------------------------------------------------------------------------


def set_rule(
    conn: Any,
    kind: str,
    name: str,
    spec_text: str,
    carry_over_percent: int,
    *,
    time_zone: str | None = None,
    actor: str,
    reason: str | None,
    now: int,
) -> list[Event]:
    """Set the period of a user, an account or (kind 'site') the site default, journaled;
    a named owner's current period starts at once (the site default's at each owner's next
    upkeep). Consumption is not reset by this: the first boundary does that."""
    from slurm_quota.validate import parse_name

    spec = parse_spec(spec_text)
    pct = check_percent(carry_over_percent)
    if spec.kind != CALENDAR and pct:
        raise InvalidInput("A carry-over applies to calendar periods only.")
    if kind == SITE:
        name = ""
        if time_zone is not None:
            zone(time_zone)
    else:
        name = parse_name(kind, name)
        if time_zone is not None:
            raise InvalidInput("The time zone is a site setting: give it with --default.")
        if db.get_owner(conn, kind, name) is None:
            raise NotFound(f"{kind.capitalize()} {name} is not in the ledger; set a quota first.")
    with db.write_transaction(conn):
        old = db.period_rule(conn, kind, name)
        old_text = "default" if old is None else f"{old[0]} carry-over {old[1]} %"
        if kind == SITE and old is not None and old[2]:
            old_text += f" zone {old[2]}"
        zone_value = time_zone if time_zone is not None else (old[2] if old is not None else None)
        db.set_period_rule(conn, kind, name, spec.text, pct, zone_value if kind == SITE else None)
        new_text = f"{spec.text} carry-over {pct} %" + (
            f" zone {zone_value}" if kind == SITE and zone_value else ""
        )
        db.insert_journal(
            conn,
            actor=actor,
            action=ACTION_SET_PERIOD,
            target_kind="setting" if kind == SITE else kind,
            target="period_default" if kind == SITE else name,
            field="period",
            old_value=old_text,
            new_value=new_text,
            reason=reason,
        )
        events = [] if kind == SITE else maintain_owner(conn, kind, name, now, actor)
    return events


def unset_rule(
    conn: Any, kind: str, name: str, *, actor: str, reason: str | None, now: int
) -> list[Event]:
    """Remove an owner's own rule (the site default applies again), journaled."""
    from slurm_quota.validate import parse_name

    name = "" if kind == SITE else parse_name(kind, name)
    with db.write_transaction(conn):
        old = db.period_rule(conn, kind, name)
        if old is None:
            raise NotFound("No period rule of its own is set there; nothing was changed.")
        db.delete_period_rule(conn, kind, name)
        db.insert_journal(
            conn,
            actor=actor,
            action=ACTION_SET_PERIOD,
            target_kind="setting" if kind == SITE else kind,
            target="period_default" if kind == SITE else name,
            field="period",
            old_value=f"{old[0]} carry-over {old[1]} %",
            new_value="default",
            reason=reason,
        )
        events = [] if kind == SITE else maintain_owner(conn, kind, name, now, actor)
    return events


def close_now(
    conn: Any, kind: str, name: str, *, actor: str, reason: str | None, now: int
) -> Event:
    """End an owner's current calendar period now (an allocation renewed early): archive it,
    restart consumption (with its carry-over); the next boundary stays where it was."""
    from slurm_quota.validate import parse_name

    name = parse_name(kind, name)
    with db.write_transaction(conn):
        maintain_owner(conn, kind, name, now, actor)
        state = db.period_state(conn, kind, name)
        if state is None or state["period_end"] is None:
            raise InvalidInput(
                f"{kind.capitalize()} {name} has no calendar period to close (see "
                f"`slurm-quota periods`); nothing was changed."
            )
        if int(state["period_start"]) >= now:
            raise InvalidInput(f"The period of {name} started now; nothing to close.")
        rule = effective_rule(conn, kind, name)
        return _close(
            conn, kind, name, state, now, rule, actor, reason, ACTION_CLOSE_PERIOD, site_zone(conn)
        )


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeriodView:
    """An owner's current period as `periods` and /stats show it."""

    kind: str
    name: str
    spec: str
    own_rule: bool
    carry_over_percent: int
    period_start: int | None
    period_end: int | None
    carry_in_cpu_s: int
    carry_in_gpu_ms: int

    def as_dict(self, tz: Any) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "period": self.spec,
            "own_rule": self.own_rule,
            "carry_over_percent": self.carry_over_percent,
            "period_start": shown_time(self.period_start, tz) if self.period_start else None,
            "period_end": shown_time(self.period_end, tz) if self.period_end else None,
            "carry_in_cpu_minutes": ledger.minutes_from_cpu_s(self.carry_in_cpu_s),
            "carry_in_gpu_minutes": ledger.minutes_from_gpu_ms(self.carry_in_gpu_ms),
        }


def current_periods(conn: Any) -> list[PeriodView]:
    """Every owner with a period (state) or a rule of its own, by kind and name."""
    views = []
    for row in db.period_overview(conn):
        kind, name, state_spec, start, end, cin_cpu, cin_gpu, rule_spec, pct = row
        rule = effective_rule(conn, kind, name)
        views.append(
            PeriodView(
                kind,
                name,
                str(state_spec or rule_spec or rule.spec.text),
                rule.own,
                rule.carry_over_percent,
                None if start is None else int(start),
                None if end is None else int(end),
                int(cin_cpu or 0),
                int(cin_gpu or 0),
            )
        )
    return views


def archive_at(
    conn: Any, at: int, kind: str | None = None, name: str | None = None
) -> list[dict[str, Any]]:
    """The archived periods containing the instant at (optionally of one owner)."""
    tz = site_zone(conn)
    out = []
    for r in db.period_archive_at(conn, at, kind, name):
        used_cpu, used_gpu = int(r["used_cpu_s"]), int(r["used_gpu_ms"])
        out.append(
            {
                "kind": r["owner_kind"],
                "name": r["owner"],
                "period": r["spec"],
                "period_start": shown_time(int(r["period_start"]), tz),
                "period_end": shown_time(int(r["period_end"]), tz),
                "quota_cpu_minutes": int(r["quota_cpu_minutes"]),
                "quota_gpu_minutes": int(r["quota_gpu_minutes"]),
                "used_cpu_minutes": ledger.minutes_from_cpu_s(used_cpu),
                "used_gpu_minutes": ledger.minutes_from_gpu_ms(used_gpu),
                "used_cpu_s": used_cpu,
                "used_gpu_ms": used_gpu,
                "carry_in_cpu_minutes": ledger.minutes_from_cpu_s(int(r["carry_in_cpu_s"])),
                "carry_in_gpu_minutes": ledger.minutes_from_gpu_ms(int(r["carry_in_gpu_ms"])),
                "carry_out_cpu_minutes": ledger.minutes_from_cpu_s(int(r["carry_out_cpu_s"])),
                "carry_out_gpu_minutes": ledger.minutes_from_gpu_ms(int(r["carry_out_gpu_ms"])),
                "late_cpu_s": int(r["late_cpu_s"]),
                "late_gpu_ms": int(r["late_gpu_ms"]),
                "period_start_epoch": int(r["period_start"]),
                "period_end_epoch": int(r["period_end"]),
            }
        )
    return out


def now_s() -> int:
    """The current time in epoch seconds (one place, so tests can pass their own)."""
    return int(datetime.now(timezone.utc).timestamp())
