"""The completion path on a real Slurm: the real plugin preallocates, the real jobcomp
wrapper charges, and the ledger must equal an independent computation from sacct exactly;
with jobcomp off, or from scratch, `reconcile` must recover every job exactly.

Independent computation (not slurm_quota's code), from `sacct -P -X` alone: per run
AllocCPUS × ElapsedRaw CPU-seconds, and Σ typed AllocTRES GPU counts × factor × ElapsedRaw
GPU-seconds (exact decimals). The ledger keeps CPU-seconds exactly (drift must be 0) and
GPU-milliseconds rounded once per run (drift ≤ 1 ms per run; the issue allows 1 GPU-second).
Minutes are checked by the documented rule: ceil(exact total / 60 s).
TIMEOUT is not run here (a 1-minute limit takes ~90 s on this lab); it is covered by the
captured fixture in tests/unit/test_charge.py.
"""

from __future__ import annotations

import json
import time
from decimal import Decimal
from pathlib import Path

import pytest

from slurm_quota import db
from tests.integration.lab import FINAL_STATES, REPO

# a100's fractional factor: 0.75 × 7 s = 5.25 GPU-s, so milliseconds matter.
FACTORS = {"h100": Decimal("30"), "a100": Decimal("0.75")}
FIELDS = ["JobIDRaw", "JobID", "User", "Account", "State", "AllocCPUS", "ElapsedRaw", "AllocTRES"]
DRIFT_REPORT = Path("/tmp/slurm-quota-charge-drift.json")

# (name, sbatch args, script, runs). The a100 jobs run as bob in account physics.
JOBS = [
    ("plain", [], "#!/bin/sh\nsleep 8\n", 1),
    ("n4", ["-n", "4"], "#!/bin/sh\nsleep 12\n", 1),
    ("c2", ["-c", "2"], "#!/bin/sh\nsleep 10\n", 1),
    ("array", ["--array=0-3"], "#!/bin/sh\nsleep 4\n", 4),
    # 1-10 s tasks: each alone was free when every run was rounded to whole minutes
    ("short_array", ["--array=0-9"], "#!/bin/sh\nsleep $((SLURM_ARRAY_TASK_ID + 1))\n", 10),
    ("steps", ["-n", "2"], "#!/bin/sh\nfor i in 1 2 3; do srun -n 2 sleep 1; done\n", 1),
    ("h100", ["--gres=gpu:h100:1"], "#!/bin/sh\nsleep 10\n", 1),
    ("gpus2", ["--gpus=2"], "#!/bin/sh\nsleep 9\n", 1),
    ("untyped", ["--gres=gpu:1"], "#!/bin/sh\nsleep 6\n", 1),
    ("a100", ["--gpus=a100:1", "-A", "physics"], "#!/bin/sh\nsleep 7\n", 1),
    ("a100x2", ["--gpus=a100:2", "-c", "3", "-A", "physics"], "#!/bin/sh\nsleep 3\n", 1),
    ("failing", [], "#!/bin/sh\nsleep 3\nexit 3\n", 1),
    ("exclusive", ["--exclusive"], "#!/bin/sh\nsleep 30\n", 1),
]
# The acceptance case: 200 one-second jobs must cost their CPU-seconds, not 0.
ONES = ("ones", ["--array=1-200"], "#!/bin/sh\nsleep 1\n", 200)


def _typed_gpus(tres: str) -> dict[str, int]:
    out = {}
    for part in tres.split(","):
        name, _, value = part.partition("=")
        if name.startswith("gres/gpu:"):
            out[name.split(":", 1)[1]] = int(value)
    return out


def independent(rows: list[dict[str, str]]) -> dict[str, tuple[int, Decimal]]:
    """raw job id -> (CPU-seconds, GPU-seconds) from sacct alone, exact."""
    out = {}
    for r in rows:
        secs = int(r["ElapsedRaw"] or 0)
        typed = _typed_gpus(r["AllocTRES"]).items()
        gpu_weighted = sum((Decimal(n) * FACTORS.get(t, Decimal(1)) for t, n in typed), Decimal(0))
        out[r["JobIDRaw"]] = (int(r["AllocCPUS"] or 0) * secs, gpu_weighted * secs)
    return out


