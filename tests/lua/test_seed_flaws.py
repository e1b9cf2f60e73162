"""One regression test per flaw of the seed system that this plugin fixes (SEED-SYSTEM.md)."""

from __future__ import annotations

from tests.lua.harness import prealloc, submit_case
from tests.lua.test_modify import submitted, update
from tests.lua.test_policy import hold_write_lock
from tests.lua.test_submit import set_factor, set_user_quota


def test_flaw1_job_without_time_uses_partition_default_not_no_val(plugin, db_path):
    set_user_quota(db_path, "alice", cpu=1000)  # any finite quota refused NO_VAL-minute jobs
    res = plugin.submit(submit_case("c01_plain"))  # time_limit = NO_VAL
    assert res.rc == 0
    assert prealloc(db_path, res.uuid)[2] == 30  # DefaultTime, not 4294967294


def test_flaw2_cpus_per_task_counts_cpus_not_tasks(plugin, db_path):
    res = plugin.submit(submit_case("c04_c4", cpus_per_task=32.0, min_cpus=32.0,
                                    pn_min_cpus=32.0, time_limit=60.0))  # sbatch -c 32
    assert prealloc(db_path, res.uuid)[2] == 32 * 60
    res = plugin.submit(submit_case("c06_exclusive", time_limit=60.0))  # --exclusive
    assert prealloc(db_path, res.uuid)[2] == 16 * 60


def test_flaw3_hold_and_release_keep_the_reservation(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)
    set_user_quota(db_path, "alice", cpu=0)  # a re-check from the update alone would refuse
    for uid in (1001, 0):
        assert update(plugin, rec, uid=uid, priority=0.0).rc == 0  # scontrol hold
        assert update(plugin, rec, uid=uid, priority=4294967295.0).rc == 0  # scontrol release
    assert prealloc(db_path, uuid) == ("alice", "research", 20, 0, 1)


def test_flaw4_untyped_gpus_are_accepted_at_default_factor(plugin, db_path):
    set_factor(db_path, "default", 1.5)
    res = plugin.submit(submit_case("c13_gpus2", time_limit=10.0))  # --gpus=2
    assert res.rc == 0
    assert prealloc(db_path, res.uuid)[3] == 30


def test_flaw4b_22_05_gres_colon_spelling_is_counted(plugin, db_path):
    set_factor(db_path, "h100", 2.0)
    res = plugin.submit(submit_case("c10_gres_h100x2", time_limit=10.0))  # "gres:gpu:h100:2"
    assert prealloc(db_path, res.uuid)[3] == 40


def test_flaw5_locked_database_no_sleep_bounded_wait(plugin, db_path):
    assert plugin.m.config.busy_timeout_ms == 200
    holder = hold_write_lock(db_path, 5)
    try:
        res = plugin.submit(submit_case("c01_plain"))
    finally:
        holder.kill()
        holder.wait()
    assert res.rc == 0  # FAIL_OPEN default: accepted, logged
    assert "ACCEPTED WITHOUT QUOTA CHECK" in res.log_text("error")
    # The seed retried with sleeps for up to ~48 s here: one bounded wait (SQLite's
    # busy_timeout of 200 ms), one attempt, then the failure policy.
    assert plugin.bridge.statements.count("PRAGMA busy_timeout = 200") == 1
    assert plugin.bridge.statements.count("BEGIN IMMEDIATE") == 1

