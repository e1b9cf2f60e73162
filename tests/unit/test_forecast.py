"""Forecasts on synthetic charges: burn rate, exhaustion date, reservations, periods,
and where they show (`stats --forecast`, /stats?forecast=1, /metrics)."""

from __future__ import annotations

import json

import pytest

from slurm_quota import admin, db, forecast, metrics, periods, stats
from slurm_quota import charge as C
from tests.unit.cli_helpers import run_cli
from tests.unit.test_periods import at

DAY = 86400


def test_exhaustion_arithmetic():
    assert forecast.exhaustion(0, 1.0, 100) == 100  # nothing left: now
    assert forecast.exhaustion(-5, 1.0, 100) == 100
    assert forecast.exhaustion(3600, 0.0, 100) is None  # no burn: never at this pace
    assert forecast.exhaustion(3600, 2.0, 100) == 1900


def test_owner_forecast_counts_reservations_as_spent_and_projects_to_the_period_end():
    now = at("2026-12-11 00:00")
    f = forecast.owner_forecast(
        "account", "physics", "cpu", quota_minutes=10_000, consumed_minutes=4_000,
        reserved_minutes=1_000, burnt_exact=14 * 100 * 60, window_s=14 * DAY, now=now,
        period=(at("2026-12-01 00:00"), at("2027-01-01 00:00")),
    )  # fmt: skip
    assert f.burn_minutes_per_day == pytest.approx(100.0)
    assert f.left_minutes == 5_000
    assert f.exhaust_at == now + 50 * DAY  # 5,000 min at 100/day
    assert f.exhausts_in_period is False
    assert f.period_elapsed_percent == pytest.approx(10 / 31 * 100, abs=0.01)
    # 4,000 + 1,000 + 21 days x 100 = 7,100 of 10,000
    assert f.projected_percent_at_period_end == pytest.approx(71.0)


def test_unlimited_quota_has_no_date_but_a_burn():
    f = forecast.owner_forecast(
        "user", "alice", "gpu", quota_minutes=-1, consumed_minutes=5, reserved_minutes=0,
        burnt_exact=7 * 60000, window_s=7 * DAY, now=0,
    )  # fmt: skip
    assert (f.exhaust_at, f.left_minutes, f.burn_minutes_per_day) == (None, None, 1.0)


@pytest.fixture
def busy(conn, monkeypatch):
    """alice/physics: 20 days of charges, 2 CPU-hours a day ending at noon each day."""
    now = at("2026-12-21 00:00")
    monkeypatch.setattr(periods, "now_s", lambda: now)
    admin.set_quota(conn, "account", "physics", "cpu", 6000)
    admin.set_quota(conn, "user", "alice", "gpu", 600)
    for day in range(20):
        end = at("2026-12-01 12:00") + day * DAY
        run = C.Run(job_id=100 + day, start_time=end - 3600, end_time=end, cpus=2,
                    username="alice", account="physics", job_state="COMPLETED")  # fmt: skip
        C.apply_charge(conn, run, C.Allocation(None), "test")
    return conn, now


def test_forecast_from_synthetic_charges(busy):
    conn, now = busy
    payload = stats.stats_payload(conn, account="physics")
    (cpu, gpu) = forecast.forecasts(conn, payload, now)
    # window 14 days: 14 runs of 120 CPU-min -> 120/day; left 6000 - 2400 = 3600 -> 30 days
    assert cpu.burn_minutes_per_day == pytest.approx(120.0)
    assert cpu.exhaust_at == now + 30 * DAY
    assert gpu.exhaust_at is None and gpu.burn_minutes_per_day == 0


def test_a_ledger_younger_than_the_window_is_not_diluted(busy):
    conn, _ = busy
    now = at("2026-12-06 00:00")  # 5 days of charges behind (Dec 1..5)
    payload = stats.stats_payload(conn, account="physics")
    cpu = forecast.forecasts(conn, payload, now)[0]
    # 5 runs ended by then, over the 4.5 days since the first one ended (not 14 days)
    assert cpu.burn_minutes_per_day == pytest.approx(5 * 120 / 4.5, rel=1e-6)


def test_stats_forecast_cli_and_json(busy, db_path, capsys, monkeypatch):
    conn, now = busy
    monkeypatch.setattr("time.time", lambda: float(now))
    r = run_cli(capsys, db_path, "stats", "--account", "physics", "--forecast", "--json")
    assert r.code == 0, r.err
    payload = json.loads(r.out)
    assert "forecasts" in payload and payload["accounts"][0]["quota_cpu_minutes"] == 6000
    (cpu,) = [f for f in payload["forecasts"] if f["resource"] == "cpu"]
    assert cpu["exhaust_at"] == now + 30 * DAY
    r = run_cli(capsys, db_path, "stats", "--account", "physics", "--forecast", "--color",
                "never")  # fmt: skip
    assert r.code == 0, r.err
    assert "RUNS OUT" in r.out and "2027-01-20" in r.out and "120" in r.out


def test_stats_forecast_over_http_adds_a_key_only_when_asked(busy, db_path):
    import urllib.request

    from tests.web.readside import server_thread

    with server_thread(db_path) as url:
        with urllib.request.urlopen(f"{url}/stats?username=alice&forecast=1") as resp:
            with_fc = json.load(resp)
        with urllib.request.urlopen(f"{url}/stats?username=alice") as resp:
            plain = json.load(resp)
    assert set(plain) == {"users", "accounts"}
    assert {(f["kind"], f["resource"]) for f in with_fc["forecasts"]} == {
        ("user", "cpu"), ("user", "gpu"), ("account", "cpu"), ("account", "gpu"),
    }  # fmt: skip
    assert with_fc["users"] == plain["users"]


def test_metrics_carry_the_burn_and_the_exhaustion_date(busy):
    conn, _ = busy
    text = metrics.metrics_text(conn)
    assert 'slurm_quota_account_burn_minutes_per_day{account="physics",resource="cpu"}' in text
    assert 'slurm_quota_user_exhaustion_timestamp_seconds{username="alice",resource="cpu"} +Inf' \
        in text  # fmt: skip
    assert db.first_charge_end(conn) == at("2026-12-01 12:00")
