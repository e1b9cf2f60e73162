"""The plugin and the reserved_* running totals (migration 0003): it reads them, one row per
owner, and its own writes (submit, modify, refusals, errors) keep them exact."""

from __future__ import annotations

import sqlite3

from tests.lua.harness import execute, modify_case, rows, submit_case
from tests.lua.test_modify import submitted, update
from tests.lua.test_submit import set_account_quota, set_factor, set_user_quota
from tests.unit.test_reserved_totals import reserved_mismatches, reserved_totals


def _totals(db_path):
    conn = sqlite3.connect(str(db_path))
    try:
        return reserved_totals(conn), reserved_mismatches(conn)
    finally:
        conn.close()


def test_refusal_reads_the_totals_not_the_rows(plugin, db_path):
    """The message's "reserved N by M jobs" comes from the user row's totals."""
    set_user_quota(db_path, "alice", cpu=1000, consumed_cpu=100)
    execute(db_path, "UPDATE users SET reserved_cpu_minutes = 850, reserved_jobs = 3 "
                     "WHERE username = 'alice'")  # no preallocation row at all
    res = plugin.submit(submit_case("c02_time10", min_cpus=6.0, num_tasks=6.0))  # 60 > 50
    assert res.rc == 2050
    assert res.user_lines[2] == ("slurm-quota:   available: 50 CPU-minutes = quota 1000 - "
                                 "consumed 100 - reserved 850 by 3 queued/running jobs")
    assert plugin.submit(submit_case("c02_time10", min_cpus=5.0, num_tasks=5.0)).rc == 0  # 50


def test_account_refusal_reads_the_account_totals(plugin, db_path):
    set_account_quota(db_path, "research", gpu=100)
    execute(db_path, "UPDATE accounts SET reserved_gpu_minutes = 80, reserved_jobs = 2 "
                     "WHERE account = 'research'")
    res = plugin.submit(submit_case("c25_gres_untyped"))  # 1 GPU x 30 min > 20 left
    assert res.rc == 2050
    assert "GPU-minutes than account research" in res.user_lines[0]
    assert "reserved 80 by 2 queued/running jobs" in res.user_lines[2]


def test_plugin_writes_keep_the_totals_exact(plugin, db_path):
    set_factor(db_path, "h100", 2.0)
    set_user_quota(db_path, "alice", cpu=100_000, gpu=100_000)
    subs = [plugin.submit(submit_case(case)) for case in
            ("c01_plain", "c07_array0-9", "c10_gres_h100x2", "c17_acct_physics",
             "c08_array_step", "c12_gpt1_n2")]
    assert [r.rc for r in subs] == [0] * 6
    totals, bad = _totals(db_path)
    assert bad == []
    # 30 + 30x10 + 30 + 30 (physics) + 30x4 + 60 CPU; 60x2 (h100 factor 2) + 60 GPU
    assert totals["users"]["alice"] == (570, 180, 18)
    assert totals["accounts"] == {"research": (540, 180, 17), "physics": (30, 0, 1)}

    set_user_quota(db_path, "alice", cpu=0)
    assert plugin.submit(submit_case("c01_plain")).rc == 2050  # a refusal writes nothing
    set_user_quota(db_path, "alice", cpu=100_000, gpu=100_000)
    assert _totals(db_path)[0]["users"]["alice"] == (570, 180, 18)

    uuid, rec = submitted(plugin, db_path)  # 20 CPU-minutes, research
    assert update(plugin, rec, time_limit=10.0).rc == 0  # 20 -> 10
    rec["time_limit"] = 10.0
    assert update(plugin, rec, account="physics").rc == 0  # moves to physics
    rec["account"] = "physics"
    assert update(plugin, rec, uid=0, time_limit=100.0).rc == 0  # admin: 10 -> 100
    totals, bad = _totals(db_path)
    assert bad == []
    assert totals["users"]["alice"] == (670, 180, 19)
    assert totals["accounts"] == {"research": (540, 180, 17), "physics": (130, 0, 2)}


def test_modify_excludes_the_jobs_own_reservation_from_the_totals(plugin, db_path):
    set_user_quota(db_path, "alice", cpu=45)
    uuid, rec = submitted(plugin, db_path)  # 20 of 45: reserved 20 by 1 job
    assert update(plugin, rec, time_limit=45.0).rc == 0  # 45 <= 45 - 0 (its own 20 excluded)
    rec["time_limit"] = 45.0
    assert rows(db_path, "SELECT reserved_cpu_minutes, reserved_jobs FROM users") == [(45, 1)]
    assert update(plugin, rec, time_limit=46.0).rc == 2050
    assert rows(db_path, "SELECT reserved_cpu_minutes FROM users") == [(45,)]


def test_a_failed_call_leaves_the_totals_alone(plugin, db_path):
    assert plugin.submit(submit_case("c01_plain")).rc == 0
    before = _totals(db_path)[0]
    execute(db_path, "CREATE TRIGGER no_commit AFTER INSERT ON jobs_preallocations "
                     "BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END")
    res = plugin.submit(submit_case("c07_array0-9"))
    assert res.rc == 0 and res.admin_comment is None  # fail-open, no reservation
    assert "refused by trigger" in res.log_text("error")
    assert _totals(db_path) == (before, [])
    assert plugin.bridge.conns == {} and plugin.bridge.leaked == []


def test_failed_statement_is_prepared_afresh_on_the_same_connection(plugin, db_path):
    """LuaDBI reports a failed execute()'s error again on the next execute() of the same
    statement: the session drops that statement and prepares it again."""
    s = plugin.m.open_db(str(db_path))
    execute(db_path, "CREATE TRIGGER only_good BEFORE INSERT ON users WHEN NEW.username = 'bad' "
                     "BEGIN SELECT RAISE(ABORT, 'bad user'); END")
    ok, err = plugin.lua.globals().pcall(s.exec, s, "insert_user", "bad", -1.0, -1.0)
    assert not ok and "bad user" in str(err)
    assert s.exec(s, "insert_user", "good", -1.0, -1.0)
    s.close(s)
    assert rows(db_path, "SELECT username FROM users") == [("good",)]
    assert plugin.bridge.leaked == [] and plugin.bridge.open_statements() == 0


def test_modify_of_a_moved_job_under_admin(plugin, db_path):
    """An administrator's account change of a job moves the whole reservation."""
    set_factor(db_path, "h100", 2.0)
    uuid, rec = submitted(plugin, db_path, case="c10_gres_h100x2")
    desc, _ = modify_case(account="physics")
    assert plugin.modify(desc, rec, modify_uid=0).rc == 0
    totals, bad = _totals(db_path)
    assert bad == []
    assert totals["accounts"] == {"research": (0, 0, 0), "physics": (30, 120, 1)}
