"""slurm_job_submit end to end: captured 22.05 job_desc proxies -> decision, token, DB row."""

from __future__ import annotations

import re

import pytest

from tests.lua.harness import NO_VAL, SERIES, execute, prealloc, rows, submit_case

UUID_RE = re.compile(
    r"^slurm-quota:[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"
)


def set_factor(db_path, gpu_type, factor):
    execute(db_path, "INSERT INTO gpu_factors (gpu_type, factor) VALUES (?, ?)", gpu_type, factor)


def set_setting(db_path, key, value):
    execute(db_path, "INSERT INTO settings (key, value) VALUES (?, ?)", key, value)


def set_user_quota(db_path, user, cpu=-1, gpu=-1, consumed_cpu=0, consumed_gpu=0):
    execute(
        db_path,
        "INSERT INTO users (username, quota_cpu_minutes, quota_gpu_minutes, "
        "total_consumed_cpu_minutes, total_consumed_gpu_minutes, consumed_cpu_s, "
        "consumed_gpu_ms) VALUES (?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (username) DO UPDATE SET quota_cpu_minutes = excluded.quota_cpu_minutes, "
        "quota_gpu_minutes = excluded.quota_gpu_minutes, "
        "total_consumed_cpu_minutes = excluded.total_consumed_cpu_minutes, "
        "total_consumed_gpu_minutes = excluded.total_consumed_gpu_minutes, "
        "consumed_cpu_s = excluded.consumed_cpu_s, consumed_gpu_ms = excluded.consumed_gpu_ms",
        user, cpu, gpu, consumed_cpu, consumed_gpu, consumed_cpu * 60, consumed_gpu * 60000,
    )


def set_account_quota(db_path, account, cpu=-1, gpu=-1, consumed_cpu=0, consumed_gpu=0):
    execute(
        db_path,
        "INSERT INTO accounts (account, quota_cpu_minutes, quota_gpu_minutes, "
        "total_consumed_cpu_minutes, total_consumed_gpu_minutes, consumed_cpu_s, "
        "consumed_gpu_ms) VALUES (?, ?, ?, ?, ?, ?, ?)",
        account, cpu, gpu, consumed_cpu, consumed_gpu, consumed_cpu * 60, consumed_gpu * 60000,
    )


# (captured case, expected (account, cpu minutes, gpu minutes, array size)) on partition main
# (DefaultTime 30, MaxTime 240, 16 CPUs on 1 node), all GPU factors 1.
CAPTURED = [
    ("c01_plain", ("research", 30, 0, 1)),
    ("c02_time10", ("research", 10, 0, 1)),
    ("c03_n4", ("research", 120, 0, 1)),
    ("c04_c4", ("research", 120, 0, 1)),
    ("c05_N2_tpn2", ("research", 120, 0, 1)),
    ("c06_exclusive", ("research", 480, 0, 1)),
    ("c07_array0-9", ("research", 30, 0, 10)),
    ("c08_array_step", ("research", 30, 0, 4)),
    ("c09_het (#9)", ("research", 5, 0, 1)),
    ("c09_het (#10)", ("research", 20, 5, 1)),
    ("c10_gres_h100x2", ("research", 30, 60, 1)),
    ("c11_gpus_a100", ("research", 30, 30, 1)),
    ("c12_gpt1_n2", ("research", 60, 60, 1)),
    ("c13_gpus2", ("research", 30, 60, 1)),
    ("c14_gpn_a100", ("research", 30, 30, 1)),
    ("c15_mem_per_cpu", ("research", 30, 0, 1)),
    ("c16_timemin", ("research", 60, 0, 1)),
    ("c17_acct_physics", ("physics", 30, 0, 1)),
    ("c23_partition", ("research", 60, 0, 1)),
    ("c24_ntpn3", ("research", 90, 0, 1)),
    ("c25_gres_untyped", ("research", 30, 30, 1)),
    ("c26_cpus_per_gpu", ("research", 60, 30, 1)),
    ("c28_time_over_max", ("research", 300, 0, 1)),
    ("c29_gpus_per_socket", ("research", 30, 30, 1)),
    ("c30_n2_c3", ("research", 180, 0, 1)),
]


