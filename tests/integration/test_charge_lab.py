"""The completion path on a real Slurm 22.05: the real plugin preallocates, the real jobcomp
wrapper charges, and the ledger must equal an independent computation from sacct with zero
drift; with jobcomp off, `reconcile` must recover every job exactly.

Independent computation (not slurm_quota's code): for each run, sacct's AllocCPUS ×
ElapsedRaw and the typed AllocTRES GPU counts × the factor, rounded half up on the product.
TIMEOUT is not run here (a 1-minute limit takes ~90 s on this lab); it is covered by the
captured fixture in tests/unit/test_charge.py.
"""

from __future__ import annotations

import json
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

from slurm_quota import db
from tests.integration.lab import REPO

FACTORS = {"h100": Decimal("30"), "a100": Decimal("7.5")}
FIELDS = ["JobIDRaw", "JobID", "User", "Account", "State", "AllocCPUS", "ElapsedRaw", "AllocTRES"]
DRIFT_REPORT = Path("/tmp/slurm-quota-charge-drift.json")

# (name, sbatch args, script): durations make the minutes non-trivial (16 CPUs × 30 s = 8).
# The a100 job runs as bob in account physics.
JOBS = [
    ("plain", [], "#!/bin/sh\nsleep 8\n"),
    ("n4", ["-n", "4"], "#!/bin/sh\nsleep 12\n"),
    ("c2", ["-c", "2"], "#!/bin/sh\nsleep 10\n"),
    ("array", ["--array=0-3"], "#!/bin/sh\nsleep 4\n"),
    ("h100", ["--gres=gpu:h100:1"], "#!/bin/sh\nsleep 10\n"),
    ("gpus2", ["--gpus=2"], "#!/bin/sh\nsleep 9\n"),
    ("untyped", ["--gres=gpu:1"], "#!/bin/sh\nsleep 6\n"),
    ("a100", ["--gpus=a100:1", "-A", "physics"], "#!/bin/sh\nsleep 7\n"),
    ("failing", [], "#!/bin/sh\nsleep 3\nexit 3\n"),
    ("exclusive", ["--exclusive"], "#!/bin/sh\nsleep 30\n"),
]


def _half_up(value: Decimal) -> int:
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


def _typed_gpus(tres: str) -> dict[str, int]:
    out = {}
    for part in tres.split(","):
        name, _, value = part.partition("=")
        if name.startswith("gres/gpu:"):
            out[name.split(":", 1)[1]] = int(value)
    return out


def independent(rows: list[dict[str, str]]) -> dict[str, tuple[int, int]]:
    """raw job id -> (cpu minutes, gpu minutes) from sacct alone."""
    out = {}
    for r in rows:
        secs = Decimal(int(r["ElapsedRaw"] or 0))
        cpu = _half_up(Decimal(int(r["AllocCPUS"] or 0)) * secs / 60)
        gpu_weighted = sum(
            Decimal(n) * FACTORS.get(t, Decimal(1)) for t, n in _typed_gpus(r["AllocTRES"]).items()
        )
        out[r["JobIDRaw"]] = (cpu, _half_up(gpu_weighted * secs / 60))
    return out