def _ceil_div(value, per: int) -> int:
    return -(-int(value) // per)


def ledger_rows(lab, sql: str, *args):
    conn = db.connect(lab.ledger, readonly=True)
    try:
        return [tuple(r) for r in conn.execute(sql, args).fetchall()]
    finally:
        conn.close()


@pytest.fixture
def clab(clean_ledger):
    lab = clean_ledger
    lab.install_plugin(REPO / "lua" / "job_submit.lua")
    lab.set_jobcomp(True)
    set_factors(lab)
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


def submit_all(lab, jobs=tuple(JOBS)) -> tuple[dict[str, int], int]:
    """Submit jobs, one job cancelled while pending and one cancelled while running; return
    ({name: job id}, expected number of runs)."""
    ids = {}
    for name, args, script, _ in jobs:
        res = lab.sbatch(*args, script=script, user="bob" if "a100" in name else "alice")
        assert res.rc == 0, res.stderr
        ids[name] = res.job_id
    held = lab.sbatch("--hold", script="#!/bin/sh\ntrue\n")
    assert held.rc == 0, held.stderr
    ids["held"] = held.job_id
    running = lab.sbatch(script="#!/bin/sh\nsleep 300\n")
    assert running.rc == 0, running.stderr
    ids["cancelled_running"] = running.job_id
    deadline = time.monotonic() + 120
    while lab.job_state(running.job_id) != "RUNNING":
        assert time.monotonic() < deadline, "the job to cancel never started"
        time.sleep(0.2)
    time.sleep(3)
    lab.run("scancel", str(held.job_id), str(running.job_id))
    return ids, sum(n for *_, n in jobs) + 2


def _complete(row: dict[str, str]) -> bool:
    return (
        (row["State"].split() or [""])[0] in FINAL_STATES
        and row["End"] != "Unknown"
        and bool(row["Partition"])
    )


def runs_of(lab, ids: dict[str, int], expected: int, timeout: float = 120) -> list[dict[str, str]]:
    """Every run (sacct -X) of the submitted jobs, array elements included, each final.

    One sacct per job (an array's elements come together), polled until every row is final
    and complete (slurmdbd can lag the end; see Lab.wait_sacct_final)."""
    names = list(dict.fromkeys(["JobIDRaw", "State", "End", "Partition", *FIELDS]))
    uniq: dict[str, dict[str, str]] = {}
    for job_id in ids.values():
        lab.wait_job_end(job_id, timeout=300)
        deadline = time.monotonic() + timeout
        while True:
            rows = lab.sacct(job_id, names)
            if rows and all(_complete(r) for r in rows):
                break
            assert time.monotonic() < deadline, f"sacct never showed job {job_id} final: {rows}"
            time.sleep(0.2)
        uniq.update({r["JobIDRaw"]: r for r in rows})
    runs = list(uniq.values())
    assert len(runs) == expected, sorted(uniq)
    return runs


def wait_for_charges(lab, count: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger_rows(lab, "SELECT COUNT(*) FROM charges")[0][0] >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"only {ledger_rows(lab, 'SELECT COUNT(*) FROM charges')} charges")


def charged_runs(lab) -> dict[str, tuple[int, int]]:
    """raw job id -> (cpu_s, gpu_ms) of the ledger's charges."""
    rows = ledger_rows(lab, "SELECT job_id, cpu_s, gpu_ms FROM charges")
    return {str(job_id): (cpu_s, gpu_ms) for job_id, cpu_s, gpu_ms in rows}


def compare(lab, runs: list[dict[str, str]]) -> dict:
    """The ledger against the independent computation: per run, and per user and account."""
    expected = independent(runs)
    charged = charged_runs(lab)
    cpu_diffs = [abs(charged.get(k, (0, 0))[0] - v[0]) for k, v in expected.items()]
    gpu_diffs = [abs(Decimal(charged.get(k, (0, 0))[1]) - v[1] * 1000) for k, v in expected.items()]
    owners: dict[str, dict[str, list]] = {"user": {}, "account": {}}
    for r in runs:
        cpu_s, gpu_s = expected[r["JobIDRaw"]]
        for kind, name in (("user", r["User"]), ("account", r["Account"])):
            t = owners[kind].setdefault(name, [0, Decimal(0)])
            t[0] += cpu_s
            t[1] += gpu_s
    ledger = {}
    for kind, table, key in (("user", "users", "username"), ("account", "accounts", "account")):
        for name, cpu_s, gpu_ms, cpu_min, gpu_min in ledger_rows(
            lab, f"SELECT {key}, consumed_cpu_s, consumed_gpu_ms, total_consumed_cpu_minutes, "
            f"total_consumed_gpu_minutes FROM {table}",
        ):  # fmt: skip
            ledger[(kind, name)] = (cpu_s, gpu_ms, cpu_min, gpu_min)
    owner_rows = []
    for kind, by_name in owners.items():
        for name, (cpu_s, gpu_s) in sorted(by_name.items()):
            got = ledger.get((kind, name), (0, 0, 0, 0))
            owner_rows.append({
                "kind": kind, "name": name,
                "sacct_cpu_s": cpu_s, "ledger_cpu_s": got[0],
                "sacct_gpu_s": str(gpu_s), "ledger_gpu_ms": got[1],
                "gpu_drift_ms": str(abs(Decimal(got[1]) - gpu_s * 1000)),
                # minutes by the documented rule, from sacct's exact sums
                # (factors of ≤ 3 decimals × whole seconds: gpu_s × 1000 is a whole number)
                "rule_minutes": [_ceil_div(cpu_s, 60), _ceil_div(gpu_s * 1000, 60000)],
                "ledger_minutes": [got[2], got[3]],
            })  # fmt: skip
    return {
        "runs": len(runs),
        "charges": len(charged),
        "sacct_cpu_s": sum(v[0] for v in expected.values()),
        "sacct_gpu_s": str(sum((v[1] for v in expected.values()), Decimal(0))),
        "ledger_cpu_s": sum(charged.get(k, (0, 0))[0] for k in expected),
        "ledger_gpu_ms": sum(charged.get(k, (0, 0))[1] for k in expected),
        "drift_cpu_s": sum(cpu_diffs),
        "drift_gpu_ms_max_per_run": str(max(gpu_diffs, default=Decimal(0))),
        "drift_gpu_ms_total": str(sum(gpu_diffs, Decimal(0))),
        "missing": sorted(set(expected) - set(charged)),
        "extra": sorted(set(charged) - set(expected)),
        "owners": owner_rows,
    }


def assert_exact(result: dict) -> None:
    """What the issue asks: CPU exact, GPU within 1 ms per run here (1 GPU-s allowed)."""
    assert result["missing"] == [] and result["extra"] == []
    assert result["drift_cpu_s"] == 0
    assert Decimal(result["drift_gpu_ms_max_per_run"]) <= 1
    for o in result["owners"]:
        assert o["ledger_cpu_s"] == o["sacct_cpu_s"], o
        assert Decimal(o["gpu_drift_ms"]) <= result["runs"], o
        assert o["ledger_minutes"] == o["rule_minutes"], o


def _record(name: str, result: dict) -> None:
    data = {}
    if DRIFT_REPORT.exists():
        data = json.loads(DRIFT_REPORT.read_text())
    data[name] = {"release": lab_release(), **result}
    DRIFT_REPORT.write_text(json.dumps(data, indent=1, sort_keys=True))


def lab_release() -> str:
    import os

    return os.environ.get("SLURM_QUOTA_LAB_RELEASE", "bookworm")


def assert_ledger_consistent(lab) -> None:
    """`slurm-quota check`: reserved totals = preallocations, consumed = charges + adjustments."""
    p = lab.run(lab.quota_bin, "check", "--json", check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    report = json.loads(p.stdout)
    assert report["reserved_drift"] == [] and report["consumed_drift"] == []


def set_factors(lab) -> None:
    conn = db.connect(lab.ledger)
    with db.write_transaction(conn):
        for gpu_type, factor in FACTORS.items():
            conn.execute("REPLACE INTO gpu_factors (gpu_type, factor) VALUES (?, ?)",
                         (gpu_type, float(factor)))  # fmt: skip
    conn.close()


def test_jobcomp_charges_every_kind_of_job_exactly_and_reconcile_from_scratch_agrees(clab):
    lab = clab
    t0 = window_start()
    ids, expected_runs = submit_all(lab, (*JOBS, ONES))
    runs = runs_of(lab, ids, expected_runs)
    wait_for_charges(lab, len(runs))
    for r in runs:
        lab.wait_jobcomp(int(r["JobIDRaw"]), timeout=120)
    result = compare(lab, runs)
    _record("jobcomp", result)
    assert_exact(result)
    assert result["sacct_cpu_s"] >= 800 and Decimal(result["sacct_gpu_s"]) >= 100
    # The case: 200 one-second jobs cost their CPU-seconds (≥ 3 minutes), not 0.
    ones = [r for r in runs if r["JobID"].startswith(f"{ids['ones']}_")]
    assert len(ones) == 200
    ones_charged = sum(charged_runs(lab)[r["JobIDRaw"]][0] for r in ones)
    assert ones_charged == sum(int(r["ElapsedRaw"]) * int(r["AllocCPUS"]) for r in ones)
    _record("ones", {"runs": len(ones), "ledger_cpu_s": ones_charged,
                     "minutes": _ceil_div(ones_charged, 60)})  # fmt: skip
    assert ones_charged >= 200 and _ceil_div(ones_charged, 60) >= 4
    # the real plugin reserved every run and each charge gave its element back: no leak
    assert ledger_rows(lab, "SELECT COUNT(*) FROM charges WHERE released_prealloc != 1") == [(0,)]
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
    # Charged by the jobcomp path, none spooled for reconcile. With 200 elements ending
    # together slurmctld's record of an element may already be gone or not yet final when its
    # charge runs: then its sacct -D row answers (seen once on bookworm), as designed.
    sources = {s for (s,) in ledger_rows(lab, "SELECT DISTINCT source FROM charges")}
    assert "jobcomp:scontrol" in sources and sources <= {"jobcomp:scontrol", "jobcomp:sacct"}
    held_row = ledger_rows(lab, "SELECT cpu_s, gpu_ms, released_prealloc, job_state "
                                "FROM charges WHERE job_id = ?", ids["held"])  # fmt: skip
    assert held_row == [(0, 0, 1, "CANCELLED")]
    (cancelled,) = ledger_rows(lab, "SELECT cpu_s, job_state FROM charges WHERE job_id = ?",
                               ids["cancelled_running"])  # fmt: skip
    assert cancelled[0] >= 3 and cancelled[1] == "CANCELLED"
    assert_ledger_consistent(lab)
    # A reconcile over the same window finds nothing new: jobcomp and sacct agree on keys.
    p = lab.run(lab.quota_bin, "reconcile", "--since", t0, "--json",
                "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert p.returncode == 0, p.stderr
    rep = json.loads(p.stdout)
    assert rep["charged"] == 0 and rep["spool_replayed"] == 0
    assert rep["already_charged"] >= len(runs)
    # From scratch: an empty ledger reconciled from accounting equals the jobcomp ledger.
    by_jobcomp = charged_runs(lab)
    lab.reset_ledger()
    set_factors(lab)
    p = lab.run(lab.quota_bin, "reconcile", "--since", t0, "--json",
                "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    rep = json.loads(p.stdout)
    assert rep["charged"] == len(runs) and rep["cpu_s"] == result["ledger_cpu_s"]
    assert charged_runs(lab) == by_jobcomp
    again = compare(lab, runs)
    _record("reconcile_from_scratch", again)
    assert_exact(again)
    assert again["owners"] == result["owners"]
    assert_ledger_consistent(lab)


def test_reconcile_recovers_every_job_the_jobcomp_path_missed(clab):
    lab = clab
    lab.set_jobcomp(False)
    t0 = window_start()
    ids, expected_runs = submit_all(lab)
    runs = runs_of(lab, ids, expected_runs)
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
    assert_exact(result)
    assert ledger_rows(lab, "SELECT COUNT(*) FROM jobs_preallocations") == [(0,)]
    # idempotent: a second reconcile changes nothing
    p2 = lab.run(lab.quota_bin, "reconcile", "--since", t0, "--json",
                 "--spool", str(lab.spool_dir), check=False)  # fmt: skip
    assert json.loads(p2.stdout)["charged"] == 0
    assert compare(lab, runs) == result
    assert_ledger_consistent(lab)


def test_orphan_release_and_prune_keep_queued_jobs(clab):
    lab = clab
    t0 = window_start()
    held = lab.sbatch("--hold", script="#!/bin/sh\ntrue\n")
    assert held.rc == 0
    conn = db.connect(lab.ledger)
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