# Captured on 24.11 and 26.05 only (tests/fixtures/capture.py): behaviour that changed later.
CAPTURED_LATER = [
    # 23.11.2+: min_nodes = ceil(5 / 4) = 2 arrives with -n 5: still 5 CPUs, not 2 x 4
    ("c33_n5_tpn4", ("research", 150, 0, 1)),
    # tres_per_task "cpu=2,gres/gpu=1": 2 tasks x 2 CPUs, 2 tasks x 1 GPU
    ("c34_gpt1_c2", ("research", 120, 60, 1)),
]
SERIES_CASES = [("22.05", c, e) for c, e in CAPTURED] + [
    (series, c, e) for series in SERIES[1:] for c, e in CAPTURED + CAPTURED_LATER
]


@pytest.mark.parametrize(
    "series, case, expected", SERIES_CASES, ids=[f"{s}-{c}" for s, c, _ in SERIES_CASES]
)
def test_captured_submission_is_preallocated(plugin, db_path, series, case, expected):
    res = plugin.submit(submit_case(case, series))
    assert res.rc == 0, res.logs
    assert res.user_lines == []
    assert UUID_RE.match(res.admin_comment)
    assert prealloc(db_path, res.uuid) == ("alice",) + expected


def test_first_submission_creates_user_and_account_with_default_quotas(plugin, db_path):
    set_setting(db_path, "default_user_quota_cpu_minutes", "1000")
    set_setting(db_path, "default_account_quota_gpu_minutes", "50")
    res = plugin.submit(submit_case("c01_plain"))
    assert res.rc == 0
    assert rows(db_path, "SELECT username, quota_cpu_minutes, quota_gpu_minutes, "
                "total_consumed_cpu_minutes FROM users") == [("alice", 1000, -1, 0)]
    assert rows(db_path, "SELECT account, quota_cpu_minutes, quota_gpu_minutes FROM accounts") == [
        ("research", -1, 50)
    ]


def test_default_quota_applies_to_a_new_user_before_the_row_exists(plugin, db_path):
    set_setting(db_path, "default_user_quota_cpu_minutes", "20")
    res = plugin.submit(submit_case("c01_plain"))  # 30 CPU-minutes > 20
    assert res.rc == 2050
    assert rows(db_path, "SELECT COUNT(*) FROM users") == [(0,)]  # refusal writes nothing


def test_existing_rows_keep_their_quota(plugin, db_path):
    set_setting(db_path, "default_user_quota_cpu_minutes", "5")
    set_user_quota(db_path, "alice", cpu=-1)
    assert plugin.submit(submit_case("c01_plain")).rc == 0
    assert rows(db_path, "SELECT quota_cpu_minutes FROM users") == [(-1,)]


def test_admin_comment_token_is_appended_to_existing_text(plugin, db_path):
    res = plugin.submit(submit_case("c01_plain", admin_comment="site note"))
    assert res.rc == 0
    assert res.admin_comment.startswith("site note slurm-quota:")
    assert prealloc(db_path, res.uuid) is not None


def test_each_submission_gets_its_own_uuid(plugin, db_path):
    uuids = {plugin.submit(submit_case("c01_plain")).uuid for _ in range(5)}
    assert len(uuids) == 5
    assert rows(db_path, "SELECT COUNT(*) FROM jobs_preallocations") == [(5,)]


def test_gpu_factors_typed_untyped_and_default(plugin, db_path):
    set_factor(db_path, "h100", 2.0)
    set_factor(db_path, "default", 0.5)
    h100 = plugin.submit(submit_case("c10_gres_h100x2", time_limit=10.0))  # 2 x 2.0 x 10
    untyped = plugin.submit(submit_case("c13_gpus2", time_limit=10.0))  # 2 x 0.5 x 10
    a100 = plugin.submit(submit_case("c11_gpus_a100", time_limit=10.0))  # unknown type: default
    assert prealloc(db_path, h100.uuid)[3] == 40
    assert prealloc(db_path, untyped.uuid)[3] == 10
    assert prealloc(db_path, a100.uuid)[3] == 5


