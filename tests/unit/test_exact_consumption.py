"""Exact consumption (migration 0005): CPU-seconds and GPU-milliseconds, minutes by one rule.

No run is free any more: the totals add cpus × elapsed and count × factor × elapsed per run
without rounding per run; the seed's minute columns are ceil(exact / 60 s).
"""

from __future__ import annotations

import math
import sqlite3

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slurm_quota import charge as C
from slurm_quota import check, db, ledger
from tests.unit.cli_helpers import run_cli
from tests.unit.fixtures_seed import SEED_ROWS, make_seed_db

START = 1_795_000_000


def run(i: int, elapsed_s: int, *, cpus: int = 1, user="alice", account="research") -> C.Run:
    start = START + 100 * i
    return C.Run(job_id=1000 + i, start_time=start, end_time=start + elapsed_s, cpus=cpus,
                 username=user, account=account, job_state="COMPLETED")  # fmt: skip


@pytest.fixture
def conn(any_conn):
    """The tests on `conn` run on both engines: SQLite and MariaDB (tests/conftest.py)."""
    return any_conn


@pytest.fixture(scope="module")
def mariadb_rule_conn(mariadb_server):
    """A connection to a MariaDB database, for SQL that reads no table."""
    from slurm_quota import mariadb

    ledger = mariadb_server.new_database()
    conn = mariadb.connect(ledger)
    yield conn
    conn.close()
    mariadb_server.drop_database(ledger)


def owner(conn, kind: str, name: str) -> tuple:
    table, key = ("users", "username") if kind == "user" else ("accounts", "account")
    sql = (
        f"SELECT consumed_cpu_s, consumed_gpu_ms, total_consumed_cpu_minutes, "
        f"total_consumed_gpu_minutes FROM {table} WHERE {key} = ?"
    )
    return tuple(conn.execute(sql, (name,)).fetchone())


@given(st.integers(min_value=-(10**15), max_value=10**16), st.sampled_from([60, 60000]))
def test_minutes_are_the_ceiling_of_the_exact_total(exact, per_minute):
    minutes = ledger.minutes_from_exact(exact, per_minute)
    assert 0 <= minutes * per_minute - exact < per_minute  # the least whole minute ≥ exact
    if abs(exact) < 2**52:
        assert minutes == math.ceil(exact / per_minute)


@given(st.integers(min_value=-(10**12), max_value=10**15), st.sampled_from([60, 60000]))
def test_the_sql_form_of_the_rule_agrees_with_ledger(exact, per_minute):
    conn = sqlite3.connect(":memory:")
    sql = f"SELECT {db._minutes_sql(':x', per_minute)}"
    (got,) = conn.execute(sql, {"x": exact}).fetchone()
    assert got == ledger.minutes_from_exact(exact, per_minute)


@pytest.mark.mariadb
@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-(10**12), max_value=10**15), st.sampled_from([60, 60000]))
def test_the_mariadb_form_of_the_rule_agrees_with_ledger(mariadb_rule_conn, exact, per_minute):
    sql = f"SELECT {db._minutes_sql(':x', per_minute, mariadb_rule_conn)}"
    (got,) = mariadb_rule_conn.execute(sql, {"x": exact}).fetchone()
    assert got == ledger.minutes_from_exact(exact, per_minute)


def test_a_fractional_factor_is_kept_to_the_millisecond():
    assert ledger.gpu_ms_charged({"a100": 1}, {"a100": 0.75}, 7) == 5250
    assert ledger.gpu_ms_charged({"a100": 3}, {"a100": 0.1}, 1) == 300  # 0.1 as typed, exact
    assert ledger.gpu_ms_charged({"x": 1}, {"x": 0.0007}, 1) == 1  # 0.7 ms rounds half up
    assert ledger.gpu_ms_charged({}, {}, 50) == 0


def test_twenty_short_runs_are_charged_their_cpu_seconds(conn):
    # The issue: an array of 20 one-CPU jobs of about 8 s was charged 0 CPU-minutes.
    for i in range(20):
        C.apply_charge(conn, run(i, 8), C.Allocation(None), "test")
    assert owner(conn, "user", "alice") == (160, 0, 3, 0)
    assert owner(conn, "account", "research") == (160, 0, 3, 0)
    assert conn.execute("SELECT SUM(cpu_s) FROM charges").fetchone()[0] == 160


def test_two_hundred_one_second_runs_cost_two_hundred_cpu_seconds(conn):
    for i in range(200):
        C.apply_charge(conn, run(i, 1), C.Allocation(None), "test")
    assert owner(conn, "user", "alice")[:3] == (200, 0, 4)


def test_gpu_runs_with_a_fractional_factor_add_their_exact_milliseconds(conn):
    conn.execute("INSERT INTO gpu_factors (gpu_type, factor) VALUES ('a100', 0.75)")
    for i in range(20):
        C.apply_charge(conn, run(i, 8), C.Allocation(None, {"a100": 1}), "test")
    # 20 × 1 × 0.75 × 8 s = 120 GPU-seconds = exactly 2 GPU-minutes
    assert owner(conn, "user", "alice") == (160, 120_000, 3, 2)
    row = conn.execute("SELECT cpu_s, gpu_ms, gpu_factors FROM charges LIMIT 1").fetchone()
    assert tuple(row) == (8, 6000, "a100=0.75")


