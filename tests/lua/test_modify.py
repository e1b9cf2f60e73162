"""slurm_job_modify: the update (job_desc, only changed fields) merged over job_rec."""

from __future__ import annotations

import pytest

from tests.lua.harness import INFINITE, NO_VAL, execute, modify_case, prealloc, submit_case
from tests.lua.test_submit import set_account_quota, set_factor, set_user_quota


def submitted(plugin, db_path, case="c22_hold", **fields):
    """Submit a job through the plugin; return (uuid, job_rec fields as slurmctld shows them)."""
    res = plugin.submit(submit_case(case, **fields))
    assert res.rc == 0, res.logs
    _, rec = modify_case()
    rec = dict(rec)
    rec["admin_comment"] = res.admin_comment
    desc = submit_case(case, **fields)
    t = desc["time_limit"]
    rec["time_limit"] = 30.0 if t == NO_VAL else t  # slurmctld applies DefaultTime
    rec["min_cpus"] = desc["min_cpus"]
    rec["name"] = desc.get("name")
    for k in ("tres_per_job", "tres_per_node", "tres_per_task", "tres_per_socket"):
        rec[k] = desc.get(k)
    return res.uuid, rec


def update(plugin, rec, uid=1001, **changes):
    desc, _ = modify_case(**changes)
    return plugin.modify(desc, rec, modify_uid=uid)


@pytest.mark.parametrize("uid", [1001, 0])
@pytest.mark.parametrize(
    "change",
    [{"priority": 0.0}, {"priority": float(INFINITE)}, {"priority": 1000.0},
     {"nice": 2147483748.0}, {"comment": "x"}, {"name": "renamed"}],
    ids=["hold", "release", "priority", "nice", "comment", "name"],
)
def test_hold_release_priority_leave_the_reservation_alone(plugin, db_path, uid, change):
    set_user_quota(db_path, "alice", cpu=25)  # quota now below what a re-check would need
    uuid, rec = submitted(plugin, db_path)
    before = prealloc(db_path, uuid)
    plugin.bridge.statements.clear()
    res = update(plugin, rec, uid=uid, **change)
    assert res.rc == 0
    assert prealloc(db_path, uuid) == before == ("alice", "research", 20, 0, 1)
    assert plugin.bridge.statements == []  # the database was not even opened


def test_hold_works_while_the_database_is_missing(plugin, db_path, tmp_path):
    uuid, rec = submitted(plugin, db_path)
    plugin.m.config.db_path = str(tmp_path / "gone.db")
    plugin.m.config.fail_open = False
    assert update(plugin, rec, priority=0.0).rc == 0


def test_user_lowers_time_limit(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)
    res = update(plugin, rec, time_limit=15.0)
    assert res.rc == 0
    assert prealloc(db_path, uuid)[2] == 15
    assert "cpu_min 20 -> 15" in res.log_text("info")


def test_user_increase_that_slurmctld_denies_does_not_grow_the_reservation(plugin, db_path):
    # slurmctld denies these after the plugin ran: beyond MaxTime (240), UNLIMITED under a
    # MaxTime, or any increase of a running job. The row must stay as it is.
    uuid, rec = submitted(plugin, db_path)
    assert update(plugin, rec, time_limit=300.0).rc == 0
    assert prealloc(db_path, uuid)[2] == 20
    assert update(plugin, rec, time_limit=float(INFINITE)).rc == 0
    assert prealloc(db_path, uuid)[2] == 20
    running = dict(rec, job_state=1.0)
    assert update(plugin, running, time_limit=60.0).rc == 0
    assert prealloc(db_path, uuid)[2] == 20


def test_user_raising_a_pending_job_within_max_time_is_checked_and_followed(plugin, db_path):
    # slurmctld 22.05 lets a user raise a PENDING job's limit up to the partition's MaxTime
    uuid, rec = submitted(plugin, db_path)
    set_user_quota(db_path, "alice", cpu=100)
    assert update(plugin, rec, time_limit=200.0).rc == 2050  # 200 > 100: refused
    assert prealloc(db_path, uuid)[2] == 20
    assert update(plugin, rec, time_limit=90.0).rc == 0
    assert prealloc(db_path, uuid)[2] == 90


def test_root_increase_follows_even_over_quota(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)
    set_user_quota(db_path, "alice", cpu=1)
    res = update(plugin, rec, uid=0, time_limit=25.0)
    assert res.rc == 0
    assert prealloc(db_path, uuid)[2] == 25


def test_slurm_user_and_listed_admins_are_admins(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)
    plugin.m.slurm_user_uid = 64030
    assert update(plugin, rec, uid=64030, time_limit=40.0).rc == 0
    assert prealloc(db_path, uuid)[2] == 40
    rec["time_limit"] = 40.0  # what slurmctld shows after the update
    plugin.m.config.admin_uids = plugin.lua.table_from([5000])
    assert update(plugin, rec, uid=5000, time_limit=50.0).rc == 0
    assert prealloc(db_path, uuid)[2] == 50
    running = dict(rec, time_limit=50.0, job_state=1.0)
    assert update(plugin, running, uid=1001, time_limit=60.0).rc == 0
    assert prealloc(db_path, uuid)[2] == 50