def test_gpu_minutes_round_up(plugin, db_path):
    set_factor(db_path, "default", 0.3)
    res = plugin.submit(submit_case("c25_gres_untyped", time_limit=7.0))  # 0.3 x 7 = 2.1
    assert prealloc(db_path, res.uuid)[3] == 3


def test_later_tres_spellings_are_counted(plugin, db_path):
    res = plugin.submit(submit_case("c01_plain", time_limit=10.0, num_tasks=2.0,
                                    tres_per_job="gres/gpu:h100=1",
                                    tres_per_node="gres/gpu=2",
                                    tres_per_task="gres/gpu:a100:1,gres/shard:4"))
    assert prealloc(db_path, res.uuid)[3] == (1 + 2 + 2) * 10


def test_exclusive_takes_node_gpus_from_setting(plugin, db_path):
    set_setting(db_path, "node_gpus", "gpu:h100:2,gpu:a100:2")
    set_factor(db_path, "h100", 2.0)
    res = plugin.submit(submit_case("c06_exclusive", time_limit=10.0))
    assert prealloc(db_path, res.uuid)[2:4] == (160, (2 * 2.0 + 2) * 10)


def test_exclusive_per_partition_gpu_setting_wins(plugin, db_path):
    set_setting(db_path, "node_gpus", "gpu:8")
    set_setting(db_path, "node_gpus.main", "gpu:h100:2")
    res = plugin.submit(submit_case("c06_exclusive", time_limit=10.0))
    assert prealloc(db_path, res.uuid)[3] == 20


def test_exclusive_keeps_a_larger_gpu_request(plugin, db_path):
    set_setting(db_path, "node_gpus", "gpu:1")
    res = plugin.submit(submit_case("c06_exclusive", time_limit=10.0, tres_per_job="gres:gpu:3"))
    assert prealloc(db_path, res.uuid)[3] == 30


def test_multi_partition_takes_the_largest_time(plugin, db_path):
    parts = [
        {"name": "main", "default_time": 30, "max_time": 240, "total_cpus": 16,
         "total_nodes": 1, "flag_default": 1},
        {"name": "long", "default_time": 600, "max_time": 2880, "total_cpus": 64,
         "total_nodes": 2, "flag_default": 0},
    ]
    res = plugin.submit(submit_case("c01_plain", partition="main,long"), parts)
    assert prealloc(db_path, res.uuid)[2] == 600
    res = plugin.submit(submit_case("c01_plain", partition="main,long", time_limit=4294967295.0),
                        parts)
    assert prealloc(db_path, res.uuid)[2] == 2880
    res = plugin.submit(submit_case("c06_exclusive", partition="long", time_limit=1.0), parts)
    assert prealloc(db_path, res.uuid)[2] == 32  # whole node of the named partition


def test_no_partition_uses_the_default_one(plugin, db_path):
    parts = [
        {"name": "other", "default_time": 5, "max_time": 10, "flag_default": 0},
        {"name": "dflt", "default_time": 45, "max_time": 90, "flag_default": 1},
    ]
    res = plugin.submit(submit_case("c01_plain"), parts)
    assert prealloc(db_path, res.uuid)[2] == 45


def test_unlimited_time_uses_setting_as_last_resort(plugin, db_path):
    parts = [{"name": "free", "default_time": NO_VAL, "max_time": 4294967295, "flag_default": 1}]
    set_setting(db_path, "default_time_minutes", "120")
    set_user_quota(db_path, "alice", cpu=10_000)
    res = plugin.submit(submit_case("c01_plain"), parts)
    assert res.rc == 0
    assert prealloc(db_path, res.uuid)[2] == 120


