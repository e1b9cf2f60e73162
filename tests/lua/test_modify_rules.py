"""modify_rules / modify_check: the rules of an update as pure functions (no database).

The update is the captured 'alice updates her pending job' (harness.modify_case) over a job of
1 CPU x 20 min whose reservation row is {alice, research, 20 CPU-min, 0 GPU-min, 1 element};
partition main: DefaultTime 30, MaxTime 240.
"""

from __future__ import annotations

from typing import Any

from tests.lua.harness import modify_case

ROW = {"user": "alice", "account": "research", "cpu": 20.0, "gpu": 0.0, "array_size": 1.0}


def job_rec() -> dict[str, Any]:
    _, rec = modify_case()
    return dict(rec, time_limit=20.0, min_cpus=1.0)


def plan(plugin, changes: dict[str, Any], *, is_admin=False, uid=1001.0, row=None, rec=None):
    desc, _ = modify_case(**changes)
    m = plugin.m
    mv = m.read_modify(plugin._table(desc), plugin._table(rec or job_rec()), plugin._parts(None))
    mv.uid = uid
    return m.modify_rules(
        mv, plugin._table(row or ROW), plugin.lua.table(), plugin.lua.table(), is_admin
    )


def only(p) -> set[str]:
    return set(p.only.keys()) if p.only else set()


def test_lowering_the_time_shrinks_the_reservation_and_checks_nothing(plugin):
    p = plan(plugin, {"time_limit": 15.0})
    assert p.action == "update"
    assert p.new_r.cpu_minutes == 15
    assert only(p) == set()
    assert not p.moved


def test_a_users_raise_on_a_pending_job_is_checked_against_user_and_account(plugin):
    p = plan(plugin, {"time_limit": 100.0})
    assert p.action == "update"
    assert p.new_r.cpu_minutes == 100
    assert only(p) == {"user.cpu", "account.cpu"}


def test_a_users_raise_beyond_maxtime_keeps_the_reservation(plugin):
    # slurmctld denies it after the plugin ran: the row must not grow
    p = plan(plugin, {"time_limit": 300.0})
    assert p.action == "keep"
    assert "not grown" in p.note


def test_an_administrators_raise_is_never_checked(plugin):
    p = plan(plugin, {"time_limit": 240.0}, is_admin=True, uid=0.0)
    assert p.action == "update"
    assert p.new_r.cpu_minutes == 240
    assert only(p) == set()


def test_more_cpus_by_a_user_checks_the_cpu_quotas_only(plugin):
    p = plan(plugin, {"min_cpus": 4.0, "num_tasks": 4.0})
    assert p.new_r.cpu_minutes == 80 and p.new_r.gpu_minutes == 0
    assert only(p) == {"user.cpu", "account.cpu"}


def test_moving_to_another_account_checks_both_of_its_quotas(plugin):
    p = plan(plugin, {"account": "physics"})
    assert p.action == "update" and p.moved and p.account == "physics"
    assert only(p) == {"account.cpu", "account.gpu"}


def test_an_unreadable_gpu_request_is_refused_for_users_kept_for_admins(plugin):
    bad = {"tres_per_node": "gres/gpu:h100:x"}
    refused = plan(plugin, bad)
    assert refused.action == "refuse"
    assert "cannot read the GPU request" in refused.message
    kept = plan(plugin, bad, is_admin=True, uid=0.0)
    assert kept.action == "keep"


def test_an_update_that_changes_nothing_keeps_the_row(plugin):
    p = plan(plugin, {"time_limit": 20.0})
    assert p.action == "keep" and p.reason == "unchanged"


def ledger(plugin, name, quota, reserved, jobs):
    return plugin._table({
        "owner": "user" if name == "alice" else "account", "name": name, "exists": True,
        "quota_cpu": float(quota), "consumed_cpu": 0.0, "quota_gpu": -1.0, "consumed_gpu": 0.0,
        "open_jobs": float(jobs), "reserved_cpu": float(reserved), "reserved_gpu": 0.0,
    })


def test_check_does_not_count_the_jobs_own_reservation_as_used(plugin):
    p = plan(plugin, {"time_limit": 100.0})
    fits = plugin.lua.table_from({
        "user": ledger(plugin, "alice", 100, 20, 1),  # 20 of it is this job's own row
        "account": ledger(plugin, "research", -1, 20, 1),
    })
    assert plugin.m.modify_check(p, plugin._table(ROW), fits) is None
    short = plugin.lua.table_from({
        "user": ledger(plugin, "alice", 99, 20, 1),
        "account": ledger(plugin, "research", -1, 20, 1),
    })
    fail = plugin.m.modify_check(p, plugin._table(ROW), short)
    assert fail is not None and fail.owner == "user" and fail.resource == "cpu"