def test_user_cpu_increase_over_quota_is_refused_and_logged(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)  # 1 CPU x 20
    set_user_quota(db_path, "alice", cpu=60)
    res = update(plugin, rec, min_cpus=4.0, num_tasks=4.0)  # 80 > 60
    assert res.rc == 2050
    # Slurm 23.02+ shows job_modify's log_user to the user; 22.05 drops it: both get the lines
    assert res.user_lines[0].endswith("needs more CPU-minutes than user alice has left.")
    assert "requested: 80 CPU-minutes = 4 CPUs x 20 min" in res.user_lines[1]
    text = res.log_text("info")
    assert "refused update of user=alice" in text
    assert "requested: 80 CPU-minutes = 4 CPUs x 20 min" in text
    assert all(line in text for line in res.user_lines)
    assert prealloc(db_path, uuid)[2] == 20


def test_own_reservation_is_not_counted_against_the_update(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)  # 20 reserved
    set_user_quota(db_path, "alice", cpu=100)
    res = update(plugin, rec, min_cpus=5.0, num_tasks=5.0)  # 100 <= 100 - (20 - 20)
    assert res.rc == 0, res.logs
    assert prealloc(db_path, uuid)[2] == 100


def test_user_decrease_is_accepted_even_when_quota_is_exhausted(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)
    set_user_quota(db_path, "alice", cpu=0, consumed_cpu=500)
    assert update(plugin, rec, time_limit=10.0).rc == 0
    assert prealloc(db_path, uuid)[2] == 10


def test_exclusive_job_keeps_whole_node_rate_on_time_change(plugin, db_path):
    uuid, rec = submitted(plugin, db_path, case="c06_exclusive")
    assert prealloc(db_path, uuid)[2] == 480
    assert update(plugin, rec, uid=0, time_limit=60.0).rc == 0
    assert prealloc(db_path, uuid)[2] == 960


def test_array_time_change_scales_per_element(plugin, db_path):
    uuid, rec = submitted(plugin, db_path, case="c07_array0-9")
    assert update(plugin, rec, time_limit=10.0).rc == 0
    assert prealloc(db_path, uuid)[2:] == (10, 0, 10)


def test_gpu_change_is_recomputed(plugin, db_path):
    set_factor(db_path, "h100", 2.0)
    uuid, rec = submitted(plugin, db_path, case="c10_gres_h100x2")
    assert prealloc(db_path, uuid)[3] == 120
    assert update(plugin, rec, tres_per_node="gres:gpu:h100:1").rc == 0
    assert prealloc(db_path, uuid)[3] == 60


def test_gpu_increase_over_gpu_quota_is_refused(plugin, db_path):
    uuid, rec = submitted(plugin, db_path, case="c25_gres_untyped")
    set_user_quota(db_path, "alice", gpu=40)
    assert update(plugin, rec, tres_per_node="gres:gpu:2").rc == 2050
    assert prealloc(db_path, uuid)[3] == 30


def test_account_change_moves_the_reservation_and_checks_the_new_account(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)
    set_account_quota(db_path, "physics", cpu=10)
    assert update(plugin, rec, account="physics").rc == 2050
    assert prealloc(db_path, uuid)[1] == "research"
    execute(db_path, "UPDATE accounts SET quota_cpu_minutes = 100 WHERE account = 'physics'")
    assert update(plugin, rec, account="physics").rc == 0
    assert prealloc(db_path, uuid)[1:3] == ("physics", 20)


def test_admin_rewriting_admin_comment_keeps_the_token(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)
    res = update(plugin, rec, uid=0, admin_comment="checked by ops")
    assert res.rc == 0
    assert res.admin_comment == f"checked by ops slurm-quota:{uuid}"
    res = update(plugin, rec, uid=0, admin_comment="")
    assert res.admin_comment == f"slurm-quota:{uuid}"
    res = update(plugin, rec, uid=0, admin_comment=f"mine slurm-quota:{uuid}")
    assert "admin_comment" not in res.writes  # already there: left as the admin wrote it


def test_user_update_never_writes_admin_comment(plugin, db_path):
    # slurmctld denies a user's update that carries admin_comment
    uuid, rec = submitted(plugin, db_path)
    res = update(plugin, rec, time_limit=10.0)
    assert "admin_comment" not in res.writes


def test_job_without_token_is_left_alone(plugin, db_path):
    _, rec = modify_case()
    res = update(plugin, rec, time_limit=10.0)
    assert res.rc == 0


def test_already_charged_job_is_left_alone(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)
    execute(db_path, "DELETE FROM jobs_preallocations WHERE job_uuid = ?", uuid)
    assert update(plugin, rec, time_limit=10.0).rc == 0


def test_seed_bare_uuid_token_is_followed(plugin, db_path):
    uuid, rec = submitted(plugin, db_path)
    rec["admin_comment"] = uuid
    assert update(plugin, rec, time_limit=5.0).rc == 0
    assert prealloc(db_path, uuid)[2] == 5


def test_captured_modify_calls(plugin, db_path):
    """The four captured calls: alice 20->15, alice 30->15 (denymod), root 20->25, alice ->300."""
    from tests.lua.harness import captured_modifies

    for uid, desc, rec in captured_modifies():
        rec = dict(rec)
        res = plugin.submit(submit_case("c22_hold", time_limit=rec["time_limit"]))
        rec["admin_comment"] = f"{rec['admin_comment']} {res.admin_comment}"
        before = prealloc(db_path, res.uuid)[2]
        out = plugin.modify(desc, rec, modify_uid=uid)
        assert out.rc == 0
        after = prealloc(db_path, res.uuid)[2]
        new = desc["time_limit"]
        # pending jobs on partition main (MaxTime 240): users may raise up to 240
        expected = new if (uid == 0 or new < before or new <= 240) else before
        assert after == expected, (uid, before, new, after)