def test_a_charge_is_still_idempotent_on_the_exact_totals(conn):
    for _ in range(3):
        C.apply_charge(conn, run(1, 7, cpus=3), C.Allocation(None), "test")
    assert owner(conn, "user", "alice") == (21, 0, 1, 0)


def test_adjust_moves_the_exact_total_by_whole_minutes_and_is_recorded(db_path, capsys):
    conn = db.connect(db_path)
    C.apply_charge(conn, run(1, 90), C.Allocation(None), "test")  # 90 s: shown as 2 minutes
    conn.close()
    out = run_cli(capsys, db_path, "adjust", "--user", "alice", "--cpu", "--minutes=-1")
    assert out.code == 0, out.err
    conn = db.connect(db_path)
    assert owner(conn, "user", "alice") == (30, 0, 1, 0)
    out = run_cli(capsys, db_path, "adjust", "--user", "alice", "--cpu", "--minutes=-5")
    assert out.code == 0, out.err
    assert owner(conn, "user", "alice") == (0, 0, 0, 0)  # clamped at 0
    adjustments = conn.execute(
        "SELECT owner_kind, owner, cpu_s, gpu_ms, reason FROM consumption_adjustments ORDER BY id"
    ).fetchall()
    assert [tuple(a) for a in adjustments] == [
        ("user", "alice", -60, 0, "adjust"), ("user", "alice", -30, 0, "adjust")]  # fmt: skip
    journal = conn.execute("SELECT old_value, new_value FROM journal ORDER BY id").fetchall()
    assert [tuple(j) for j in journal] == [("2", "1"), ("1", "0")]
    assert check.check(conn).ok
    conn.close()


def test_check_finds_an_exact_total_edited_by_hand_and_repairs_it(db_path):
    conn = db.connect(db_path)
    for i in range(3):
        C.apply_charge(conn, run(i, 10), C.Allocation(None), "test")
    conn.execute("UPDATE users SET consumed_cpu_s = 5")
    found = check.check(conn)
    assert not found.ok
    assert [(d.kind, d.name, d.stored, d.actual) for d in found.consumed] == [
        ("user", "alice", (5, 0, 1, 0), (30, 0, 1, 0))]  # fmt: skip
    fixed = check.check(conn, repair=True)
    assert fixed.repaired and fixed.ok
    assert owner(conn, "user", "alice") == (30, 0, 1, 0)
    assert check.check(conn).ok and not check.check(conn).consumed
    (action,) = conn.execute("SELECT action FROM journal").fetchone()
    assert action == check.ACTION_REPAIR_CONSUMED
    conn.close()


def test_a_seed_style_write_of_the_minutes_moves_the_exact_total_and_stays_checkable(conn):
    C.apply_charge(conn, run(1, 61), C.Allocation(None), "test")  # 61 s: 2 minutes
    # the seed's charge or adjust, or an admin at the sqlite3 prompt, writes minutes only
    conn.execute("UPDATE users SET total_consumed_cpu_minutes = total_consumed_cpu_minutes + 5, "
                 "total_consumed_gpu_minutes = 3")  # fmt: skip
    assert owner(conn, "user", "alice") == (361, 180_000, 7, 3)
    conn.execute("UPDATE accounts SET total_consumed_cpu_minutes = 0")  # a reset
    assert owner(conn, "account", "research") == (0, 0, 0, 0)
    assert check.check(conn).ok
    adjustments = conn.execute(
        "SELECT owner_kind, cpu_s, gpu_ms, reason FROM consumption_adjustments ORDER BY id"
    ).fetchall()
    assert [tuple(a) for a in adjustments] == [
        ("user", 300, 180_000, "minutes written directly"),
        ("account", -61, 0, "minutes written directly")]  # fmt: skip


def test_a_row_inserted_with_minutes_only_gets_them_as_its_exact_total(conn):
    conn.execute("INSERT INTO accounts (account, total_consumed_cpu_minutes) VALUES ('x', 4)")
    assert owner(conn, "account", "x") == (240, 0, 4, 0)
    assert check.check(conn).ok


def test_a_seed_database_upgrades_keeping_its_totals_as_opening_balances(tmp_path, capsys):
    path = make_seed_db(tmp_path / "seed.db")
    assert run_cli(capsys, path, "migrate").code == 0
    conn = db.connect(path)
    for name, cpu_min, _quota_cpu, gpu_min, *_ in SEED_ROWS["users"]:
        assert owner(conn, "user", name) == (cpu_min * 60, gpu_min * 60_000, cpu_min, gpu_min)
    opening = conn.execute(
        "SELECT owner_kind, owner, cpu_s, gpu_ms FROM consumption_adjustments "
        "WHERE reason LIKE 'opening balance%' ORDER BY owner_kind, owner"
    ).fetchall()
    expected = sorted(
        [("account", r[0], r[1] * 60, r[3] * 60_000) for r in SEED_ROWS["accounts"]]
        + [("user", r[0], r[1] * 60, r[3] * 60_000) for r in SEED_ROWS["users"]]
    )
    assert [tuple(o) for o in opening] == [e for e in expected if e[2] or e[3]]
    assert check.check(conn).ok
    # Charging on top of an upgraded total adds seconds to it.
    C.apply_charge(conn, run(1, 30, user="alice", account="hpc"), C.Allocation(None), "test")
    assert owner(conn, "user", "alice")[:3] == (1200 * 60 + 30, 30 * 60_000, 1201)
    assert check.check(conn).ok
    conn.close()