def test_no_time_at_all_is_refused_when_a_quota_applies(plugin, db_path):
    parts = [{"name": "free", "default_time": NO_VAL, "max_time": 4294967295, "flag_default": 1}]
    set_user_quota(db_path, "alice", cpu=10_000)
    res = plugin.submit(submit_case("c01_plain"), parts)
    assert res.rc == 8000  # ESLURM_MISSING_TIME_LIMIT
    assert "--time" in "\n".join(res.user_lines)
    assert rows(db_path, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]


def test_no_time_and_no_quota_is_accepted_with_zero_reservation(plugin, db_path):
    parts = [{"name": "free", "default_time": NO_VAL, "max_time": 4294967295, "flag_default": 1}]
    res = plugin.submit(submit_case("c01_plain"), parts)
    assert res.rc == 0
    assert prealloc(db_path, res.uuid) == ("alice", "research", 0, 0, 1)


def test_gpu_quota_does_not_need_time_for_cpu_only_job(plugin, db_path):
    parts = [{"name": "free", "default_time": NO_VAL, "max_time": 4294967295, "flag_default": 1}]
    set_user_quota(db_path, "alice", gpu=100)
    assert plugin.submit(submit_case("c01_plain"), parts).rc == 0
    assert plugin.submit(submit_case("c13_gpus2"), parts).rc == 8000


def test_user_is_job_user_not_submit_uid(plugin, db_path):
    # root submitting with --uid=alice: submit_uid 0, job_desc user alice
    set_user_quota(db_path, "alice", cpu=10)
    res = plugin.submit(submit_case("c01_plain"), submit_uid=0)
    assert res.rc == 2050


def test_root_is_never_refused_but_is_preallocated(plugin, db_path):
    set_user_quota(db_path, "root", cpu=0)
    res = plugin.submit(submit_case("c01_plain", user_name="root", user_id=0.0), submit_uid=0)
    assert res.rc == 0
    assert prealloc(db_path, res.uuid) == ("root", "research", 30, 0, 1)
    assert "not refused" in res.log_text("info")


def test_root_malformed_array_is_accepted(plugin, db_path):
    res = plugin.submit(submit_case("c01_plain", user_name="root", user_id=0.0, array_inx="x"))
    assert res.rc == 0
    assert prealloc(db_path, res.uuid)[4] == 1


def test_malformed_array_is_refused_with_a_message(plugin, db_path):
    res = plugin.submit(submit_case("c07_array0-9", array_inx="0-9:x"))
    assert res.rc == -1
    assert "cannot read" in res.user_lines[0] and "0-9:x" in res.user_lines[0]
    assert rows(db_path, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]


def test_unreadable_gpu_request_is_refused_with_a_message(plugin, db_path):
    res = plugin.submit(submit_case("c01_plain", tres_per_node="gres:gpu:h100:lots"))
    assert res.rc == -1
    assert "gres:gpu:h100:lots" in res.user_lines[0]


def test_het_components_are_checked_on_their_own(plugin, db_path):
    set_user_quota(db_path, "alice", cpu=24)
    first = plugin.submit(submit_case("c09_het (#9)"))  # 5
    second = plugin.submit(submit_case("c09_het (#10)"))  # 20: 25 > 24
    assert first.rc == 0 and second.rc == 2050
    assert prealloc(db_path, first.uuid)[2] == 5


def test_account_quota_with_another_account_hint(plugin, db_path):
    set_account_quota(db_path, "research", cpu=100, consumed_cpu=90)
    res = plugin.submit(submit_case("c02_time10", min_cpus=2.0, cpus_per_task=2.0))
    assert res.rc == 2050
    text = "\n".join(res.user_lines)
    assert "account research" in text
    assert "-A/--account" in text
    res = plugin.submit(submit_case("c17_acct_physics"))
    assert res.rc == 0


