"""Allocation periods: the arithmetic (zones, month ends, leap years, DST), the carry-over cap,
rollovers and rolling windows on a real migrated ledger, and what `check` says afterwards."""

from __future__ import annotations

from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from slurm_quota import admin, check, db, periods
from slurm_quota import charge as C
from slurm_quota.errors import InvalidInput

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
UTC = ZoneInfo("UTC")


def at(text: str, tz=UTC) -> int:
    """Epoch seconds of a local time 'YYYY-MM-DD HH:MM' in tz."""
    return int(datetime.fromisoformat(text).replace(tzinfo=tz).timestamp())


def bounds(spec: str, when: str, tz=UTC) -> tuple[str, str]:
    start, end = periods.period_bounds(periods.parse_spec(spec), at(when, tz), tz)
    fmt = "%Y-%m-%d %H:%M"
    return (
        datetime.fromtimestamp(start, tz).strftime(fmt),
        datetime.fromtimestamp(end, tz).strftime(fmt),
    )


# ---------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["", "monthly", "rolling:0", "rolling:99999", "2027-02-30+1y", "2027-01-01+0m",
     "2027-01-01+1x", "2027-1-1+1y", "rolling:٣"],
)  # fmt: skip
def test_bad_period_specs_are_refused_with_a_message(text):
    with pytest.raises(InvalidInput):
        periods.parse_spec(text)


def test_spec_lengths_are_normalised():
    assert periods.parse_spec("2027-01-01+1Y").length == 12
    assert periods.parse_spec("2026-12-07+2w") == periods.Spec(
        "2026-12-07+2w", periods.CALENDAR, "d", 14, datetime(2026, 12, 7).date()
    )
    assert periods.parse_spec(" Rolling:30 ").window_days == 30


def test_month_boundaries_are_local_midnights():
    assert bounds("month", "2026-12-31 23:59", BERLIN) == ("2026-12-01 00:00", "2027-01-01 00:00")
    assert bounds("month", "2027-01-01 00:00", BERLIN) == ("2027-01-01 00:00", "2027-02-01 00:00")


def test_a_dst_month_is_an_hour_short_or_long():
    start, end = periods.period_bounds(periods.parse_spec("month"), at("2027-03-15 12:00"), BERLIN)
    assert end - start == 31 * 86400 - 3600  # clocks go forward on 2027-03-28
    start, end = periods.period_bounds(
        periods.parse_spec("month"), at("2026-11-15 12:00"), NEW_YORK
    )
    assert end - start == 30 * 86400 + 3600  # 2026-11-01: back an hour
    assert datetime.fromtimestamp(end, NEW_YORK).hour == 0


def test_the_same_instant_is_in_different_months_in_different_zones():
    instant = at("2026-12-31 23:30", UTC)  # already 2027 in Berlin
    spec = periods.parse_spec("month")
    assert periods.period_bounds(spec, instant, UTC)[0] == at("2026-12-01 00:00", UTC)
    assert periods.period_bounds(spec, instant, BERLIN)[0] == at("2027-01-01 00:00", BERLIN)


def test_quarter_and_year():
    assert bounds("quarter", "2027-05-17 08:00") == ("2027-04-01 00:00", "2027-07-01 00:00")
    assert bounds("year", "2028-02-29 12:00") == ("2028-01-01 00:00", "2029-01-01 00:00")


def test_month_end_anchor_clamps_without_drifting():
    # A monthly allocation starting on the 31st: Feb ends at its last day, March is back on
    # the 31st (anchored, not chained from the clamped February date).
    assert bounds("2027-01-31+1m", "2027-02-15 00:00") == ("2027-01-31 00:00", "2027-02-28 00:00")
    assert bounds("2027-01-31+1m", "2027-03-01 00:00") == ("2027-02-28 00:00", "2027-03-31 00:00")
    assert bounds("2028-01-31+1m", "2028-02-29 10:00") == ("2028-02-29 00:00", "2028-03-31 00:00")


def test_leap_day_anchor_yearly():
    assert bounds("2028-02-29+1y", "2029-06-01 00:00") == ("2029-02-28 00:00", "2030-02-28 00:00")
    assert bounds("2028-02-29+1y", "2032-03-01 00:00") == ("2032-02-29 00:00", "2033-02-28 00:00")


def test_periods_before_the_anchor_repeat_backwards():
    assert bounds("2026-09-01+6m", "2026-05-01 00:00") == ("2026-03-01 00:00", "2026-09-01 00:00")
    assert bounds("2026-12-07+2w", "2026-12-06 23:59") == ("2026-11-23 00:00", "2026-12-07 00:00")


