"""The period commands through the real CLI entry point, and /stats?period= over HTTP."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from slurm_quota import charge as C
from slurm_quota import db, periods
from tests.unit.cli_helpers import run_cli, snapshot
from tests.unit.test_periods import at


@pytest.fixture
def ledger(db_path, capsys, monkeypatch):
    """physics (1000 CPU min) with 600 min charged in 2026-11; the CLI's clock at 2026-12-02."""
    monkeypatch.setattr(periods, "now_s", lambda: at("2026-11-20 00:00"))
    assert run_cli(capsys, db_path, "account-quota", "physics", "1000").code == 0
    assert run_cli(capsys, db_path, "set-period", "--default", "none", "--time-zone",
                   "UTC").code == 0  # fmt: skip
    r = run_cli(capsys, db_path, "set-period", "--account", "physics", "month",
                "--carry-over", "10", "--reason", "monthly course share")  # fmt: skip
    assert r.code == 0, r.err
    conn = db.connect(db_path)
    run = C.Run(job_id=1, start_time=at("2026-11-19 00:00"), end_time=at("2026-11-19 10:00"),
                cpus=1, username="alice", account="physics", job_state="COMPLETED")  # fmt: skip
    C.apply_charge(conn, run, C.Allocation(None), "test")
    conn.close()
    monkeypatch.setattr(periods, "now_s", lambda: at("2026-12-02 00:00"))
    return db_path


def test_set_period_prints_the_period_and_journals_it(ledger, capsys):
    r = run_cli(capsys, ledger, "history", "--account", "physics", "--json")
    actions = [e["action"] for e in json.loads(r.out) if e["kind"] == "journal"]
    assert actions[:2] == ["period-start", "set-period"]


@pytest.mark.parametrize(
    "args",
    [("set-period", "--account", "physics", "fortnightly"),
     ("set-period", "--account", "physics", "month", "--carry-over", "101"),
     ("set-period", "--user", "alice", "--account", "physics", "month"),
     ("set-period", "--account", "nosuch", "month"),
     ("set-period", "--default", "month", "--time-zone", "Nowhere/Town"),
     ("close-period", "--user", "bob")],
)  # fmt: skip
def test_bad_period_input_is_refused_and_changes_nothing(ledger, capsys, args):
    before = snapshot(ledger)
    r = run_cli(capsys, ledger, *args)
    assert r.code in (1, 2)
    assert "Traceback" not in r.err and r.err.strip()
    assert snapshot(ledger) == before


def test_reconcile_timer_work_rolls_over_and_history_shows_the_closed_period(ledger, capsys):
    conn = db.connect(ledger)
    periods.maintain_all(conn, at("2026-12-02 00:00"), "test")
    conn.close()
    r = run_cli(capsys, ledger, "history", "--account", "physics", "--period", "2026-11-15")
    assert r.code == 0, r.err
    assert "used 600 of 1000 CPU min" in r.out and "out 100 CPU min" in r.out
    assert "charge job 1" in r.out
    r = run_cli(capsys, ledger, "periods", "--at", "2026-11-15", "--json")
    (row,) = json.loads(r.out)
    assert (row["name"], row["used_cpu_minutes"], row["carry_out_cpu_minutes"]) == (
        "physics", 600, 100,
    )  # fmt: skip
    r = run_cli(capsys, ledger, "periods", "--json")
    (owner,) = json.loads(r.out)["owners"]
    assert (owner["period_start"], owner["carry_in_cpu_minutes"]) == ("2026-12-01T00:00+00:00", 100)
    r = run_cli(capsys, ledger, "stats", "--account", "physics", "--json")
    (acct,) = json.loads(r.out)["accounts"]
    assert (acct["total_consumed_cpu_minutes"], acct["available_cpu_minutes"]) == (-100, 1100)


def test_close_period_now_from_the_cli(ledger, capsys):
    r = run_cli(capsys, ledger, "close-period", "--account", "physics", "--reason", "renewed")
    assert r.code == 0, r.err
    r = run_cli(capsys, ledger, "check")
    assert r.code == 0, r.out


def test_stats_for_a_past_period_over_http(ledger):
    from tests.web.readside import server_thread

    conn = db.connect(ledger)
    periods.maintain_all(conn, at("2026-12-02 00:00"), "test")
    conn.close()
    with server_thread(ledger) as url:
        with urllib.request.urlopen(f"{url}/stats?period=2026-11-30&account=physics") as resp:
            payload = json.load(resp)
        with urllib.request.urlopen(f"{url}/stats?account=physics") as resp:
            now = json.load(resp)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{url}/stats?period=yesterday")
    (row,) = payload["accounts"]
    assert (row["total_consumed_cpu_minutes"], row["quota_cpu_minutes"]) == (600, 1000)
    assert row["period_start"] == "2026-11-01T00:00+00:00"
    assert "period" not in now["accounts"][0]  # the seed's answer is unchanged
    assert err.value.code == 400