def test_refusal_message_has_the_numbers(plugin, db_path):
    set_user_quota(db_path, "alice", cpu=1000, consumed_cpu=400)
    assert plugin.submit(submit_case("c02_time10", num_tasks=10.0, min_cpus=10.0)).rc == 0  # 100
    res = plugin.submit(submit_case("c07_array0-9", time_limit=60.0, min_cpus=4.0,
                                    cpus_per_task=4.0, name="train"))
    assert res.rc == 2050
    assert res.user_lines == [
        'slurm-quota: job "train" refused: it needs more CPU-minutes than user alice has left.',
        "slurm-quota:   requested: 2400 CPU-minutes = 4 CPUs x 60 min x 10 array elements",
        "slurm-quota:   available: 500 CPU-minutes = quota 1000 - consumed 400 - reserved 100 "
        "by 1 queued/running job",
        "slurm-quota:   hint: --time=12 or less would fit; or 2 array elements would fit; or "
        "fewer CPUs; or ask your administrators for more quota. Usage: slurm-quota stats",
    ]
    info = res.log_text("info")
    assert 'refused user=alice uid=1001 account=research job="train"' in info


def test_gpu_refusal_message_breaks_down_types_and_factors(plugin, db_path):
    set_factor(db_path, "h100", 2.0)
    set_user_quota(db_path, "alice", gpu=100)
    res = plugin.submit(submit_case("c01_plain", time_limit=30.0, name="gpujob",
                                    tres_per_node="gres:gpu:h100:2,gres:gpu:1"))
    assert res.rc == 2050
    assert res.user_lines[1] == (
        "slurm-quota:   requested: 150 GPU-minutes = (1 GPU (untyped, default factor) x factor 1"
        " + 2 GPUs h100 x factor 2) x 30 min"
    )
    assert "GPU-minutes than user alice" in res.user_lines[0]


def test_refusal_explains_assumed_default_time(plugin, db_path):
    set_user_quota(db_path, "alice", cpu=10)
    res = plugin.submit(submit_case("c01_plain"))
    assert "30 min (DefaultTime of partition main, as the job has no --time)" in res.user_lines[1]


def test_available_excludes_array_reservations_times_size(plugin, db_path):
    set_user_quota(db_path, "alice", cpu=400)
    assert plugin.submit(submit_case("c07_array0-9")).rc == 0  # 30 x 10 = 300
    assert plugin.submit(submit_case("c01_plain", time_limit=100.0)).rc == 0  # 100 -> 400
    res = plugin.submit(submit_case("c01_plain", time_limit=1.0))
    assert res.rc == 2050
    assert "reserved 400 by 11 queued/running jobs" in res.user_lines[2]


def test_accept_log_line_names_the_job(plugin, db_path):
    res = plugin.submit(submit_case("c10_gres_h100x2"))
    line = res.log_text("info")
    assert line.startswith("slurm-quota: accepted user=alice uid=1001 account=research "
                           'job="c10_gres_h100x2" uuid=')
    assert "cpus=1 time=30 gpus=h100:2 array=1 cpu_min=30 gpu_min=60" in line


def test_db_path_from_environment(runtime, db_path, monkeypatch):
    from tests.lua.harness import Plugin

    monkeypatch.setenv("SLURM_QUOTA_DB", str(db_path))
    p = Plugin(runtime, None)
    assert p.m.db_path() == str(db_path)
    res = p.submit(submit_case("c01_plain"))
    assert res.rc == 0 and prealloc(db_path, res.uuid) is not None
    monkeypatch.delenv("SLURM_QUOTA_DB")
    assert p.m.db_path() == "/var/lib/state/slurm-quota/slurm-quota.db"


def test_only_entry_points_and_module_are_global(plugin, db_path):
    plugin.submit(submit_case("c10_gres_h100x2"))
    plugin.submit(submit_case("c07_array0-9", array_inx="bad"))
    from tests.lua.harness import modify_case

    desc, rec = modify_case(time_limit=10.0)
    plugin.modify(desc, rec)
    assert plugin.new_globals() == {"slurm_job_submit", "slurm_job_modify"}