@pytest.mark.parametrize(
    ("quota", "used_min", "percent", "carry_min"),
    [(1000, 500, 10, 100), (1000, 950, 10, 50), (1000, 1200, 10, 0), (-1, 0, 10, 0),
     (1000, 0, 0, 0), (1000, 0, 100, 1000), (0, 0, 50, 0)],
)  # fmt: skip
def test_carry_over_is_the_unused_quota_capped_at_the_percentage(
    quota, used_min, percent, carry_min
):
    assert periods.carry_over(quota, used_min * 60, 60, percent) == carry_min * 60


def test_carry_over_cap_is_exact_on_gpu_milliseconds():
    assert periods.carry_over(7, 0, 60000, 33) == 7 * 60000 * 33 // 100  # 138,600 ms


# ---------------------------------------------------------------------------------------
# The ledger
# ---------------------------------------------------------------------------------------


def charge_run(conn, job_id: int, end: int, elapsed: int, cpus: int = 1, user="alice",
               account="physics") -> C.ChargeResult:  # fmt: skip
    run = C.Run(job_id=job_id, start_time=end - elapsed, end_time=end, cpus=cpus,
                username=user, account=account, job_state="COMPLETED")  # fmt: skip
    return C.apply_charge(conn, run, C.Allocation(None), "test")


def consumed(conn, kind: str, name: str) -> int:
    return db.owner_consumed_exact(conn, kind, name)[0]


def balanced(conn) -> bool:
    report = check.check(conn)
    return not report.consumed and report.ok


