"""The plugin's check on the exact consumption of migration 0005 (CPU-seconds, GPU-ms)."""

from __future__ import annotations

import pytest

from slurm_quota import ledger
from tests.lua.harness import Plugin, execute, rows, submit_case


@pytest.fixture
def m(runtime):
    return Plugin(runtime, None).m


def set_exact(db_path, user, *, cpu_quota=-1, gpu_quota=-1, cpu_s=0, gpu_ms=0):
    """A user row as the ledger writes it: exact totals and their minutes by the one rule."""
    execute(
        db_path,
        "INSERT INTO users (username, quota_cpu_minutes, quota_gpu_minutes, consumed_cpu_s, "
        "consumed_gpu_ms, total_consumed_cpu_minutes, total_consumed_gpu_minutes) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        user, cpu_quota, gpu_quota, cpu_s, gpu_ms,
        ledger.minutes_from_cpu_s(cpu_s), ledger.minutes_from_gpu_ms(gpu_ms),
    )  # fmt: skip


@pytest.mark.parametrize(
    "exact, per_minute",
    [(0, 60), (1, 60), (59, 60), (60, 60), (61, 60), (50, 60), (119, 60), (120, 60),
     (1, 60000), (59999, 60000), (60000, 60000), (60001, 60000), (2**53 - 1, 60),
     (2**53 - 2, 60000), (6 * 10**14 + 1, 60), (-30, 60), (-60, 60), (-61, 60)],
)  # fmt: skip
def test_the_plugin_rounds_consumption_to_minutes_by_the_ledger_rule(m, exact, per_minute):
    assert m.minutes_from_exact(float(exact), per_minute) == ledger.minutes_from_exact(
        exact, per_minute
    )


def test_fifty_cpu_seconds_consumed_take_the_last_minute(plugin, db_path):
    # quota 10 minutes, nothing reserved; c02_time10 asks for 1 CPU x 10 minutes.
    set_exact(db_path, "alice", cpu_quota=10, cpu_s=50)
    res = plugin.submit(submit_case("c02_time10"))
    assert res.rc != 0
    text = "\n".join(res.user_lines)
    assert "consumed 1" in text, text
    assert rows(db_path, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]


def test_a_request_that_fits_to_the_second_is_accepted(plugin, db_path):
    # 11 minutes of quota, exactly 60 CPU-seconds consumed: 10 minutes fit exactly.
    set_exact(db_path, "alice", cpu_quota=11, cpu_s=60)
    assert plugin.submit(submit_case("c02_time10")).rc == 0


def test_one_cpu_second_more_and_it_no_longer_fits(plugin, db_path):
    set_exact(db_path, "alice", cpu_quota=11, cpu_s=61)
    assert plugin.submit(submit_case("c02_time10")).rc != 0


def test_gpu_milliseconds_count_against_the_gpu_quota(plugin, db_path):
    # c10_gres_h100x2: 2 GPUs x 30 minutes = 60 GPU-minutes (factor 1).
    set_exact(db_path, "alice", gpu_quota=60, gpu_ms=1)
    assert plugin.submit(submit_case("c10_gres_h100x2")).rc != 0


def test_no_gpu_consumption_leaves_the_whole_gpu_quota(plugin, db_path):
    set_exact(db_path, "alice", gpu_quota=60, gpu_ms=0)
    assert plugin.submit(submit_case("c10_gres_h100x2")).rc == 0


def test_the_plugin_reads_the_exact_total_not_the_minute_column(plugin, db_path):
    # A hand edit of the exact total alone (the minutes say 0) still counts.
    set_exact(db_path, "alice", cpu_quota=10, cpu_s=0)
    execute(db_path, "UPDATE users SET consumed_cpu_s = 50")
    assert rows(db_path, "SELECT total_consumed_cpu_minutes FROM users") == [(0,)]
    assert plugin.submit(submit_case("c02_time10")).rc != 0


def test_a_seed_tool_adding_minutes_is_seen_by_the_plugin(plugin, db_path):
    set_exact(db_path, "alice", cpu_quota=20, cpu_s=50)  # 1 minute
    assert plugin.submit(submit_case("c02_time10")).rc == 0  # 1 + 10 reserved <= 20
    execute(db_path, "UPDATE users SET total_consumed_cpu_minutes = "
                     "total_consumed_cpu_minutes + 5")  # fmt: skip
    assert plugin.submit(submit_case("c02_time10")).rc != 0  # 6 + 10 + 10 > 20