def test_one_write_transaction_per_accepted_submit(plugin, db_path):
    plugin.bridge.statements.clear()
    plugin.submit(submit_case("c01_plain"))
    sql = plugin.bridge.statements
    assert sql.count("BEGIN IMMEDIATE") == 1 and sql.count("COMMIT") == 1
    assert "PRAGMA busy_timeout = 200" in sql
    first_insert = min(i for i, s in enumerate(sql) if s.startswith("INSERT"))
    assert sql.index("BEGIN IMMEDIATE") < first_insert
    plugin.bridge.statements.clear()
    set_user_quota(db_path, "alice", cpu=0)
    plugin.submit(submit_case("c01_plain"))
    assert "ROLLBACK" in plugin.bridge.statements
    assert not any(s.startswith("INSERT") for s in plugin.bridge.statements)
    # the one cached connection stays open, outside any transaction
    assert len(plugin.bridge.conns) == 1
    assert not any(c.in_transaction for c in plugin.bridge.conns.values())


def test_connection_is_cached_across_calls(plugin, db_path):
    for _ in range(5):
        assert plugin.submit(submit_case("c01_plain")).rc == 0
    assert plugin.bridge.next_id > 0
    assert len(plugin.bridge.conns) == 1
    opens = [s for s in plugin.bridge.statements if s == "PRAGMA busy_timeout = 200"]
    assert len(opens) == 1  # opened once
    assert plugin.bridge.statements.count("PRAGMA user_version") == 1  # at the open
    # and on every call, by the version row of the settings query
    assert sum(s.startswith("SELECT 's', key") for s in plugin.bridge.statements) == 5


def test_statements_are_prepared_once_per_connection(plugin, db_path):
    set_factor(db_path, "h100", 2.0)
    assert plugin.submit(submit_case("c10_gres_h100x2")).rc == 0  # opens, prepares
    first = list(plugin.bridge.prepared)
    assert len(first) == len(set(first))  # nothing prepared twice within a call
    plugin.bridge.prepared.clear()
    plugin.bridge.statements.clear()
    for _ in range(3):
        assert plugin.submit(submit_case("c10_gres_h100x2")).rc == 0
    assert plugin.bridge.prepared == []  # every statement re-executed from the cache
    # one call = begin, context (settings, factors and the schema version), user, account,
    # insert, commit
    assert len(plugin.bridge.statements) == 3 * 6
    assert plugin.bridge.statements[0] == "BEGIN IMMEDIATE"
    assert plugin.bridge.statements[1].startswith("SELECT 's', key, value FROM settings")
    assert "PRAGMA user_version" not in plugin.bridge.statements
    # the open-time pragmas are not kept; the per-call statements are
    assert "PRAGMA busy_timeout = 200" not in plugin.bridge.prepared
    kept = plugin.bridge.open_statements()
    assert kept == len(set(first)) - 4
    # a reopen prepares afresh and finalizes the old statements before closing
    plugin.m.drop_connection()
    assert plugin.bridge.open_statements() == 0
    assert plugin.bridge.conns == {} and plugin.bridge.leaked == []
    assert plugin.submit(submit_case("c10_gres_h100x2")).rc == 0
    owners = ("INSERT INTO users ", "INSERT INTO accounts ")  # both rows exist by now
    assert sorted(plugin.bridge.prepared) == sorted(s for s in first if not s.startswith(owners))


def test_one_row_read_per_owner(plugin, db_path):
    """The check reads quota, consumed and reserved from one user row and one account row:
    no statement of a submission reads jobs_preallocations."""
    plugin.bridge.statements.clear()
    assert plugin.submit(submit_case("c01_plain")).rc == 0
    reads = [s for s in plugin.bridge.statements if s.startswith("SELECT")]
    assert not any("jobs_preallocations" in s for s in reads)
    assert sum(" FROM users " in s for s in reads) == 1
    assert sum(" FROM accounts " in s for s in reads) == 1


def test_cached_connection_rechecks_the_schema(plugin, db_path):
    assert plugin.submit(submit_case("c01_plain")).rc == 0
    newer = int(plugin.m.SCHEMA_VERSION) + 1
    execute(db_path, f"PRAGMA user_version = {newer}")
    plugin.m.config.fail_open = False
    res = plugin.submit(submit_case("c01_plain"))
    assert res.rc == -1 and f"schema version {newer}" in res.log_text("error")
    assert plugin.bridge.conns == {}  # dropped after the error
    assert plugin.bridge.leaked == [] and plugin.bridge.open_statements() == 0