@pytest.fixture
def physics(conn, monkeypatch):
    """alice in physics: account quota 1000 CPU min, user unlimited; site zone UTC."""
    monkeypatch.setattr(periods, "now_s", lambda: at("2026-12-10 12:00"))
    admin.set_quota(conn, "account", "physics", "cpu", 1000)
    admin.set_quota(conn, "user", "alice", "cpu", -1)
    periods.set_rule(conn, "site", "", "none", 0, time_zone="UTC", actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    return conn


def test_setting_a_period_starts_it_without_resetting(physics):
    charge_run(physics, 1, at("2026-12-05 10:00"), 600 * 60)  # 600 CPU min
    events = periods.set_rule(physics, "account", "physics", "month", 10, actor="t",
                              reason="grant", now=at("2026-12-10 12:00"))  # fmt: skip
    assert [e.action for e in events] == ["period-start"]
    assert consumed(physics, "account", "physics") == 600 * 60
    state = db.period_state(physics, "account", "physics")
    assert (state["period_start"], state["period_end"]) == (
        at("2026-12-01 00:00"), at("2027-01-01 00:00"),
    )  # fmt: skip
    actions = [r["action"] for r in db.read_journal(physics, target="physics",
                                                   target_kind="account", limit=5)]  # fmt: skip
    assert actions[:2] == ["period-start", "set-period"]


def test_rollover_archives_restarts_at_minus_the_capped_carry_and_balances(physics):
    charge_run(physics, 1, at("2026-12-05 10:00"), 600 * 60)
    periods.set_rule(physics, "account", "physics", "month", 10, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    with db.write_transaction(physics):
        events = periods.maintain_owner(physics, "account", "physics", at("2027-01-01 00:00"), "t")
    assert [e.action for e in events] == ["period-rollover"]
    # unused 400 min, cap 10 % of 1000 = 100 min
    assert consumed(physics, "account", "physics") == -100 * 60
    row = db.get_owner(physics, "account", "physics")
    assert row["total_consumed_cpu_minutes"] == -100
    (archived,) = periods.archive_at(physics, at("2026-12-20 00:00"), "account", "physics")
    assert (archived["used_cpu_minutes"], archived["carry_out_cpu_minutes"]) == (600, 100)
    assert balanced(physics)
    # the plugin's view: 1000 - (-100) = 1100 minutes available
    stats_row = db.stats_accounts(physics, "physics")[0]
    assert 1000 - stats_row[1] - stats_row[2] == 1100


def test_rollover_is_idempotent(physics):
    periods.set_rule(physics, "account", "physics", "month", 0, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    charge_run(physics, 1, at("2026-12-11 10:00"), 60)
    for _ in range(3):
        periods.maintain_all(physics, at("2027-01-02 00:00"), "t")
    assert physics.execute("SELECT COUNT(*) FROM period_archive").fetchone()[0] == 1
    assert consumed(physics, "account", "physics") == 0
    assert balanced(physics)


def test_missed_periods_each_get_an_archive_row_and_the_carry_does_not_stack(physics):
    periods.set_rule(physics, "account", "physics", "month", 50, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    periods.maintain_all(physics, at("2027-03-15 00:00"), "t")
    rows = physics.execute(
        "SELECT period_start, carry_in_cpu_s, carry_out_cpu_s FROM period_archive "
        "ORDER BY period_start"
    ).fetchall()
    assert [tuple(r) for r in rows] == [
        (at("2026-12-01 00:00"), 0, 500 * 60),
        (at("2027-01-01 00:00"), 500 * 60, 500 * 60),  # unused 1500 min, capped at 500
        (at("2027-02-01 00:00"), 500 * 60, 500 * 60),
    ]
    assert consumed(physics, "account", "physics") == -500 * 60
    assert balanced(physics)


def test_a_run_ending_after_the_boundary_is_charged_in_the_new_period(physics, monkeypatch):
    periods.set_rule(physics, "account", "physics", "month", 0, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    charge_run(physics, 1, at("2026-12-20 00:00"), 100 * 60)
    # no upkeep ran at the boundary: the charge path rolls over first
    monkeypatch.setattr(periods, "now_s", lambda: at("2027-01-01 02:00"))
    charge_run(physics, 2, at("2027-01-01 01:00"), 3 * 3600)  # started in December
    assert consumed(physics, "account", "physics") == 3 * 3600
    (archived,) = periods.archive_at(physics, at("2026-12-20 00:00"), "account", "physics")
    assert archived["used_cpu_s"] == 100 * 60
    assert balanced(physics)


def test_a_run_charged_late_counts_in_the_closed_period_it_ended_in(physics, monkeypatch):
    periods.set_rule(physics, "account", "physics", "month", 10, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    periods.maintain_all(physics, at("2027-01-01 00:05"), "t")
    before = consumed(physics, "account", "physics")
    monkeypatch.setattr(periods, "now_s", lambda: at("2027-01-01 06:00"))
    charge_run(physics, 7, at("2026-12-31 23:00"), 7200)  # reconcile, the next morning
    assert consumed(physics, "account", "physics") == before
    (archived,) = periods.archive_at(physics, at("2026-12-31 23:00"), "account", "physics")
    assert (archived["used_cpu_s"], archived["late_cpu_s"]) == (7200, 7200)
    assert balanced(physics)
    reasons = [r[0] for r in physics.execute(
        "SELECT reason FROM consumption_adjustments WHERE owner = 'physics' ORDER BY id")]
    assert reasons[-1] == "closed-period"


def test_a_rolling_window_slides_across_a_month_boundary(physics, monkeypatch):
    periods.set_rule(physics, "account", "physics", "rolling:10", 0, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    monkeypatch.setattr(periods, "now_s", lambda: at("2026-12-31 00:00"))
    charge_run(physics, 1, at("2026-12-25 00:00"), 3600)
    charge_run(physics, 2, at("2027-01-02 00:00"), 1800)
    assert consumed(physics, "account", "physics") == 5400
    periods.maintain_all(physics, at("2027-01-03 23:59"), "t")  # both within 10 days
    assert consumed(physics, "account", "physics") == 5400
    periods.maintain_all(physics, at("2027-01-04 00:00"), "t")  # 12-25 leaves the window
    assert consumed(physics, "account", "physics") == 1800
    periods.maintain_all(physics, at("2027-01-04 00:00"), "t")  # idempotent
    assert consumed(physics, "account", "physics") == 1800
    periods.maintain_all(physics, at("2027-01-12 00:00"), "t")
    assert consumed(physics, "account", "physics") == 0
    assert balanced(physics)


def test_a_rolling_window_set_later_drops_older_charges_at_once(physics):
    charge_run(physics, 1, at("2026-10-01 00:00"), 3600)
    charge_run(physics, 2, at("2026-12-09 00:00"), 60)
    periods.set_rule(physics, "account", "physics", "rolling:30", 0, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    assert consumed(physics, "account", "physics") == 60
    assert balanced(physics)


def test_the_site_default_applies_to_owners_without_a_rule(physics):
    periods.set_rule(physics, "site", "", "quarter", 0, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    charge_run(physics, 1, at("2026-12-10 11:00"), 60)
    periods.maintain_all(physics, at("2027-01-01 00:00"), "t")
    archived = periods.archive_at(physics, at("2026-11-01 00:00"))
    assert sorted((r["kind"], r["name"]) for r in archived) == [
        ("account", "physics"), ("user", "alice"),
    ]  # fmt: skip
    assert consumed(physics, "user", "alice") == 0


def test_back_to_none_ends_the_period_and_keeps_consumption(physics):
    periods.set_rule(physics, "account", "physics", "month", 0, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    charge_run(physics, 1, at("2026-12-10 11:00"), 60)
    events = periods.set_rule(physics, "account", "physics", "none", 0, actor="t",
                              reason=None, now=at("2026-12-11 00:00"))  # fmt: skip
    assert [e.action for e in events] == ["period-end"]
    assert db.period_state(physics, "account", "physics") is None
    assert consumed(physics, "account", "physics") == 60


def test_close_now_archives_and_keeps_the_next_boundary(physics):
    periods.set_rule(physics, "account", "physics", "year", 10, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    charge_run(physics, 1, at("2026-12-10 11:00"), 990 * 60)
    periods.close_now(physics, "account", "physics", actor="t", reason="early",
                      now=at("2026-12-10 12:00"))  # fmt: skip
    state = db.period_state(physics, "account", "physics")
    assert (state["period_start"], state["period_end"]) == (
        at("2026-12-10 12:00"), at("2027-01-01 00:00"),
    )  # fmt: skip
    assert consumed(physics, "account", "physics") == -10 * 60  # unused 10 min carried
    journal = db.read_journal(physics, target_kind="account", target="physics", limit=1)[0]
    assert (journal["action"], journal["reason"]) == ("close-period", "early")
    assert balanced(physics)


def test_carry_over_needs_a_calendar_period_and_a_known_owner(physics):
    with pytest.raises(InvalidInput):
        periods.set_rule(physics, "account", "physics", "rolling:7", 10, actor="t",
                         reason=None, now=0)  # fmt: skip
    with pytest.raises(InvalidInput):
        periods.set_rule(physics, "site", "", "month", 0, time_zone="Mars/Base", actor="t",
                         reason=None, now=0)  # fmt: skip
    assert db.period_rule(physics, "account", "physics") is None


def test_no_period_costs_the_charge_one_probe(conn):
    assert not db.periods_in_use(conn)
    assert charge_run(conn, 1, at("2026-12-10 11:00"), 60).charged
    assert conn.execute("SELECT COUNT(*) FROM period_state").fetchone()[0] == 0


def test_now_is_utc_epoch():
    assert abs(periods.now_s() - datetime.now(timezone.utc).timestamp()) < 5


def test_adjust_keeps_a_carried_over_credit(physics):
    periods.set_rule(physics, "account", "physics", "month", 10, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    periods.maintain_all(physics, at("2027-01-01 00:00"), "t")
    assert consumed(physics, "account", "physics") == -100 * 60
    change = admin.adjust(physics, "account", "physics", "cpu", 30)
    assert (change.old_minutes, change.new_minutes, change.clamped) == (-100, -70, False)
    change = admin.adjust(physics, "account", "physics", "cpu", -50)
    assert (change.new_minutes, change.clamped) == (-70, True)  # never below the credit
    assert balanced(physics)


def test_an_upkeep_with_nothing_due_writes_nothing(physics):
    periods.set_rule(physics, "site", "", "month", 0, time_zone="UTC", actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    periods.set_rule(physics, "account", "physics", "rolling:7", 0, actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    charge_run(physics, 1, at("2026-12-10 11:00"), 60)
    periods.maintain_all(physics, at("2026-12-10 12:00"), "t")  # alice's month starts
    before = physics.total_changes
    assert periods.maintain_all(physics, at("2026-12-15 12:00"), "t") == []
    assert physics.total_changes == before
    events = periods.maintain_all(physics, at("2026-12-17 12:00"), "t")  # the run ages out
    assert [(e.name, e.action) for e in events] == [("physics", "window")]


def test_two_upkeeps_at_once_roll_each_owner_over_once(db_path, conn):
    import subprocess
    import sys

    periods.set_rule(conn, "site", "", "month", 10, time_zone="UTC", actor="t", reason=None,
                     now=at("2026-12-10 12:00"))  # fmt: skip
    for i in range(150):
        admin.set_quota(conn, "user", f"u{i}", "cpu", 1000)
        charge_run(conn, i + 1, at("2026-12-10 11:00"), 60 * i, user=f"u{i}", account="acct")
    periods.maintain_all(conn, at("2026-12-10 12:00"), "t")
    code = (
        "import sys; from slurm_quota import db, periods; "
        "c = db.connect(sys.argv[1]); "
        f"print(len(periods.maintain_all(c, {at('2027-01-01 00:10')}, 'p')))"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(db_path)], stdout=subprocess.PIPE,
                              text=True) for _ in range(2)]  # fmt: skip
    counts = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert sum(counts) == 151  # 150 users and the account, each by one of the two
    rows = conn.execute(
        "SELECT owner_kind, owner, COUNT(*) FROM period_archive GROUP BY owner_kind, owner "
        "HAVING COUNT(*) > 1"
    ).fetchall()
    assert rows == []
    # every user used under 90 % of 1000: the 10 % cap (100 min) is carried; the account
    # has no quota (unlimited): nothing to carry, it restarts at 0
    assert {consumed(conn, "user", f"u{i}") for i in range(150)} == {-100 * 60}
    assert consumed(conn, "account", "acct") == 0
    assert balanced(conn)
