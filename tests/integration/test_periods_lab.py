"""Allocation periods on the real lab: a boundary reached resets what the plugin sees.

A real job is charged by the jobcomp path while alice has a monthly period; her period's end
is then moved to now (as if the month had just ended) and `reconcile` (the timer's command)
rolls it over: a job refused before the boundary is accepted after it, the closed period is
archived with what it used, the journal has the rollover and `check` still balances.
"""

from __future__ import annotations

import json
import time

import pytest

from slurm_quota import db

SCRIPT = "#!/bin/sh\ntrue\n"


def rows(lab, sql: str, *args):
    conn = db.connect(lab.ledger, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


@pytest.fixture
def plab(clean_ledger):
    from tests.integration.lab import REPO

    clean_ledger.install_plugin(REPO / "lua" / "job_submit.lua")
    clean_ledger.set_jobcomp(True)
    return clean_ledger


def quota(lab, *args: str) -> str:
    p = lab.run(lab.quota_bin, *args, check=False)
    assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p.stdout


def test_a_boundary_moved_to_now_lets_a_refused_job_in(plab):
    lab = plab
    quota(lab, "user-quota", "alice", "10")
    quota(lab, "set-period", "--default", "none", "--time-zone", "UTC")
    quota(lab, "set-period", "--user", "alice", "month", "--carry-over", "10",
          "--reason", "monthly course share")  # fmt: skip
    # A real run, charged by jobcomp under the period (1 CPU x ~1 s -> 1 CPU minute shown).
    done = lab.sbatch("-n", "1", "--time=1", script="#!/bin/sh\nsleep 1\n")
    assert done.rc == 0, done.stderr
    lab.wait_jobcomp(done.job_id)
    charged = rows(lab, "SELECT cpu_s FROM charges WHERE job_id = ?", done.job_id)
    assert len(charged) == 1 and charged[0][0] >= 1
    quota(lab, "adjust", "--user", "alice", "--cpu", "--minutes", "+7", "--reason", "test")
    used_s = charged[0][0] + 7 * 60
    assert rows(lab, "SELECT consumed_cpu_s FROM users WHERE username = 'alice'") == [(used_s,)]

    before = lab.sbatch("--hold", "--time=5", script=SCRIPT)  # 5 > 10 - 8 left
    assert before.rc == 1
    assert "CPU-minutes than user alice has left" in before.stderr

    # The month ends now.
    now = int(time.time())
    conn = db.connect(lab.ledger)
    with db.write_transaction(conn):
        conn.execute(
            "UPDATE period_state SET period_end = ? WHERE owner_kind = 'user' "
            "AND owner = 'alice'", (now,),
        )  # fmt: skip
    conn.close()
    # --since now: only the period upkeep matters here, not runs of earlier tests
    out = json.loads(quota(lab, "reconcile", "--since", str(now), "--json"))
    assert [p.split(":")[0] for p in out["periods"]] == ["user alice"]
    again = json.loads(quota(lab, "reconcile", "--since", str(now), "--json"))
    assert again["periods"] == []  # idempotent

    # unused = 600 s - used; carry-over capped at 10 % of 10 minutes = 60 s
    carry = min(max(0, 600 - used_s), 60)
    assert rows(lab, "SELECT consumed_cpu_s FROM users WHERE username = 'alice'") == [(-carry,)]
    after = lab.sbatch("--hold", "--time=5", script=SCRIPT)
    assert after.rc == 0, after.stderr

    archive = rows(
        lab, "SELECT period_end, used_cpu_s, carry_out_cpu_s, quota_cpu_minutes FROM "
        "period_archive WHERE owner_kind = 'user' AND owner = 'alice'",
    )  # fmt: skip
    assert archive == [(now, used_s, carry, 10)]
    journal = rows(
        lab, "SELECT action FROM journal WHERE target_kind = 'user' AND target = 'alice' "
        "AND field = 'period' ORDER BY id",
    )  # fmt: skip
    assert [a for (a,) in journal] == ["set-period", "period-start", "period-rollover"]
    check = json.loads(lab.run(lab.quota_bin, "check", "--json", check=False).stdout)
    assert check["ok"] and check["consumed_drift"] == []