def test_cached_connection_follows_a_replaced_file(runtime, db_path, tmp_path):
    """With luaposix (as on Debian), a DB file replaced under the cached connection is
    noticed at once by its inode."""
    import os

    from slurm_quota import db
    from tests.lua.harness import Plugin

    p = Plugin(runtime, db_path, preload_posix_stat=True)
    first = p.submit(submit_case("c01_plain"))
    fresh = tmp_path / "fresh.db"
    db.migrate(fresh)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(str(fresh) + suffix):
            os.remove(str(fresh) + suffix)
    for suffix in ("-wal", "-shm"):  # a restore replaces the whole set of files
        if os.path.exists(str(db_path) + suffix):
            os.remove(str(db_path) + suffix)
    os.replace(fresh, db_path)
    second = p.submit(submit_case("c01_plain"))
    assert second.rc == 0
    assert prealloc(db_path, first.uuid) is None  # the old file's row is gone with it
    assert prealloc(db_path, second.uuid) is not None


def test_deleted_file_is_noticed_by_the_cached_connection(runtime, db_path):
    import os

    from tests.lua.harness import Plugin

    plugin = Plugin(runtime, db_path, preload_posix_stat=True)  # luaposix, as on Debian
    assert plugin.submit(submit_case("c01_plain")).rc == 0
    os.remove(db_path)
    res = plugin.submit(submit_case("c01_plain"))
    assert res.rc == 0 and res.admin_comment is None
    assert "missing or unreadable" in res.log_text("error")


def test_cached_connection_never_reopens_the_file_with_another_descriptor(runtime, db_path):
    """close() of any other fd of the DB file drops SQLite's POSIX locks of the process: with a
    cached connection the plugin must never io.open() the database (seen on the lab as stale
    reads and a corrupted file)."""
    from tests.lua.harness import Plugin

    p = Plugin(runtime, db_path, preload_posix_stat=True)
    p.lua.execute("""
        local real_open, target = io.open, ...
        OPENED = 0
        io.open = function(path, mode)
            if path == target then OPENED = OPENED + 1 end
            return real_open(path, mode)
        end
    """, str(db_path))
    for _ in range(3):
        assert p.submit(submit_case("c01_plain")).rc == 0
    # with luaposix the file is only stat()ed, never opened (issue 19: it may be a FIFO)
    assert p.lua.globals().OPENED == 0


def test_the_preallocation_names_the_cluster_of_slurm_conf(plugin, db_path, tmp_path):
    # migration 0007: reconcile on a ledger several clusters share sweeps its own rows only
    conf = tmp_path / "slurm.conf"
    conf.write_text("# a site's slurm.conf\nSlurmctldHost=ctl1\n  clustername = Phys-2  # ours\n")
    plugin.m.config.slurm_conf = str(conf)
    plugin.m.reset_cluster_name()
    assert plugin.submit(submit_case("c01_plain")).rc == 0
    assert rows(db_path, "SELECT cluster FROM jobs_preallocations") == [("phys-2",)]


def test_without_a_readable_slurm_conf_the_cluster_is_empty(plugin, db_path, tmp_path,
                                                            monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)
    plugin.m.config.slurm_conf = str(tmp_path / "missing.conf")
    plugin.m.reset_cluster_name()
    res = plugin.submit(submit_case("c01_plain"))
    assert res.rc == 0
    got = rows(db_path, "SELECT cluster FROM jobs_preallocations")
    # /etc/slurm/slurm.conf is the last fallback: on a machine with one, its ClusterName
    expected = ""
    try:
        for line in open("/etc/slurm/slurm.conf"):
            key, sep, value = line.partition("=")
            if sep and key.strip().lower() == "clustername":
                expected = value.split("#")[0].split()[0].lower()
                break
    except OSError:
        pass
    assert got == [(expected,)]