def ledger_rows(lab, sql: str, *args):
    conn = db.connect(lab.db_path, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


@pytest.fixture
def clab(clean_ledger):
    lab = clean_ledger
    lab.install_plugin(REPO / "lua" / "job_submit.lua")
    lab.set_jobcomp(True)
    conn = db.connect(lab.db_path)
    with db.write_transaction(conn):
        for gpu_type, factor in FACTORS.items():
            conn.execute("INSERT INTO gpu_factors (gpu_type, factor) VALUES (?, ?)",
                         (gpu_type, float(factor)))  # fmt: skip
    conn.close()
    yield lab
    lab.set_jobcomp(True)


def window_start() -> str:
    """The --since of a reconcile that must see this test's runs only: the next whole second,
    waited for. Runs of earlier tests ended before now, so before it; sacct's window starts
    at whole seconds, and one that started in the second an earlier run ended counted it."""
    t0 = int(time.time()) + 1
    while time.time() < t0:
        time.sleep(0.05)
    return str(t0)


def submit_all(lab) -> tuple[list[int], int]:
    """Submit JOBS plus one cancelled-while-pending job; return (submitted ids, held id)."""
    ids = []
    for name, args, script in JOBS:
        res = lab.sbatch(*args, script=script, user="bob" if name == "a100" else "alice")
        assert res.rc == 0, res.stderr
        ids.append(res.job_id)
    held = lab.sbatch("--hold", script="#!/bin/sh\ntrue\n")
    assert held.rc == 0, held.stderr
    time.sleep(1)
    lab.run("scancel", str(held.job_id))
    return ids + [held.job_id], held.job_id


def runs_of(lab, ids: list[int]) -> list[dict[str, str]]:
    """Every run (sacct -X) of the submitted jobs, array elements included, final."""
    rows = []
    for job_id in ids:
        lab.wait_job_end(job_id, timeout=300)
        for r in lab.sacct(job_id, FIELDS):
            rows.append(lab.wait_sacct_final(int(r["JobIDRaw"]), FIELDS))
    uniq = {r["JobIDRaw"]: r for r in rows}
    return list(uniq.values())


def wait_for_charges(lab, count: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger_rows(lab, "SELECT COUNT(*) FROM charges")[0][0] >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"only {ledger_rows(lab, 'SELECT COUNT(*) FROM charges')} charges")


def compare(lab, runs: list[dict[str, str]]) -> dict:
    expected = independent(runs)
    charged = {
        str(job_id): (cpu, gpu)
        for job_id, cpu, gpu in ledger_rows(
            lab, "SELECT job_id, cpu_minutes, gpu_minutes FROM charges"
        )  # fmt: skip
    }
    drift_cpu = sum(abs(charged.get(k, (0, 0))[0] - v[0]) for k, v in expected.items())
    drift_gpu = sum(abs(charged.get(k, (0, 0))[1] - v[1]) for k, v in expected.items())
    per_user: dict[str, list[int]] = {}
    for r in runs:
        t = per_user.setdefault(r["User"], [0, 0])
        t[0] += expected[r["JobIDRaw"]][0]
        t[1] += expected[r["JobIDRaw"]][1]
    ledger_users = {
        u: [c, g]
        for u, c, g in ledger_rows(
            lab,
            "SELECT username, total_consumed_cpu_minutes, total_consumed_gpu_minutes FROM users",
        )  # fmt: skip
    }
    return {
        "runs": len(runs),
        "charges": len(charged),
        "expected_cpu_minutes": sum(v[0] for v in expected.values()),
        "expected_gpu_minutes": sum(v[1] for v in expected.values()),
        "drift_cpu_minutes": drift_cpu,
        "drift_gpu_minutes": drift_gpu,
        "missing": sorted(set(expected) - set(charged)),
        "extra": sorted(set(charged) - set(expected)),
        "users_expected": per_user,
        "users_ledger": {u: ledger_users.get(u) for u in per_user},
    }


def _record(name: str, result: dict) -> None:
    data = {}
    if DRIFT_REPORT.exists():
        data = json.loads(DRIFT_REPORT.read_text())
    data[name] = result
    DRIFT_REPORT.write_text(json.dumps(data, indent=1, sort_keys=True))


def assert_ledger_consistent(lab) -> None:
    """`slurm-quota check`: each owner's reserved totals equal its preallocations, etc."""
    p = lab.run(lab.quota_bin, "check", "--json", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout)["reserved_drift"] == []


def test_jobcomp_charges_every_kind_of_job_with_zero_drift(clab):
    lab = clab
    t0 = window_start()
    ids, held = submit_all(lab)
    preallocated = ledger_rows(lab, "SELECT COUNT(*), SUM(array_size) FROM jobs_preallocations")
    assert preallocated[0][0] == len(ids)  # the real plugin reserved every submission
    assert_ledger_consistent(lab)  # the totals it decides from equal what it reserved
    runs = runs_of(lab, ids)
    assert len(runs) == len(JOBS) - 1 + 4 + 1  # array of 4 elements, + the held one
    wait_for_charges(lab, len(runs))
    for r in runs:
        lab.wait_jobcomp(int(r["JobIDRaw"]), timeout=120)
    result = compare(lab, runs)
    _record("jobcomp", result)
    assert result["missing"] == [] and result["extra"] == []
    assert result["drift_cpu_minutes"] == 0 and result["drift_gpu_minutes"] == 0
    assert result["users_ledger"] == result["users_expected"]
    assert result["expected_cpu_minutes"] >= 8 and result["expected_gpu_minutes"] >= 10
    # every reservation was given back by the charges: nothing leaks
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
    sources = {s for (s,) in ledger_rows(lab, "SELECT DISTINCT source FROM charges")}
    assert sources == {"jobcomp:scontrol"}
    held_row = ledger_rows(lab, "SELECT cpu_minutes, gpu_minutes, released_prealloc, job_state "
                                "FROM charges WHERE job_id = ?", held)  # fmt: skip
    assert held_row == [(0, 0, 1, "CANCELLED")]
    # A reconcile over the same window finds nothing new: jobcomp and sacct agree on keys.
    p = lab.run(lab.quota_bin, "reconcile", "--since", t0, "--json",
                "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["charged"] == 0 and rep["spool_replayed"] == 0
    assert rep["already_charged"] >= len(runs)
    assert compare(lab, runs)["drift_cpu_minutes"] == 0
    assert_ledger_consistent(lab)  # every release took its amount off the totals


def test_reconcile_recovers_every_job_the_jobcomp_path_missed(clab):
    lab = clab
    lab.set_jobcomp(False)
    t0 = window_start()
    ids, held = submit_all(lab)
    runs = runs_of(lab, ids)
    for r in runs:
        lab.wait_jobcomp(int(r["JobIDRaw"]), timeout=120)
    assert ledger_rows(lab, "SELECT COUNT(*) FROM charges") == [(0,)]
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations")[0][0] == len(ids)
    p = lab.run(lab.quota_bin, "reconcile", "--since", t0,
                "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"{len(runs)} runs from accounting" in p.stdout
    result = compare(lab, runs)
    _record("reconcile", result)
    assert result["missing"] == [] and result["extra"] == []
    assert result["drift_cpu_minutes"] == 0 and result["drift_gpu_minutes"] == 0
    assert result["users_ledger"] == result["users_expected"]
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
    # idempotent: a second reconcile changes nothing
    p2 = lab.run(lab.quota_bin, "reconcile", "--since", t0, "--json",
                 "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert json.loads(p2.stdout)["charged"] == 0
    assert compare(lab, runs) == result


def test_orphan_release_and_prune_keep_queued_jobs(clab):
    lab = clab
    t0 = window_start()
    held = lab.sbatch("--hold", script="#!/bin/sh\ntrue\n")
    assert held.rc == 0
    conn = db.connect(lab.db_path)
    with db.write_transaction(conn):
        conn.execute(
            "INSERT INTO jobs_preallocations (job_uuid, username, account, "
            "preallocated_cpu_minutes, preallocated_gpu_minutes, array_size, created_at) "
            "VALUES ('0badc0de-0000-4000-8000-000000000042', 'alice', 'research', 30, 0, 1, "
            "'2020-01-01 00:00:00')"
        )
        conn.execute("UPDATE jobs_preallocations SET created_at = '2020-01-01 00:00:00'")
    conn.close()
    bin_ = lab.quota_bin
    dry = lab.run(bin_, "prune", "--preallocs", "--dry-run", "--json", check=False)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["preallocations"] == ["0badc0de-0000-4000-8000-000000000042"]
    p = lab.run(bin_, "reconcile", "--since", t0, "--grace", "0", "--json",
                "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["orphans"] == ["0badc0de-0000-4000-8000-000000000042"]
    left = ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations")
    assert left == [(1,)]  # the held job's reservation stays: it is queued
    journal = ledger_rows(lab, "SELECT action, target FROM journal")
    assert ("reconcile", "0badc0de-0000-4000-8000-000000000042") in journal
    lab.run("scancel", str(held.job_id))
    lab.wait_jobcomp(held.job_id)
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]


def test_a_token_overwritten_by_scancel_admin_comment_is_released_once(clab):
    """25.11+: `scancel --admin-comment` replaces AdminComment without job_modify, so our
    token is gone when the job's jobcomp charge runs. The charge is still made once (by user
    and account), and reconcile releases the reservation nobody can name any more."""
    lab = clab
    major, minor = (int(x) for x in lab.slurm_version().split(".")[:2])
    t0 = window_start()
    held = lab.sbatch("--hold", "--time=10", script="#!/bin/sh\ntrue\n")
    assert held.rc == 0, held.stderr
    cancel = lab.run("scancel", "--admin-comment=cancelled by ops", str(held.job_id),
                     check=False)  # fmt: skip
    if (major, minor) < (25, 11):
        # no such option before 25.11: there the token can only change through job_modify,
        # which keeps it (test_plugin_lab.test_admin_comment_rewrite_keeps_the_token)
        assert cancel.returncode != 0 and "admin-comment" in cancel.stderr, cancel
        lab.run("scancel", str(held.job_id))
        lab.wait_jobcomp(held.job_id)
        assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
        return
    assert cancel.returncode == 0, cancel.stderr
    lab.wait_jobcomp(held.job_id)
    charged = ledger_rows(lab, "SELECT job_state, released_prealloc FROM charges "
                               "WHERE job_id = ?", held.job_id)  # fmt: skip
    assert charged == [("CANCELLED", 0)]  # charged once; the token was gone
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(1,)]
    p = lab.run(lab.quota_bin, "reconcile", "--since", t0, "--grace", "0", "--json",
                "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert len(rep["orphans"]) == 1 and rep["charged"] == 0
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
    assert ledger_rows(lab, "SELECT COUNT(*) FROM charges WHERE job_id = ?", held.job_id) == [
        (1,)
    ]
    assert_ledger_consistent(lab)


def test_a_completed_job_requeued_is_charged_once_per_run(clab):
    """`scontrol requeue` of a completed job runs it again. 25.11.3+ runs no jobcomp for the
    requeue itself (earlier releases may); either way each run is charged exactly once, by
    jobcomp at its end, and a reconcile over the window finds nothing left to charge."""
    lab = clab
    t0 = window_start()
    res = lab.sbatch("--requeue", "--time=5", script="#!/bin/sh\nsleep 2\n")
    assert res.rc == 0, res.stderr
    assert lab.wait_job_end(res.job_id) == "COMPLETED"
    lab.wait_jobcomp(res.job_id)
    wait_for_charges(lab, 1)
    lab.run("scontrol", "requeue", str(res.job_id))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = ledger_rows(lab, "SELECT COUNT(*) FROM charges WHERE job_id = ?", res.job_id)
        if runs[0][0] >= 2 and lab.job_state(res.job_id) == "COMPLETED":
            break
        time.sleep(1)
    lab.wait_jobcomp(res.job_id)
    rows = ledger_rows(lab, "SELECT charge_key, start_time FROM charges WHERE job_id = ? "
                            "ORDER BY start_time", res.job_id)  # fmt: skip
    assert len(rows) == 2, rows  # two runs, two distinct keys
    assert rows[0][1] < rows[1][1]
    p = lab.run(lab.quota_bin, "reconcile", "--since", t0, "--json",
                "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["charged"] == 0
    assert ledger_rows(lab, "SELECT COUNT(*) FROM charges WHERE job_id = ?", res.job_id) == [(2,)]
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
